"""The evaluation loop: an eval step over one or several loaders, metrics reduced per loader.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
    >>> step = fl.eval_step(lambda model, b: model(b).square().mean())
    >>> loaders = eval_loaders({"a": [torch.ones(1, 2)], "b": [torch.zeros(1, 2)]}, step, seed=0, stage="val")
    >>> _, metrics = evaluate(state, loaders, lambda source: None, Hooks([]), kind="validation", prefix="val")
    >>> sorted(metrics)
    ['val/loss/a', 'val/loss/b']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from fnloop.connectors.device import device_of
from fnloop.loops.data import batches_on, data_seed, limited, make_source, require, stage_data
from fnloop.loops.hooks import Hooks
from fnloop.loops.loaders import split_loaders, step_for, suffixed
from fnloop.loops.members import for_state
from fnloop.loops.ranks import loggers_on, on_this_rank, params_dtype
from fnloop.members import expand, renamed
from fnloop.metrics import Accumulator

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from fnloop.connectors.strategy import Parallel
    from fnloop.state import TrainState
    from fnloop.trainer import Trainer
    from fnloop.types import EvalStepFn

__all__ = ["Loader", "eval_loaders", "evaluate", "grad_mode", "run_stage", "prefixed"]

_KIND = {"val": "validation", "test": "test", "predict": "predict"}
_ENTRY = {"val": "validate", "test": "test", "predict": "predict"}


class Loader(NamedTuple):
    """One loader of an evaluation or prediction stage: its metric-name suffix (None when the
    stage has one loader), its data source, and the step that runs over it."""

    name: str | None
    source: Any
    step: Any


def prefixed(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Metric names under a stage prefix (``loss`` -> ``val/loss``); names with a ``/`` are kept
    (a member suffix ``/member_<i>`` aside: ``loss/member_2`` -> ``val/loss/member_2``).

    Example:
        >>> prefixed({"loss": 1.0, "x/y": 2.0, "loss/member_1": 3.0}, "val")
        {'val/loss': 1.0, 'x/y': 2.0, 'val/loss/member_1': 3.0}
    """
    return {renamed(k, lambda n: n if "/" in n else f"{prefix}/{n}"): v for k, v in metrics.items()}


def eval_loaders(
    data: Any, step: Any, *, seed: int, stage: str, parallel: Parallel | None = None, shard: bool = True
) -> list[Loader]:
    """The loaders of ``data`` (one, a list or a dict: see :mod:`fnloop.loops.loaders`), each
    with its source (this rank's share of it in a distributed run, unless ``shard=False``) and step."""
    split = split_loaders(data)
    what = {"val": "val_step", "test": "eval_step", "predict": "predict_step"}[stage]
    return [
        Loader(name, make_source(d, seed=seed, stage=stage, parallel=parallel, shard=shard), step_for(step, split, i, what=what))
        for i, (name, d) in enumerate(split)
    ]


def grad_mode(inference: bool) -> Any:
    """``torch.inference_mode()`` or ``torch.no_grad()`` (``Trainer(inference_mode=...)``).

    Example:
        >>> with grad_mode(False):
        ...     torch.is_grad_enabled()
        False
    """
    return torch.inference_mode() if inference else torch.no_grad()


def evaluate(
    state: Any,
    loaders: list[Loader],
    n_batches: Callable[[Any], int | None],
    hooks: Hooks,
    *,
    kind: str,
    prefix: str,
    epoch: int = 0,
    inference: bool = True,
    parallel: Parallel | None = None,
) -> tuple[Any, dict[str, float]]:
    """Run every loader's step over its first ``n_batches(source)`` batches; returns the state
    the batch hooks left and the metrics (batch-size weighted means, or each name's reduction:
    ``*_max``/``*_min``/``*_sum``), one host sync per loader.

    Calls ``on_{kind}_epoch_start``, ``on_{kind}_batch_start/_end`` and ``on_{kind}_epoch_end``.
    Steps run under ``torch.inference_mode()`` (``inference``) or ``torch.no_grad()``. In a
    distributed run each loader's metrics are then reduced across the ranks (``parallel``),
    weighted by each rank's samples.
    """
    acc = Accumulator()
    device, dtype = device_of(state.params), params_dtype(state)
    metrics: dict[str, float] = {}
    state = hooks(f"on_{kind}_epoch_start", state)
    start, end = f"on_{kind}_batch_start", f"on_{kind}_batch_end"
    for idx, loader in enumerate(loaders):
        accs, samples = acc.init(), 0
        for batch_idx, batch in enumerate(batches_on(loader.source, epoch, 0, n_batches(loader.source), device, dtype)):
            state = hooks(start, state, batch, batch_idx, idx)
            size = loader.source.batch_size_of(batch)
            with grad_mode(inference):
                out = loader.step(state, batch)
                accs = acc.update(accs, out, size)
            samples += size
            state = hooks(end, state, out, batch, batch_idx, idx)
        values = expand(suffixed(prefixed(acc.compute(accs), prefix), loader.name))  # [N]: mean and members
        if parallel is not None:
            values = parallel.reduce_metrics(values, samples)
        metrics.update(values)
    state = hooks(f"on_{kind}_epoch_end", state)
    return state, metrics


def run_stage(
    trainer: Trainer, state: TrainState, eval_step: EvalStepFn | Sequence[EvalStepFn] | Mapping[str, EvalStepFn], data: Any, *, stage: str, datamodule: Any = None, verbose: bool = True
) -> dict[str, float]:
    """``Trainer.validate`` / ``Trainer.test``: metrics as ``{"val/loss": ...}``; the progress bar
    (``enable_progress_bar``) prints them as a table unless ``verbose`` is False."""
    from fnloop.callbacks.progress import ProgressBar
    from fnloop.execution import check_not_donated

    entry = _ENTRY[stage]
    check_not_donated(state, f"Trainer.{entry}")
    eval_step = for_state(state, eval_step, what=f"Trainer.{entry}")  # a stacked state: over its members
    data = require(
        stage_data(data, datamodule, stage), f"{stage} data", f"pass data= or a datamodule with a {stage}_data() method"
    )
    from fnloop.connectors.accelerator import prepare_state
    from fnloop.connectors.launch import connect
    from fnloop.connectors.precision import resolve_precision

    parallel = connect(trainer)
    state = prepare_state(state, parallel, resolve_precision(trainer.precision))
    loaders = eval_loaders(
        data, eval_step, seed=data_seed(trainer.seed, state), stage=stage, parallel=parallel, shard=trainer.use_distributed_sampler
    )
    limit = trainer.limit(stage)
    callbacks = trainer.callback_list
    if trainer.enable_progress_bar and verbose and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks = [*callbacks, ProgressBar()]
    hooks, kind = Hooks(on_this_rank(callbacks, parallel)), _KIND[stage]
    loggers = loggers_on(trainer, parallel)
    with hooks.on_failure(state):
        state = hooks("setup", state, entry)
        state = hooks(f"on_{kind}_start", state)
        state, metrics = evaluate(
            state, loaders, lambda s: limited(s, 0, limit, stage), hooks, kind=kind, prefix=stage,
            inference=trainer.inference_mode, parallel=parallel,
        )
        if metrics:
            loggers.log_metrics(metrics, step=state.loop.global_step)
        state = hooks(f"on_{kind}_end", state, metrics)
        hooks("teardown", state, entry)
    loggers.finalize("finished")
    return metrics
