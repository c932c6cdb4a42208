"""The callback protocol: hooks receive the state and may return a new one.

Hook order during ``Trainer.fit`` (Lightning's order; ``tests/callbacks/test_hook_order.py``
pins it against a real Lightning run)::

    setup(state, "fit")
    on_fit_start
    on_sanity_check_start                 # when a sanity check runs
        on_validation_start, on_validation_epoch_start,
        on_validation_batch_start / _end (per batch), on_validation_epoch_end
    on_sanity_check_end
    on_train_start
    for each epoch:
        on_train_epoch_start
        for each batch:
            on_train_batch_start
            on_before_optimizer_step      # at optimizer steps; gradient norms are opt-in
            on_train_batch_end            # after the step; metrics are tensors (do not sync)
            log / on_log                  # every log_every_n_steps optimizer steps
            on_validation_start ... on_validation_end(state, metrics)   # a validation run
        on_train_epoch_end
    on_train_end
    on_fit_end                            # also after an interruption
    teardown(state, "fit")
    on_exception                          # instead of on_train_end/on_fit_end when fit raises

``validate``/``test``/``predict`` call ``setup``, ``on_{stage}_start``,
``on_{stage}_epoch_start``, the batch hooks, ``on_{stage}_epoch_end``, ``on_{stage}_end`` and
``teardown``. The sanity check calls the validation hooks except ``on_validation_end``: that
hook carries the results EarlyStopping and ModelCheckpoint act on, and a sanity check has none.
Checkpoints call ``on_save_checkpoint(state, metadata) -> metadata`` (the dict returned is
stored in the checkpoint's metadata) and ``on_load_checkpoint(state, metadata)``.

A hook that changes training returns a new state (``state.replace(loop=...)``); returning
``None`` keeps the state. Effects (printing, logging, files) are allowed; mutating the state
is not. A callback's own counters live in ``state.loop.callbacks[callback.state_key]`` so a
checkpoint holds them. Only the hooks a callback overrides are called, so an unused hook costs
nothing per batch.

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
    """Base class with no-op hooks; override the ones you need.

    ``stage`` is ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``; ``dataloader_idx`` is
    the position of the loader when a stage runs several (0 otherwise).

    Example:
        >>> import fnloop as fl
        >>> fl.Callback().on_fit_start(None) is None
        True
    """

    @property
    def state_key(self) -> str:
        """Key of this callback's entry in ``state.loop.callbacks``."""
        return type(self).__name__

    # --- around every stage ------------------------------------------------------------------

    def setup(self, state: Any, stage: str) -> Any:
        """When a stage begins, before anything else."""

    def teardown(self, state: Any, stage: str) -> Any:
        """When a stage ends (also after an interruption), after everything else."""

    def on_exception(self, state: Any, exception: BaseException) -> None:
        """When a stage raises; ``state`` is the last state reached."""

    # --- fit ---------------------------------------------------------------------------------

    def on_fit_start(self, state: Any) -> Any:
        """Before the sanity check and the first training batch (after a checkpoint restore)."""

    def on_fit_end(self, state: Any) -> Any:
        """When fit returns (finished or interrupted)."""

    def on_sanity_check_start(self, state: Any) -> Any:
        """Before the sanity validation batches."""

    def on_sanity_check_end(self, state: Any) -> Any:
        """After the sanity validation batches."""

    def on_train_start(self, state: Any) -> Any:
        """After the sanity check, before the first training epoch."""

    def on_train_end(self, state: Any) -> Any:
        """After the last training epoch, before ``on_fit_end``."""

    def on_train_epoch_start(self, state: Any) -> Any:
        """At the start of each training epoch (also a resumed one)."""

    def on_train_epoch_end(self, state: Any) -> Any:
        """After the last batch of an epoch (and the validation run it triggers); only for an
        epoch that completes (Lightning also calls it when ``max_steps`` stops mid-epoch)."""

    def on_train_batch_start(self, state: Any, batch: Any, batch_idx: int) -> Any:
        """Before each train step."""

    def on_before_optimizer_step(self, state: Any, grad_norms: Mapping[str, torch.Tensor]) -> Any:
        """At each optimizer step, with the norms of the gradients the optimizer was given
        (tensors, no host read). The step is pure, so this runs once it returns, before
        ``on_train_batch_end``. Opt-in: the norms come from ``flo.track_grad_norms()`` chained
        first in the optimizer (``flo.tracked_grads(state.opt_state)`` gives the gradients with
        ``keep_grads=True``); without it ``grad_norms`` is empty and the default step computes
        nothing extra."""

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> Any:
        """After each train step; ``metrics`` are the step's tensors."""

    # --- evaluation (validation inside fit, validate, test) -------------------------------------

    def on_validation_start(self, state: Any) -> Any:
        """Before a validation run (also the sanity check)."""

    def on_validation_epoch_start(self, state: Any) -> Any:
        """Before the first batch of a validation run."""

    def on_validation_batch_start(self, state: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> Any:
        """Before each validation batch."""

    def on_validation_batch_end(
        self, state: Any, metrics: Mapping[str, torch.Tensor], batch: Any, batch_idx: int, dataloader_idx: int
    ) -> Any:
        """After each validation batch; ``metrics`` are the eval step's tensors."""

    def on_validation_epoch_end(self, state: Any) -> Any:
        """After the last batch of every loader of a validation run."""

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> Any:
        """After a validation run (not the sanity check); ``metrics`` like ``{"val/loss": 0.3}``."""

    def on_test_start(self, state: Any) -> Any:
        """Before ``Trainer.test`` runs its loaders."""

    def on_test_epoch_start(self, state: Any) -> Any:
        """Before the first test batch."""

    def on_test_batch_start(self, state: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> Any:
        """Before each test batch."""

    def on_test_batch_end(
        self, state: Any, metrics: Mapping[str, torch.Tensor], batch: Any, batch_idx: int, dataloader_idx: int
    ) -> Any:
        """After each test batch."""

    def on_test_epoch_end(self, state: Any) -> Any:
        """After the last test batch of every loader."""

    def on_test_end(self, state: Any, metrics: Mapping[str, float]) -> Any:
        """After ``Trainer.test``; ``metrics`` like ``{"test/loss": 0.3}``."""

    # --- prediction ------------------------------------------------------------------------------

    def on_predict_start(self, state: Any) -> Any:
        """Before ``Trainer.predict`` runs its loaders."""

    def on_predict_epoch_start(self, state: Any) -> Any:
        """Before the first prediction batch."""

    def on_predict_batch_start(self, state: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> Any:
        """Before each prediction batch."""

    def on_predict_batch_end(self, state: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> Any:
        """After each prediction batch; ``outputs`` is what the predict step returned."""

    def on_predict_epoch_end(self, state: Any) -> Any:
        """After the last prediction batch of every loader."""

    def on_predict_end(self, state: Any) -> Any:
        """After ``Trainer.predict``."""

    # --- checkpoints and logging -------------------------------------------------------------------

    def on_save_checkpoint(self, state: Any, metadata: dict[str, Any]) -> dict[str, Any] | None:
        """When a checkpoint of ``state`` is saved: return the JSON-serialisable ``metadata`` to
        store with it (add keys to it), or None to keep it as is."""

    def on_load_checkpoint(self, state: Any, metadata: Mapping[str, Any]) -> Any:
        """After fit restored ``state`` from a checkpoint whose metadata is ``metadata``."""

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
