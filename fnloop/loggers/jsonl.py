"""JSON Lines sink: one object ``{"step": s, "metrics": {...}, "time": t}`` per line.

Each line is appended and flushed at once, so a crash loses at most the line being written.
Non-finite numbers are written as ``NaN``, ``Infinity`` and ``-Infinity``, as Python's
``json`` module does; ``json.loads`` reads them back (strict JSON parsers reject them).
``time`` is ``time.time()`` when the line was written. Hyperparameters go to ``hparams.yaml``.

Example:
    >>> import json, tempfile
    >>> sink = JSONLLogger(log_dir=tempfile.mkdtemp())
    >>> sink.log_metrics({"loss": float("nan")}, step=3)
    >>> sink.finalize("finished")
    >>> with open(sink.metrics_path) as f:
    ...     line = json.loads(f.readline())
    >>> line["step"], line["metrics"]
    (3, {'loss': nan})
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import IO, Any

from fnloop.errors import ConfigError
from fnloop.loggers.base import check_status, scalar_metrics
from fnloop.loggers.file_logger import FileLogger

__all__ = ["JSONLLogger"]


class JSONLLogger(FileLogger):
    """Metrics as JSON Lines in ``<log_dir>/<filename>``, hyperparameters in ``hparams.yaml``.

    Args:
        root_dir: folder holding every run.
        name: experiment name; the run folder is ``root_dir/name/version_<n>``.
        version: ``None`` for the next free version, an int, or a folder name.
        log_dir: write into exactly this folder instead of a versioned one.
        filename: name of the metrics file; an existing file is appended to.

    Example:
        >>> import tempfile
        >>> sink = JSONLLogger(tempfile.mkdtemp(), "exp")
        >>> sink.log_metrics({"lr": 0.1}, step=0)
        >>> sink.finalize("finished")
        >>> sink.metrics_path.endswith("exp/version_0/metrics.jsonl")
        True
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str] = "runs",
        name: str | None = "default",
        version: int | str | None = None,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        filename: str = "metrics.jsonl",
    ) -> None:
        super().__init__(root_dir, name, version, log_dir=log_dir)
        if not filename or os.sep in filename:
            raise ConfigError(f"JSONLLogger(filename={filename!r}): give a plain file name")
        self.filename = filename
        self._file: IO[str] | None = None

    @property
    def metrics_path(self) -> str | None:
        """Path of the metrics file (``None`` on ranks other than 0)."""
        folder = self._folder()
        return None if folder is None else os.path.join(folder, self.filename)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one line and flush it."""
        values = self._prepare(metrics, step)
        if values is None:
            return
        line = json.dumps({"step": self._last_step, "metrics": values, "time": time.time()})
        if self._file is None:
            path = self.metrics_path
            if path is None:
                return
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finalize
        self._file.write(line + "\n")
        self._file.flush()

    def log_hparams(
        self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None
    ) -> None:
        """Merge ``params`` into ``hparams.yaml``; ``metrics`` become a line at the last step."""
        values = scalar_metrics(metrics or {})
        if self._write_hparams(params) is not None and values:
            self.log_metrics(values, self._last_step)

    def finalize(self, status: str) -> None:
        """Close the file. Safe to call again; a later line reopens it for appending."""
        check_status(status)
        if self._file is not None:
            self._file.close()
            self._file = None
