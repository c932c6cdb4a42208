"""The prediction loop: a predict step over one or several loaders, outputs returned in order
(or only handed to callbacks such as :class:`fnloop.PredictionWriter`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fnloop.connectors.device import device_of
from fnloop.loops.data import batches_on, data_seed, limited, require, stage_data
from fnloop.loops.evaluate import eval_loaders, grad_mode
from fnloop.loops.hooks import Hooks
from fnloop.loops.members import for_state
from fnloop.loops.ranks import on_this_rank, params_dtype

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from fnloop.state import TrainState
    from fnloop.trainer import Trainer
    from fnloop.types import PredictStepFn

__all__ = ["run_predict"]


def run_predict(
    trainer: Trainer, state: TrainState, predict_step: PredictStepFn | Sequence[PredictStepFn] | Mapping[str, PredictStepFn], data: Any, *, datamodule: Any = None, return_predictions: bool = True
) -> Any:
    """``Trainer.predict``: the outputs of every batch in data order; with several loaders, a
    list (or dict) of such lists, one per loader; None when ``return_predictions`` is False."""
    from fnloop.execution import check_not_donated

    check_not_donated(state, "Trainer.predict")
    data = require(
        stage_data(data, datamodule, "predict"), "predict data", "pass data= or a datamodule with a predict_data() method"
    )
    from fnloop.connectors.accelerator import prepare_state
    from fnloop.connectors.launch import connect
    from fnloop.connectors.precision import resolve_precision

    parallel = connect(trainer)
    state = prepare_state(state, parallel, resolve_precision(trainer.precision))
    # not sharded: every rank predicts every batch, so rank 0 (which alone writes files) and
    # every caller get all the predictions in data order
    predict_step = for_state(state, predict_step, what="Trainer.predict")  # a stacked state: over its members
    loaders = eval_loaders(data, predict_step, seed=data_seed(trainer.seed, state), stage="predict")
    limit = trainer.limit("predict")
    hooks = Hooks(on_this_rank(trainer.callback_list, parallel))
    device, dtype = device_of(state.params), params_dtype(state)
    with hooks.on_failure(state):
        state = hooks("setup", state, "predict")
        state = hooks("on_predict_start", state)
        state = hooks("on_predict_epoch_start", state)
        outputs: list[list[Any]] = []
        for idx, loader in enumerate(loaders):
            kept: list[Any] = []
            n = limited(loader.source, 0, limit, "predict")
            for batch_idx, batch in enumerate(batches_on(loader.source, 0, 0, n, device, dtype)):
                state = hooks("on_predict_batch_start", state, batch, batch_idx, idx)
                with grad_mode(trainer.inference_mode):
                    out = loader.step(state, batch)
                if return_predictions:
                    kept.append(out)
                state = hooks("on_predict_batch_end", state, out, batch, batch_idx, idx)
            outputs.append(kept)
        state = hooks("on_predict_epoch_end", state)
        state = hooks("on_predict_end", state)
        hooks("teardown", state, "predict")
    if not return_predictions:
        return None
    if loaders[0].name is None:
        return outputs[0]
    if isinstance(data, dict):
        return {loader.name: out for loader, out in zip(loaders, outputs)}
    return outputs
