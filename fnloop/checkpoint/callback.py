"""Checkpointing during ``Trainer.fit``: a callback around a :class:`CheckpointManager`, and
resuming from ``ckpt_path``.

Example:
    >>> import fnloop as fl
    >>> mgr = fl.CheckpointManager("memory://doc/ckpt-callback", keep_last=2, every_n_steps=100)
    >>> trainer = fl.Trainer(max_epochs=1, callbacks=[fl.ModelCheckpoint(mgr)])
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from fnloop.callbacks.base import Callback, callback_state, with_callback_state
from fnloop.checkpoint.format import restore
from fnloop.checkpoint.manager import CheckpointManager
from fnloop.errors import CheckpointError

__all__ = ["ModelCheckpoint", "resume_from"]


class ModelCheckpoint(Callback):
    """Save the whole state through ``manager`` when its triggers ask (steps are optimizer
    steps, ``state.loop.global_step``), after each validation when it has no trigger, at the end
    of fit (``save_last``), and always when fit is interrupted (signal, Ctrl-C), so a run can
    resume exactly. The latest validation metrics go into each checkpoint's ``meta.json``
    (``keep_best``/``best()`` rank by them).

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
        p = manager._save_policy
        self._triggered = any(getattr(p, a, None) for a in ("every_n_steps", "every_n_epochs", "every_n_seconds"))

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
        self.manager.save(state, metrics=metrics, step=step, epoch=epoch)
        self.seconds += time.perf_counter() - t0

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
        try:
            self.manager.wait()
        except Exception:  # the original exception is the one to report
            pass


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
