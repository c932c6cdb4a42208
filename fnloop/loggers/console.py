"""Console sink: one compact line per logging call, and the end-of-evaluation table.

Example:
    >>> print(format_metrics_table({"test/acc": 0.9125, "test/loss": 0.31}, "Test"))
    +-----------+--------+
    | Test      |  value |
    +-----------+--------+
    | test/acc  | 0.9125 |
    | test/loss |   0.31 |
    +-----------+--------+
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

from fnloop.errors import ConfigError
from fnloop.loggers.base import check_status, is_global_zero, scalar_metrics

__all__ = ["ConsoleLogger", "format_metrics_table", "format_value"]


def format_value(value: int | float, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits; ints whole; ``nan``/``inf`` as such.

    Example:
        >>> format_value(0.000123456), format_value(12), format_value(float("-inf"))
        ('0.0001235', '12', '-inf')
    """
    if isinstance(value, int):
        return str(value)
    return format(value, f".{digits}g")


class ConsoleLogger:
    """Prints ``step <n>  key=value  ...`` lines on global rank 0.

    Args:
        every: print one ``log_metrics`` call out of ``every`` (the 1st, the ``every+1``-th, ...).
        stream: where to print; ``None`` is whatever ``sys.stdout`` is at print time.

    Hyperparameters are not printed (they are in the file sinks).

    Example:
        >>> ConsoleLogger().log_metrics({"train/loss": 0.123456, "lr": 0.001}, step=50)
        step 50  train/loss=0.1235  lr=0.001
    """

    def __init__(self, every: int = 1, stream: TextIO | None = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"ConsoleLogger(every={every!r}): give an int >= 1")
        self.every = every
        self.stream = stream
        self._calls = 0
        self._writer: bool | None = None

    def _out(self) -> TextIO | None:
        if self._writer is None:
            self._writer = is_global_zero()
        if not self._writer:
            return None
        return self.stream if self.stream is not None else sys.stdout

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Print one line for every ``every``-th call."""
        out = self._out()
        if out is None:
            return
        values = scalar_metrics(metrics)
        print_now = self._calls % self.every == 0
        self._calls += 1
        if print_now:
            parts = [f"step {int(step)}"] + [f"{k}={format_value(v)}" for k, v in values.items()]
            out.write("  ".join(parts) + "\n")

    def log_hparams(
        self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None
    ) -> None:
        """Does nothing."""

    def finalize(self, status: str) -> None:
        """Flush the stream (it is not closed)."""
        check_status(status)
        out = self._out()
        if out is not None:
            out.flush()

    @property
    def log_dir(self) -> str | None:
        """Always ``None``: the console writes no files."""
        return None


def format_metrics_table(metrics: Mapping[str, float], title: str) -> str:
    """An aligned two-column table of ``metrics`` (key | value) under the header ``title``.

    Keys keep their order and are left-aligned; values get 6 significant digits and are
    right-aligned. The string has no trailing newline.

    Args:
        metrics: name -> number (one-element tensors are converted).
        title: the header of the key column, e.g. ``"Test"`` or ``"Validate"``.

    Example:
        >>> print(format_metrics_table({"val/loss": float("nan")}, "Validate"))
        +----------+-------+
        | Validate | value |
        +----------+-------+
        | val/loss |   nan |
        +----------+-------+
    """
    cells = [(key, format_value(value, 6)) for key, value in scalar_metrics(metrics).items()]
    key_width = max([len(title)] + [len(k) for k, _ in cells])
    value_width = max([len("value")] + [len(v) for _, v in cells])
    rule = f"+-{'-' * key_width}-+-{'-' * value_width}-+"
    lines = [rule, f"| {title:<{key_width}} | {'value':>{value_width}} |", rule]
    lines += [f"| {k:<{key_width}} | {v:>{value_width}} |" for k, v in cells]
    lines.append(rule)
    return "\n".join(lines)
