"""Checkpointing during ``Trainer.fit``: a callback around a :class:`CheckpointManager`, and
resuming from ``ckpt_path``.

Example:
    >>> import fnloop as fl
    >>> mgr = fl.CheckpointManager("memory://doc/ckpt-callback", keep_last=2, every_n_steps=100)
    >>> trainer = fl.Trainer(max_epochs=1, callbacks=[fl.ModelCheckpoint(mgr)])
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from fnloop.callbacks.base import Callback, callback_state, with_callback_state
from fnloop.checkpoint import _sharded
from fnloop.checkpoint.format import restore
from fnloop.checkpoint.manager import CheckpointManager, NonFiniteState
from fnloop.checkpoint.members import MemberBest
from fnloop.members import is_stacked
from fnloop.errors import CheckpointError, ConfigError

__all__ = ["ModelCheckpoint", "resume_from", "default_checkpoint", "check_enable_checkpointing", "checkpoint_of_fit"]

_log = logging.getLogger("fnloop.checkpoint")


def _position(loop: Any) -> tuple[Any, ...]:
    """Where training stands: two states at the same position hold the same progress."""
    return (loop.epoch, loop.batch_idx, loop.total_batch_idx, loop.global_step, loop.val_count, loop.val_pending)


def _add_note(exception: BaseException, note: str) -> None:
    if hasattr(exception, "add_note"):  # Python 3.11+
        exception.add_note(note)


class ModelCheckpoint(Callback):
    """Save the whole state through ``manager`` when its triggers ask (steps are optimizer
    steps, ``state.loop.global_step``), after each validation when it has no trigger, at the end
    of fit (``save_last``), and always when fit is interrupted (signal, Ctrl-C) or fails with an
    exception (the last consistent state, status ``"failed"``, before the exception propagates;
    Lightning's ``OnExceptionCheckpoint``), so a run can resume exactly. The latest validation
    metrics go into each checkpoint's ``meta.json`` (``keep_best``/``best()`` rank by them).

    Over a stacked state (``fl.stack(states)``) the whole stack is saved (``monitor`` ranks it
    by the mean over members), and with ``monitor`` and ``keep_best`` each member's k best by
    its own value are kept in ``<directory>/member_<i>`` (see :mod:`fnloop.checkpoint.members`;
    :meth:`restore_member` reads them back).

    Args:
        manager: a :class:`CheckpointManager`, or the same arguments to build one.

    Example:
        >>> import fnloop as fl
        >>> cb = fl.ModelCheckpoint("memory://doc/mc", keep_best=1, monitor="val/loss")
    """

    metadata_hook: Any = None  # set by the driver: the callbacks' on_save_checkpoint, (state, meta) -> meta

    def __init__(self, manager: CheckpointManager | str | None = None, **kwargs: Any) -> None:
        if not isinstance(manager, CheckpointManager):
            manager = CheckpointManager(manager, **kwargs)
        self.manager = manager
        self.seconds = 0.0  # time spent in saves (the caller's side: snapshot only for async saves)
        self._saved_at: tuple[Any, ...] | None = None  # position of the last save, or of the state fit started from
        self.members = MemberBest(manager)  # a stacked state: each member's best (fnloop.checkpoint.members)
        p = manager._save_policy
        self._triggered = any(getattr(p, a, None) for a in ("every_n_steps", "every_n_epochs", "every_n_seconds"))

    def restore_member(self, i: int, like: Any, which: str | int = "best") -> Any:
        """Member i of a stacked fit, from its own checkpoints (``<directory>/member_<i>``, kept
        with ``monitor`` and ``keep_best``): ``"best"``, ``"last"`` or a step, restored like ``like``
        (e.g. ``fl.TrainState.create(model, tx)``).

        Example:
            >>> import fnloop as fl
            >>> fl.ModelCheckpoint("memory://doc/rm", keep_best=1, monitor="val/loss").restore_member(0, like=None)
            Traceback (most recent call last):
            ...
            fnloop.errors.CheckpointError: memory://doc/rm/member_0: no 'best' checkpoint here (0 checkpoints found)
        """
        if not self.members.enabled:
            raise ConfigError(
                "ModelCheckpoint.restore_member: needs monitor= and keep_best= (each member keeps its k best)"
            )
        return self.members.manager(i).restore(which, like=like)

    def _metrics(self, state: Any) -> dict[str, float]:
        return dict(callback_state(state, self.state_key, {}).get("metrics", {}))

    def save(self, state: Any) -> Any:
        """Save now (at ``state.loop.global_step``)."""
        self._timed_save(state, state.loop.global_step, state.loop.epoch, self._metrics(state))
        return state

    def _timed_save(self, state: Any, step: int, epoch: int, metrics: dict[str, float]) -> None:
        t0 = time.perf_counter()
        if self.metadata_hook is not None:
            metrics = self.metadata_hook(state, metrics)
        try:
            self.manager.save(state, metrics=metrics, step=step, epoch=epoch)
        except NonFiniteState as err:  # training diverged: the finite checkpoints stay, the loop decides
            _log.warning("fnloop: ModelCheckpoint skipped a save: %s", err)
            return
        self._saved_at = _position(state.loop)
        self.seconds += time.perf_counter() - t0

    def on_fit_start(self, state: Any) -> Any:
        self._saved_at = _position(state.loop)  # a failure before the first step has nothing new to save
        return state

    def _maybe(self, state: Any) -> Any:
        if self._triggered and self.manager.should_save(state.loop.global_step, state.loop.epoch):
            return self.save(state)
        return state

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> Any:
        return self._maybe(state)

    def on_train_epoch_end(self, state: Any) -> Any:
        # the driver calls this before advancing the epoch counter: decide on epochs completed
        done = state.replace(loop=state.loop.replace(epoch=state.loop.epoch + 1, batch_idx=0))
        if self._triggered and self.manager.should_save(state.loop.global_step, done.loop.epoch):
            self._timed_save(done, state.loop.global_step, done.loop.epoch, self._metrics(state))
        return state

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> Any:
        if self.members.enabled and is_stacked(state):  # each member's best, before the stack is saved
            t0 = time.perf_counter()
            state = self.members.update(state, metrics)
            self.seconds += time.perf_counter() - t0
        record = callback_state(state, self.state_key, {})
        record["metrics"] = {k: float(v) for k, v in metrics.items()}
        state = with_callback_state(state, self.state_key, record)
        return state if self._triggered else self.save(state)

    def on_fit_end(self, state: Any) -> Any:
        status = state.loop.status
        last = self.manager.last_saved_step
        if status == "interrupted" or (
            self.manager.should_save(state.loop.global_step, state.loop.epoch, final=True) and last != state.loop.global_step
        ):
            self.save(state)
        t0 = time.perf_counter()
        self.manager.wait()
        self.seconds += time.perf_counter() - t0
        return state

    def on_exception(self, state: Any, exception: BaseException) -> None:
        """Save ``state`` (the last consistent one) unless it was just saved; an error of the
        save is logged and noted on ``exception``, which fit then raises unchanged."""
        try:
            self.manager.wait()
        except Exception as err:  # the original exception is the one to report
            self._report(exception, "finishing the save in flight", err)
        if _position(state.loop) == self._saved_at:
            return
        if _sharded.is_sharded(state):  # the ranks save a sharded state together; after a failure they cannot
            why = CheckpointError("a sharded state is saved by every rank together, which a failed run cannot do")
            self._report(exception, "saving the state at failure", why)
            return
        try:
            self.save(state)
            self.manager.wait()
        except Exception as err:
            self._report(exception, "saving the state at failure", err)

    def _report(self, exception: BaseException, doing: str, err: Exception) -> None:
        note = f"fnloop: ModelCheckpoint failed {doing} in {self.manager.directory}: {err!r}"
        _log.error(note)
        _add_note(exception, note)


def default_checkpoint(trainer: Any) -> ModelCheckpoint:
    """The checkpoint callback ``Trainer(enable_checkpointing=True)`` adds when none is given:
    the latest epoch in ``<logger folder or default_root_dir or the current folder>/checkpoints``.

    Example:
        >>> import fnloop as fl
        >>> default_checkpoint(fl.Trainer(default_root_dir="/tmp/run")).manager.directory
        '/tmp/run/checkpoints'
    """
    folder = getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir or os.getcwd()
    return ModelCheckpoint(os.path.join(folder, "checkpoints"), keep_last=1, every_n_epochs=1)


def check_enable_checkpointing(flag: Any, callbacks: list[Callback]) -> None:
    """Validate ``Trainer(enable_checkpointing=...)`` against the callbacks (as Lightning does).

    Example:
        >>> check_enable_checkpointing(False, [ModelCheckpoint("memory://doc/x")])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fnloop.errors.ConfigError: Trainer(enable_checkpointing=False): callbacks hold a ModelCheckpoint; ...
    """
    if flag is not None and not isinstance(flag, bool):
        raise ConfigError(f"Trainer(enable_checkpointing={flag!r}): accepted values are True, False or None")
    if flag is False and any(isinstance(c, ModelCheckpoint) for c in callbacks):
        raise ConfigError(
            "Trainer(enable_checkpointing=False): callbacks hold a ModelCheckpoint; remove it or set "
            "enable_checkpointing=True (or None)"
        )


def checkpoint_of_fit(trainer: Any, chosen: ModelCheckpoint | None) -> ModelCheckpoint | None:
    """The checkpoint callback a fit uses: ``chosen`` (from ``fit(checkpoint=...)`` or the callbacks),
    Lightning's default one under ``enable_checkpointing=True``, none under ``False``.

    Example:
        >>> import fnloop as fl
        >>> checkpoint_of_fit(fl.Trainer(), None) is None
        True
    """
    if trainer.enable_checkpointing is False:
        if chosen is not None:
            raise ConfigError(
                "Trainer.fit(checkpoint=...): the Trainer has enable_checkpointing=False; drop checkpoint= or "
                "set enable_checkpointing=True (or None)"
            )
        return None
    if chosen is None and trainer.enable_checkpointing:
        return default_checkpoint(trainer)
    return chosen


def resume_from(ckpt_path: str, state: Any, manager: CheckpointManager | None) -> Any:
    """The state restored from ``ckpt_path`` (``"last"``, ``"best"``, a URL), checked against
    ``state``. ``"last"`` with no checkpoint yet starts from ``state`` with a warning."""
    if ckpt_path in ("last", "latest", "best"):
        if manager is None:
            raise CheckpointError(
                f"ckpt_path={ckpt_path!r} needs a checkpoint manager: fit(..., checkpoint=fl.CheckpointManager(...)) "
                "or a fl.ModelCheckpoint callback; or pass a checkpoint URL"
            )
        if ckpt_path != "best" and manager.latest() is None:
            warnings.warn(
                f"ckpt_path={ckpt_path!r}: no checkpoint in {manager.directory} yet; training starts from the given state",
                UserWarning,
                stacklevel=3,
            )
            return state
        return manager.restore(ckpt_path, like=state)
    return restore(ckpt_path, like=state)
