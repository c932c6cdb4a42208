"""Early stopping with Lightning's semantics, its counters kept in the state."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fnloop.callbacks.base import Callback, callback_state, request_stop, with_callback_state
from fnloop.errors import ConfigError
from fnloop.members import active, is_stacked, member_values, stop_members

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Stop when a monitored validation metric stops improving.

    After each validation run: stop if the value is not finite (``check_finite``), if it
    reached ``stopping_threshold``, or if it crossed ``divergence_threshold``; otherwise an
    improvement by more than ``min_delta`` resets the wait counter, and ``patience`` runs
    without one stop training. The best score and the counter live in
    ``state.loop.callbacks["EarlyStopping[<monitor>]"]``.

    Over a stacked state (``Trainer.fit(fl.stack(states), ...)``), each member checks its own
    value (``<monitor>/member_<i>``) with its own record (``{"members": [record_0, ...]}``, each
    what a fit of that member alone holds). A member that stops stops training: its params,
    optimizer state and counters stay as they are (:func:`fnloop.members.stop_members`), its
    record no longer changes; the fit stops when every member has stopped. ``min_epochs`` and
    ``min_steps`` hold back the end of the fit, not the stop of a member.

    Args:
        monitor: metric name as logged, e.g. ``"val/loss"``.
        min_delta: minimum change that counts as an improvement.
        patience: validation runs without improvement before stopping.
        mode: ``"min"`` or ``"max"``.
        strict: raise if the metric is missing (else skip the check).
        check_finite: stop when the metric is NaN or infinite.
        stopping_threshold: stop as soon as the metric is better than this.
        divergence_threshold: stop as soon as the metric is worse than this.

    Example:
        >>> import fnloop as fl
        >>> cb = fl.EarlyStopping("val/loss", patience=3)
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise ConfigError(f"EarlyStopping(mode={mode!r}): mode must be 'min' or 'max'")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
            raise ConfigError(f"EarlyStopping(patience={patience!r}): patience must be an int >= 0")
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"EarlyStopping(monitor={monitor!r}): give the metric name, e.g. 'val/loss'")
        self.monitor = monitor
        self.min_delta = abs(float(min_delta))
        self.patience = patience
        self.mode = mode
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold

    @property
    def state_key(self) -> str:
        return f"EarlyStopping[{self.monitor}]"

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def _update(self, record: dict[str, Any], current: float, epoch: int) -> tuple[dict[str, Any], bool]:
        """One run's record after a validation that measured ``current``, and whether it stops."""
        record = dict(record)
        stop, reason = False, ""
        delta = -self.min_delta if self.mode == "min" else self.min_delta
        if self.check_finite and not math.isfinite(current):
            stop, reason = True, f"{self.monitor} = {current} is not finite"
        elif self.stopping_threshold is not None and self._better(current, self.stopping_threshold):
            stop, reason = True, f"{self.monitor} = {current} reached the stopping threshold {self.stopping_threshold}"
        elif self.divergence_threshold is not None and self._better(self.divergence_threshold, current):
            stop, reason = True, f"{self.monitor} = {current} crossed the divergence threshold {self.divergence_threshold}"
        elif self._better(current - delta, record["best_score"]):
            record["best_score"], record["wait_count"] = current, 0
        else:
            record["wait_count"] += 1
            if record["wait_count"] >= self.patience:
                stop = True
                reason = f"{self.monitor} did not improve in the last {record['wait_count']} validations (best {record['best_score']})"
        if stop:
            record["stopped_epoch"] = epoch
            record["reason"] = reason
        return record, stop

    def _fresh(self) -> dict[str, Any]:
        return {"best_score": math.inf if self.mode == "min" else -math.inf, "wait_count": 0, "stopped_epoch": -1}

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> Any:
        if is_stacked(state):
            values = member_values(metrics, self.monitor, int(state.step.shape[0]))
            if values is not None:
                return self._members(state, values)
        if self.monitor not in metrics:
            if self.strict:
                raise ConfigError(
                    f"EarlyStopping: monitor {self.monitor!r} is not among the validation metrics "
                    f"{sorted(metrics)}; set monitor to one of them (or strict=False)"
                )
            return None
        record = callback_state(state, self.state_key, self._fresh())
        record, stop = self._update(record, float(metrics[self.monitor]), state.loop.epoch)
        state = with_callback_state(state, self.state_key, record)
        return request_stop(state) if stop else state

    def _members(self, state: Any, values: list[float]) -> Any:
        """Each member that still trains checks its own value; those that stop are stopped (their
        tensors stay as they are); the fit stops when no member trains."""
        mask = active(state) or [True] * len(values)
        records = list(callback_state(state, self.state_key, {"members": [self._fresh()] * len(values)})["members"])
        stopped = []
        for i, current in enumerate(values):
            if mask[i]:
                records[i], stop = self._update(records[i], current, state.loop.epoch)
                stopped += [i] if stop else []
        state = with_callback_state(state, self.state_key, {"members": records})
        if stopped:
            state = stop_members(state, stopped)
        now = active(state)
        return request_stop(state) if now is not None and not any(now) else state
