"""The common part of the sinks that write files: their run folder, rank and last step.

Example:
    >>> import tempfile
    >>> from fnloop.loggers import JSONLLogger
    >>> sink = JSONLLogger(tempfile.mkdtemp(), "exp")
    >>> sink.run_dir.resolved                 # nothing is created before the first write
    False
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fnloop.errors import ConfigError
from fnloop.loggers.base import scalar_metrics
from fnloop.loggers.hparams import HPARAMS_FILENAME, to_plain, write_hparams_file
from fnloop.loggers.run_dir import RunDir

__all__ = ["FileLogger"]


class FileLogger:
    """Base of the file sinks: a lazily created :class:`RunDir` and the last step logged.

    Subclasses call :meth:`_folder` before writing; it is ``None`` on ranks other than 0,
    where the sink must do nothing.

    Args:
        root_dir: folder holding every run.
        name: experiment name (a level under ``root_dir``).
        version: ``None`` for the next free ``version_<n>``, an int, or a folder name.
        log_dir: write into exactly this folder instead.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str] = "runs",
        name: str | None = "default",
        version: int | str | None = None,
        *,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._run_dir = RunDir(root_dir, name, version, log_dir=log_dir)
        self._hparams: dict[str, Any] = {}
        self._last_step = 0

    @property
    def run_dir(self) -> RunDir:
        """The (possibly shared) run folder handle."""
        return self._run_dir

    def use_run_dir_(self, run_dir: RunDir) -> None:
        """Write into ``run_dir`` from now on (in place). Only allowed before the first write.

        Raises:
            ConfigError: this sink already created its own folder.

        Example:
            >>> import tempfile
            >>> from fnloop.loggers import CSVLogger, RunDir
            >>> run = RunDir(tempfile.mkdtemp(), "exp")
            >>> sink = CSVLogger()
            >>> sink.use_run_dir_(run)
            >>> sink.run_dir is run
            True
        """
        if self._run_dir.resolved and self._run_dir is not run_dir:
            raise ConfigError(
                f"{type(self).__name__} already writes into {self._run_dir.path!r}: hand it the "
                "shared run folder before it logs anything"
            )
        self._run_dir = run_dir

    @property
    def log_dir(self) -> str | None:
        """The run folder; reading it creates the folder on rank 0 (``None`` elsewhere)."""
        return self._run_dir.path

    def _folder(self) -> str | None:
        """The folder to write into, or ``None`` when this process must not write."""
        if not self._run_dir.is_writer:
            return None
        return self._run_dir.path

    def _prepare(self, metrics: Mapping[str, Any], step: int) -> dict[str, int | float] | None:
        """Converted metrics, or ``None`` when this process writes nothing."""
        if not self._run_dir.is_writer:
            return None
        values = scalar_metrics(metrics)
        self._last_step = int(step)
        return values

    def _write_hparams(self, params: Mapping[str, Any]) -> str | None:
        """Merge ``params`` into the run's ``hparams.yaml``; its path, or ``None`` off rank 0."""
        folder = self._folder()
        if folder is None:
            return None
        plain = to_plain(params)
        self._hparams.update(plain if isinstance(plain, dict) else {"value": plain})
        path = os.path.join(folder, HPARAMS_FILENAME)
        write_hparams_file(path, self._hparams)
        return path
