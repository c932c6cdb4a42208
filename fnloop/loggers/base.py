"""The logger protocol, the sink that does nothing and the one that fans out to several.

A sink receives plain Python numbers at logging boundaries (the driver turns step metrics
into floats once); one-element tensors are accepted and converted with ``float()``. Only
global rank 0 writes: on any other rank every sink is a no-op.

Example:
    >>> import io
    >>> from fnloop.loggers import ConsoleLogger, LoggerCollection, NullLogger
    >>> out = io.StringIO()
    >>> logs = LoggerCollection([ConsoleLogger(stream=out), NullLogger()])
    >>> logs.log_metrics({"loss": 0.5}, step=10)
    >>> out.getvalue()
    'step 10  loss=0.5\\n'
    >>> logs.finalize("finished")
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from fnloop.errors import ConfigError
from fnloop.loggers.rank import global_rank, is_global_zero
from fnloop.loggers.run_dir import RunDir

__all__ = [
    "STATUSES",
    "Logger",
    "NullLogger",
    "LoggerCollection",
    "global_rank",
    "is_global_zero",
    "to_scalar",
    "scalar_metrics",
    "check_status",
]

STATUSES: tuple[str, ...] = ("finished", "interrupted", "failed")
"""The values :meth:`Logger.finalize` accepts."""


@runtime_checkable
class Logger(Protocol):
    """A metrics sink. Implementations write on global rank 0 only."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record ``metrics`` (name -> number) at ``step``."""
        ...

    def log_hparams(
        self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None
    ) -> None:
        """Record the run's hyperparameters, and optionally metrics that summarise it."""
        ...

    def finalize(self, status: str) -> None:
        """Flush and close; ``status`` is one of :data:`STATUSES`. Calling it again is a no-op."""
        ...

    @property
    def log_dir(self) -> str | None:
        """Where this sink writes; ``None`` when it writes no files."""
        ...


def to_scalar(value: Any, key: str = "value") -> int | float:
    """``value`` as a Python int or float; one-element tensors go through ``float()``.

    Args:
        value: a number (bool counts as int), a one-element tensor or a numpy scalar.
        key: the metric name, used in the error message.

    Raises:
        ConfigError: ``value`` is not a number.

    Example:
        >>> import torch
        >>> to_scalar(torch.tensor(0.25)), to_scalar(3), to_scalar(float("nan"), "loss")
        (0.25, 3, nan)
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ConfigError(
                f"metric {key!r} is a tensor of shape {tuple(value.shape)}: loggers take one "
                "number per key; reduce it (e.g. .mean()) before logging"
            )
        return float(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) or hasattr(value, "__float__"):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ConfigError(
        f"metric {key!r} has a value of type {type(value).__name__}: loggers take numbers "
        "(int, float or a one-element tensor); log text as a hyperparameter instead"
    )


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, int | float]:
    """``metrics`` with every value made a Python number by :func:`to_scalar`.

    Raises:
        ConfigError: a key is not a string or a value is not a number.

    Example:
        >>> import torch
        >>> scalar_metrics({"loss": torch.tensor(1.5), "epoch": 2})
        {'loss': 1.5, 'epoch': 2}
    """
    out: dict[str, int | float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ConfigError(f"metric key {key!r} is not a string: name metrics with str keys")
        out[key] = to_scalar(value, key)
    return out


def check_status(status: str) -> str:
    """``status`` if it is one of :data:`STATUSES`.

    Raises:
        ConfigError: any other value.

    Example:
        >>> check_status("finished")
        'finished'
    """
    if status not in STATUSES:
        raise ConfigError(f"finalize(status={status!r}): status must be one of {STATUSES}")
    return status


class NullLogger:
    """A sink that records nothing.

    Example:
        >>> NullLogger().log_metrics({"loss": 1.0}, step=0)
        >>> NullLogger().log_dir is None
        True
    """

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Does nothing."""

    def log_hparams(
        self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None
    ) -> None:
        """Does nothing."""

    def log_checkpoint(self, path: str) -> None:
        """Does nothing."""

    def finalize(self, status: str) -> None:
        """Checks ``status`` and does nothing else."""
        check_status(status)

    @property
    def log_dir(self) -> str | None:
        """Always ``None``."""
        return None


