"""The evaluation loop: an eval step over a loader, metrics reduced by batch size."""

from __future__ import annotations

from typing import Any

import torch

from fnloop.loops.data import batches_on, data_seed, limited, make_source, require, stage_data
from fnloop.metrics import Accumulator
from fnloop.connectors.device import device_of

__all__ = ["evaluate", "run_stage", "prefixed"]


def prefixed(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Metric names under a stage prefix (``loss`` -> ``val/loss``); names with a ``/`` are kept."""
    return {(k if "/" in k else f"{prefix}/{k}"): v for k, v in metrics.items()}


def evaluate(
    state: Any, eval_step: Any, source: Any, n_batches: int | None, *, epoch: int = 0, parallel: Any = None
) -> dict[str, float]:
    """Run ``eval_step`` over ``n_batches`` batches; every metric is a batch-size weighted mean
    (``*_max``/``*_min``/``*_sum`` names reduce accordingly). One host sync, at the end; in a
    distributed run the ranks' results are then reduced (``parallel``)."""
    acc = Accumulator()
    accs = acc.init()
    device = device_of(state.params)
    samples = 0
    for batch in batches_on(source, epoch, 0, n_batches, device, next(iter(state.params.values())).dtype if state.params else None):
        size = source.batch_size_of(batch)
        accs = acc.update(accs, eval_step(state, batch), size)
        samples += size
    out = acc.compute(accs)
    if not out:
        return {}
    values = torch.stack([v.detach().to("cpu", torch.float64).reshape(()) for v in out.values()]).tolist()
    result = dict(zip(out, values))
    return parallel.reduce_metrics(result, samples) if parallel is not None else result


def run_stage(trainer: Any, state: Any, eval_step: Any, data: Any, *, stage: str, datamodule: Any = None) -> dict[str, float]:
    """``Trainer.validate`` / ``Trainer.test``: metrics as ``{"val/loss": ...}``, printed as a table."""
    from fnloop.execution import check_not_donated
    from fnloop.loggers import format_metrics_table
    from fnloop.loops.logging import make_logger

    check_not_donated(state, f"Trainer.{'validate' if stage == 'val' else stage}")
    data = require(
        stage_data(data, datamodule, stage), f"{stage} data", f"pass data= or a datamodule with a {stage}_data() method"
    )
    from fnloop.connectors.accelerator import prepare_state
    from fnloop.connectors.launch import connect
    from fnloop.connectors.precision import resolve_precision
    from fnloop.loggers import NullLogger

    parallel = connect(trainer)
    state = prepare_state(state, parallel, resolve_precision(trainer.precision))
    source = make_source(data, seed=data_seed(trainer, state), stage=stage, parallel=parallel, shard=trainer.use_distributed_sampler)
    n = limited(source, 0, trainer.limit(stage), stage)
    metrics = prefixed(evaluate(state, eval_step, source, n, parallel=parallel), stage)
    logger = make_logger(trainer) if parallel.is_global_zero else NullLogger()
    if metrics:
        logger.log_metrics(metrics, step=state.loop.global_step)
    logger.finalize("finished")
    if parallel.is_global_zero and (trainer.enable_progress_bar or trainer.logger is not None):
        print(format_metrics_table(metrics, title={"val": "Validate", "test": "Test"}[stage] + " metrics"))
    return metrics
