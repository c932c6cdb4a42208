"""The callback protocol: hooks receive the state and may return a new one.

Hook order during ``Trainer.fit``::

    on_fit_start
    (sanity validation: no hooks)
    for each epoch:
        on_train_epoch_start
        for each batch:
            on_train_batch_end            # after the step; metrics are tensors (do not sync)
            log / on_log                  # every log_every_n_steps optimizer steps
            on_validation_end             # when a validation run finishes (floats)
        on_train_epoch_end
    on_fit_end                            # also after an interruption
    on_exception                          # instead of on_fit_end when fit raises

A hook that changes training returns a new state (``state.replace(loop=...)``); returning
``None`` keeps the state. Effects (printing, logging, files) are allowed; mutating the state
is not. A callback's own counters live in ``state.loop.callbacks[callback.state_key]`` so a
checkpoint holds them.

Example:
    >>> import fnloop as fl
    >>> class StopAt(fl.Callback):
    ...     def on_train_batch_end(self, state, metrics):
    ...         if state.loop.global_step >= 10:
    ...             return fl.request_stop(state)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["Callback", "request_stop", "callback_state", "with_callback_state"]


class Callback:
    """Base class with no-op hooks; override the ones you need."""

    @property
    def state_key(self) -> str:
        """Key of this callback's entry in ``state.loop.callbacks``."""
        return type(self).__name__

    def on_fit_start(self, state: Any) -> Any:
        """Before the first training batch (after a checkpoint restore)."""

    def on_train_epoch_start(self, state: Any) -> Any:
        """At the start of each training epoch (also a resumed one)."""

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> Any:
        """After each train step; ``metrics`` are the step's tensors."""

    def on_train_epoch_end(self, state: Any) -> Any:
        """After the last batch of an epoch."""

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> Any:
        """After a validation run (not the sanity check); ``metrics`` like ``{"val/loss": 0.3}``."""

    def on_fit_end(self, state: Any) -> Any:
        """When fit returns (finished or interrupted)."""

    def on_exception(self, state: Any, exception: BaseException) -> None:
        """When fit raises; ``state`` is the last state reached."""

    def log(self, state: Any) -> Mapping[str, float]:
        """Extra values to log at each logging boundary (e.g. the learning rate)."""
        return {}

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        """Called with everything logged at a boundary (progress bars show it)."""


def request_stop(state: Any) -> Any:
    """The state with the stop flag set: fit stops at the next check (once min_epochs/min_steps
    are met).

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> s = fl.TrainState.create(torch.nn.Linear(1, 1), flo.sgd(lr=0.1))
        >>> fl.request_stop(s).loop.stop
        True
    """
    return state.replace(loop=state.loop.replace(stop=True))


def callback_state(state: Any, key: str, default: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the callback's entry in ``state.loop.callbacks`` (``default`` when absent)."""
    return dict(state.loop.callbacks.get(key, default))


def with_callback_state(state: Any, key: str, value: Mapping[str, Any]) -> Any:
    """The state with ``state.loop.callbacks[key]`` replaced (a new dict, the old one untouched)."""
    from fnloop.state import CallbackStates

    callbacks = CallbackStates({**state.loop.callbacks, key: dict(value)})
    return state.replace(loop=state.loop.replace(callbacks=callbacks))
