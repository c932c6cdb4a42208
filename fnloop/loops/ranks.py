"""What each rank of a distributed run does besides the steps: rank 0 alone performs the
effects (loggers, checkpoint files, printing, the progress bar, the model summary, prediction
files); every rank runs the other callbacks, which may change the state.

Example:
    >>> import fnloop as fl
    >>> from fnloop.connectors.strategy import Parallel
    >>> on_this_rank([fl.ProgressBar()], Parallel()) != []
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fnloop.connectors.strategy import Parallel

__all__ = ["loggers_on", "on_this_rank", "params_dtype"]


def _effects() -> tuple[type, ...]:
    from fnloop.callbacks.model_summary import ModelSummary
    from fnloop.callbacks.prediction_writer import PredictionWriter
    from fnloop.callbacks.progress import ProgressBar
    from fnloop.checkpoint.callback import ModelCheckpoint

    return (ProgressBar, ModelSummary, PredictionWriter, ModelCheckpoint)


def on_this_rank(callbacks: Sequence[Any], parallel: Parallel) -> list[Any]:
    """``callbacks`` without the rank-0 effects (progress bar, model summary, prediction
    writer, checkpoints) on the other ranks of a distributed run."""
    if parallel.is_global_zero:
        return list(callbacks)
    effects = _effects()
    return [c for c in callbacks if not isinstance(c, effects)]


def loggers_on(loggers: Any, parallel: Parallel) -> Any:
    """``loggers`` on rank 0, a :class:`fnloop.loggers.NullLogger` on the others (which then
    create no run folder).

    Example:
        >>> from fnloop.connectors.strategy import Parallel
        >>> from fnloop.loggers import NullLogger
        >>> sinks = NullLogger()
        >>> loggers_on(sinks, Parallel()) is sinks, type(loggers_on(sinks, Parallel(rank=1, world_size=2))).__name__
        (True, 'NullLogger')
    """
    from fnloop.loggers import NullLogger

    return loggers if parallel.is_global_zero else NullLogger()


def params_dtype(state: Any) -> Any:
    """The dtype of the state's params (batches are cast to it under a ``*-true`` precision)."""
    return next(iter(state.params.values())).dtype if state.params else None