class LoggerCollection:
    """Fans every call out to several sinks, which share one run folder.

    File sinks (those holding a :class:`~fnloop.loggers.run_dir.RunDir`) built without an
    explicit ``log_dir`` are pointed at one shared folder: ``run_dir`` when given, otherwise
    the folder of the first sink with the same ``(root_dir, name, version)``. A sink whose
    folder was already created keeps it.

    Args:
        loggers: the sinks; nested collections are flattened.
        run_dir: a :class:`RunDir` or a folder path for every file sink without ``log_dir``.

    Example:
        >>> import tempfile
        >>> from fnloop.loggers import CSVLogger, JSONLLogger
        >>> root = tempfile.mkdtemp()
        >>> logs = LoggerCollection([CSVLogger(root, "exp"), JSONLLogger(root, "exp")])
        >>> logs.log_metrics({"loss": 0.5}, step=1)
        >>> logs.finalize("finished")
        >>> logs.loggers[0].log_dir == logs.loggers[1].log_dir
        True
    """

    def __init__(
        self,
        loggers: Iterable[Logger] = (),
        *,
        run_dir: RunDir | str | os.PathLike[str] | None = None,
    ) -> None:
        flat: list[Logger] = []
        for sink in loggers:
            if isinstance(sink, LoggerCollection):
                flat.extend(sink.loggers)
            elif sink is not None:
                flat.append(sink)
        self._loggers = tuple(flat)
        if run_dir is not None and not isinstance(run_dir, RunDir):
            run_dir = RunDir(log_dir=run_dir)
        self._share_run_dir(run_dir)

    def _share_run_dir(self, shared: RunDir | None) -> None:
        first: dict[tuple[Any, ...], RunDir] = {}
        for sink in self._loggers:
            own = getattr(sink, "run_dir", None)
            if not isinstance(own, RunDir) or own.explicit is not None:
                continue
            target = shared if shared is not None else first.setdefault(own.key, own)
            if target is not own and not own.resolved:
                sink.use_run_dir_(target)  # type: ignore[attr-defined]

    @property
    def loggers(self) -> tuple[Logger, ...]:
        """The sinks, in call order."""
        return self._loggers

    def __iter__(self) -> Iterator[Logger]:
        return iter(self._loggers)

    def __len__(self) -> int:
        return len(self._loggers)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Convert ``metrics`` once with :func:`scalar_metrics` and pass them to every sink."""
        values = scalar_metrics(metrics)
        step = int(step)
        for sink in self._loggers:
            sink.log_metrics(values, step)

    def log_hparams(
        self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None
    ) -> None:
        """Pass the hyperparameters (and metrics) to every sink."""
        values = None if metrics is None else scalar_metrics(metrics)
        for sink in self._loggers:
            sink.log_hparams(params, values)

    def log_checkpoint(self, path: str) -> None:
        """Hand the final checkpoint's folder to the sinks that store checkpoints (``log_checkpoint``)."""
        for sink in self._loggers:
            if callable(getattr(sink, "log_checkpoint", None)):
                sink.log_checkpoint(path)

    def finalize(self, status: str) -> None:
        """Finalize every sink, even when one fails; the first error is raised afterwards."""
        check_status(status)
        error: BaseException | None = None
        for sink in self._loggers:
            try:
                sink.finalize(status)
            except Exception as err:  # noqa: BLE001 - re-raised below
                error = error or err
        if error is not None:
            raise error

    @property
    def log_dir(self) -> str | None:
        """The first sink's folder that is not ``None`` (reading it creates the folder)."""
        for sink in self._loggers:
            path = sink.log_dir
            if path is not None:
                return path
        return None
