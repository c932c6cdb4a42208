"""Small built-in callbacks: learning-rate monitor and wall-clock timer."""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Mapping
from typing import Any

import torch

from fnloop.callbacks.base import Callback, request_stop
from fnloop.errors import ConfigError

__all__ = ["LearningRateMonitor", "Timer", "parse_duration"]


class LearningRateMonitor(Callback):
    """Logs the learning rate in force (read back from the optimizer state) as ``lr`` at every
    logging boundary.

    Example:
        >>> import fnloop as fl
        >>> trainer = fl.Trainer(max_epochs=1, callbacks=[fl.LearningRateMonitor()])
    """

    def __init__(self, key: str = "lr") -> None:
        self.key = key

    def log(self, state: Any) -> Mapping[str, float]:
        from fnloop.members import expand
        from fnloop.optim import learning_rate

        try:
            return expand({self.key: learning_rate(state.opt_state)})  # a stacked state: the mean and each member
        except ConfigError:
            return {}


def parse_duration(value: Any, *, flag: str = "max_time") -> float | None:
    """Seconds from ``"DD:HH:MM:SS"``, a ``timedelta``, a dict of timedelta arguments or a number.

    Example:
        >>> parse_duration("00:01:00:30")
        3630.0
    """
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, Mapping):
        try:
            seconds = datetime.timedelta(**value).total_seconds()
        except TypeError as e:
            raise ConfigError(f"{flag}={value!r}: {e}; use keys days/hours/minutes/seconds") from None
    elif isinstance(value, str) and re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", value):
        d, h, m, s = (int(x) for x in value.split(":"))
        seconds = float(((d * 24 + h) * 60 + m) * 60 + s)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigError(
            f"{flag}={value!r} is not a duration: use 'DD:HH:MM:SS', a datetime.timedelta, "
            "a dict like {'hours': 1}, or a number of seconds"
        )
    if seconds <= 0:
        raise ConfigError(f"{flag}={value!r}: the duration must be positive")
    return seconds


class Timer(Callback):
    """Stop training once ``duration`` of wall time has passed (checked after every batch);
    the time already spent is kept in the state so a resumed run continues the budget.

    Example:
        >>> import fnloop as fl
        >>> cb = fl.Timer("00:00:30:00")
    """

    def __init__(self, duration: Any) -> None:
        self.duration = parse_duration(duration, flag="Timer(duration)")
        self._start: float | None = None
        self._offset = 0.0

    def on_fit_start(self, state: Any) -> Any:
        self._start = time.monotonic()
        self._offset = float(state.loop.callbacks.get(self.state_key, {}).get("elapsed", 0.0))

    def elapsed(self) -> float:
        """Seconds of training so far, across resumes."""
        return self._offset + (time.monotonic() - self._start if self._start is not None else 0.0)

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> Any:
        if self.duration is not None and self.elapsed() >= self.duration:
            return self._record(request_stop(state))
        return None

    def _record(self, state: Any) -> Any:
        from fnloop.callbacks.base import with_callback_state

        return with_callback_state(state, self.state_key, {"elapsed": self.elapsed()})

    def on_train_epoch_end(self, state: Any) -> Any:
        return self._record(state)

    def on_fit_end(self, state: Any) -> Any:
        return self._record(state)
