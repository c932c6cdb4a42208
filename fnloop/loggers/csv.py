"""CSV sink: one row per ``log_metrics`` call, a ``step`` column and the union of all keys.

Rows are buffered in memory and written every ``flush_every`` rows and at ``finalize``.
While the set of keys stays the same, rows are appended; when a new key appears the file is
rewritten with the wider header (earlier rows kept, the new column left empty for them)
under a temporary name and renamed over the old one, so the file on disk is always whole.
Numbers are written with ``repr``, which keeps every float bit and writes ``nan``, ``inf``,
``-inf``; ``float()`` reads them back. Hyperparameters go to ``hparams.yaml``.

Example:
    >>> import csv, tempfile
    >>> sink = CSVLogger(log_dir=tempfile.mkdtemp())
    >>> sink.log_metrics({"train/loss": 0.5}, step=1)
    >>> sink.log_metrics({"train/loss": 0.25, "val/loss": 0.75}, step=2)
    >>> sink.finalize("finished")
    >>> with open(sink.metrics_path) as f:
    ...     list(csv.reader(f))
    [['step', 'train/loss', 'val/loss'], ['1', '0.5', ''], ['2', '0.25', '0.75']]
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from typing import Any

from fnloop._atomic import replacing
from fnloop.errors import ConfigError
from fnloop.loggers.base import check_status, scalar_metrics
from fnloop.loggers.file_logger import FileLogger

__all__ = ["CSVLogger"]

_STEP = "step"


class CSVLogger(FileLogger):
    """Metrics as CSV in ``<log_dir>/<filename>``, hyperparameters in ``hparams.yaml``.

    Args:
        root_dir: folder holding every run.
        name: experiment name; the run folder is ``root_dir/name/version_<n>``.
        version: ``None`` for the next free version, an int, or a folder name.
        log_dir: write into exactly this folder instead of a versioned one.
        filename: name of the metrics file.
        flush_every: rows buffered before they are written.

    A metrics file already in the folder (a resumed run) is continued: its header and rows
    are kept and new rows come after them.

    Example:
        >>> import tempfile
        >>> sink = CSVLogger(tempfile.mkdtemp(), "exp", flush_every=1)
        >>> sink.log_metrics({"lr": 0.1}, step=0)
        >>> sink.metrics_path.endswith("exp/version_0/metrics.csv")
        True
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str] = "runs",
        name: str | None = "default",
        version: int | str | None = None,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        filename: str = "metrics.csv",
        flush_every: int = 100,
    ) -> None:
        super().__init__(root_dir, name, version, log_dir=log_dir)
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ConfigError(f"CSVLogger(flush_every={flush_every!r}): give an int >= 1")
        if not filename or os.sep in filename:
            raise ConfigError(f"CSVLogger(filename={filename!r}): give a plain file name")
        self.filename = filename
        self.flush_every = flush_every
        self._keys: list[str] = [_STEP]
        self._rows: list[dict[str, int | float]] = []
        self._file_keys: list[str] | None = None  # header on disk; None: not read yet

    @property
    def metrics_path(self) -> str | None:
        """Path of the metrics file (``None`` on ranks other than 0)."""
        folder = self._folder()
        return None if folder is None else os.path.join(folder, self.filename)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer one row; write the buffer once it holds ``flush_every`` rows.

        Raises:
            ConfigError: a metric is named ``step`` or is not a number.
        """
        values = self._prepare(metrics, step)
        if values is None:
            return
        if _STEP in values:
            raise ConfigError(
                "CSVLogger: metric key 'step' is taken by the step column; rename the metric"
            )
        for key in values:
            if key not in self._keys:
                self._keys.append(key)
        self._rows.append({_STEP: self._last_step, **values})
        if len(self._rows) >= self.flush_every:
            self.flush()

    def log_hparams(
        self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None
    ) -> None:
        """Merge ``params`` into ``hparams.yaml``; ``metrics`` become a row at the last step."""
        values = scalar_metrics(metrics or {})
        if self._write_hparams(params) is not None and values:
            self.log_metrics(values, self._last_step)

    def flush(self) -> None:
        """Write the buffered rows now (no-op when none are buffered)."""
        if not self._rows:
            return
        path = self.metrics_path
        if path is None:
            self._rows.clear()
            return
        if self._file_keys is None:
            self._file_keys = self._read_header(path)
            extra = [k for k in self._keys if k not in self._file_keys]
            self._keys = (self._file_keys or [_STEP]) + [k for k in extra if k != _STEP]
        if self._file_keys == self._keys:
            with open(path, "a", newline="", encoding="utf-8") as f:
                self._write_rows(csv.writer(f), self._rows)
        else:
            self._rewrite(path)
        self._file_keys = list(self._keys)
        self._rows.clear()

    def finalize(self, status: str) -> None:
        """Write what is buffered. Safe to call again; later rows are appended."""
        check_status(status)
        self.flush()

    def _write_rows(self, writer: Any, rows: list[dict[str, int | float]]) -> None:
        keys = self._keys
        writer.writerows([[_cell(row.get(k)) for k in keys] for row in rows])

    @staticmethod
    def _read_header(path: str) -> list[str]:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                return next(csv.reader(f), [])
        except FileNotFoundError:
            return []

    def _rewrite(self, path: str) -> None:
        """Header, earlier rows (re-mapped to the wider header) and buffer, then rename."""
        with replacing(path, newline="") as out:
            writer = csv.writer(out)
            writer.writerow(self._keys)
            if os.path.exists(path):
                with open(path, newline="", encoding="utf-8") as old:
                    reader = csv.reader(old)
                    header = next(reader, [])
                    for cells in reader:
                        by_key = dict(zip(header, cells))
                        writer.writerow([by_key.get(k, "") for k in self._keys])
            self._write_rows(writer, self._rows)


def _cell(value: int | float | None) -> str:
    return "" if value is None else repr(value)
