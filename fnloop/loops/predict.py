"""The prediction loop: a predict step over a loader, outputs returned in order."""

from __future__ import annotations

from typing import Any

from fnloop.connectors.device import device_of
from fnloop.loops.data import batches_on, data_seed, limited, make_source, require, stage_data

__all__ = ["run_predict"]


def run_predict(trainer: Any, state: Any, predict_step: Any, data: Any, *, datamodule: Any = None) -> list[Any]:
    """``Trainer.predict``: the outputs of every batch, in data order."""
    from fnloop.execution import check_not_donated

    check_not_donated(state, "Trainer.predict")
    data = require(
        stage_data(data, datamodule, "predict"), "predict data", "pass data= or a datamodule with a predict_data() method"
    )
    source = make_source(data, seed=data_seed(trainer, state), stage="predict")
    n = limited(source, 0, trainer.limit("predict"), "predict")
    dtype = next(iter(state.params.values())).dtype if state.params else None  # *-true: batches in the params' dtype
    return [predict_step(state, batch) for batch in batches_on(source, 0, 0, n, device_of(state.params), dtype)]
