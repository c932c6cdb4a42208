"""TensorBoard sink: event files written with tensorboardX's record format.

Each metric becomes a scalar series tagged with its key (``"train/loss"``); one log call is one
event, written in place (a few scalars every ``log_every_n_steps`` cost less written directly
than sent through tensorboardX's queue and writer thread) and flushed every ``flush_secs`` and
at ``finalize``. Hyperparameters go to TensorBoard's HPARAMS tab in the run folder itself
(flattened to ``"a.b"`` keys, values it cannot show turned into strings) and to
``hparams.yaml``; ``finalize`` closes the HPARAMS session with its status. For what this sink
does not wrap (histograms, images, text), :attr:`TensorBoardLogger.writer` opens a
``tensorboardX.SummaryWriter`` on the same folder.

Every event file this sink opens gets its own name, so a sink reopened after ``finalize``
(``fit`` then ``test``) or several sinks in one folder never overwrite a file.

Example:
    >>> import tempfile
    >>> sink = TensorBoardLogger(log_dir=tempfile.mkdtemp())
    >>> sink.log_metrics({"train/loss": 0.5, "lr": 1e-3}, step=10)
    >>> sink.finalize("finished")
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from typing import Any

from fnloop.errors import ConfigError
from fnloop.loggers.base import check_status, scalar_metrics
from fnloop.loggers.file_logger import FileLogger
from fnloop.loggers.hparams import flatten_hparams

__all__ = ["TensorBoardLogger"]

_FILE_NUMBERS = itertools.count()


def _file_suffix() -> str:
    """A suffix no other event file of this process has."""
    return f".{os.getpid()}.{next(_FILE_NUMBERS):06d}"
_END_STATUS = {
    "finished": "STATUS_SUCCESS",
    "failed": "STATUS_FAILURE",
    "interrupted": "STATUS_UNKNOWN",
}


def _session_end_summary(status: str) -> Any:
    """The HPARAMS plugin's session-end record for ``status``."""
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    info = SessionEndInfo(status=Status.Value(_END_STATUS[status]), end_time_secs=time.time())
    content = HParamsPluginData(session_end_info=info, version=0).SerializeToString()
    plugin = SummaryMetadata.PluginData(plugin_name="hparams", content=content)
    metadata = SummaryMetadata(plugin_data=plugin)
    return Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=metadata)])


class TensorBoardLogger(FileLogger):
    """Scalars and hyperparameters as TensorBoard event files in the run folder.

    Args:
        root_dir: folder holding every run (point ``tensorboard --logdir`` at it).
        name: experiment name; the run folder is ``root_dir/name/version_<n>``.
        version: ``None`` for the next free version, an int, or a folder name.
        log_dir: write into exactly this folder instead of a versioned one.
        flush_secs: seconds between flushes of the event files.
        max_queue: events the :attr:`writer`'s queue holds before its calls wait.

    Example:
        >>> import tempfile
        >>> sink = TensorBoardLogger(tempfile.mkdtemp(), "exp")
        >>> sink.log_hparams({"optim": {"lr": 0.1}}, {"val/loss": 0.3})
        >>> sink.finalize("finished")
        >>> sink.log_dir.endswith("exp/version_0")
        True
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str] = "runs",
        name: str | None = "default",
        version: int | str | None = None,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        flush_secs: float = 10,
        max_queue: int = 100,
    ) -> None:
        super().__init__(root_dir, name, version, log_dir=log_dir)
        if not flush_secs > 0:
            raise ConfigError(f"TensorBoardLogger(flush_secs={flush_secs!r}): give seconds > 0")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ConfigError(f"TensorBoardLogger(max_queue={max_queue!r}): give an int >= 1")
        self.flush_secs = flush_secs
        self.max_queue = max_queue
        self._writer: Any = None
        self._events: Any = None  # tensorboardX EventsWriter of this sink's own events
        self._flushed_at = 0.0
        self._tb_hparams: dict[str, bool | int | float | str] = {}
        self._hparam_metrics: dict[str, None] = {}
        self._session_open = False

    @property
    def writer(self) -> Any:
        """The open ``tensorboardX.SummaryWriter`` (opened on demand; ``None`` off rank 0).

        Use it for what this sink does not wrap (histograms, images, text).
        """
        if self._writer is None:
            folder = self._folder()
            if folder is None:
                return None
            try:
                from tensorboardX import SummaryWriter
            except ImportError as err:
                raise ConfigError(
                    "TensorBoardLogger needs the tensorboardX package: pip install tensorboardX"
                ) from err
            self._writer = SummaryWriter(
                logdir=folder,
                flush_secs=self.flush_secs,
                max_queue=self.max_queue,
                filename_suffix=_file_suffix(),
            )
        return self._writer

    def _add(self, summary: Any) -> None:
        """Write ``summary`` as one event at the last step logged (opening the file on demand)."""
        from tensorboardX.proto.event_pb2 import Event

        if self._events is None:
            from tensorboardX.event_file_writer import EventsWriter

            folder = self._folder()  # created by the run folder
            if folder is None:
                return
            self._events = EventsWriter(os.path.join(folder, "events"), _file_suffix())
            self._flushed_at = time.monotonic()
        self._events.write_event(Event(wall_time=time.time(), step=self._last_step, summary=summary))
        if time.monotonic() - self._flushed_at > self.flush_secs:
            self._events.flush()
            self._flushed_at = time.monotonic()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Add one scalar per key at ``step``."""
        values = self._prepare(metrics, step)
        if values is None:
            return
        self._add_scalars(values)

    def _add_scalars(self, values: Mapping[str, float]) -> None:
        """All ``values`` as one event at the last step (one summary, a value per tag)."""
        if not values:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        self._add(Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]))

    def log_hparams(
        self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None
    ) -> None:
        """Record hyperparameters for the HPARAMS tab and ``hparams.yaml``.

        Later calls add to (and override keys of) earlier ones. The keys of ``metrics`` become
        the HPARAMS tab's metric columns, which show the last value of the scalar series with
        that tag; their values are added as scalars at the last step logged.
        """
        values = scalar_metrics(metrics or {})
        if self._write_hparams(params) is None:
            return
        from tensorboardX.summary import hparams

        self._tb_hparams.update(flatten_hparams(params))
        self._hparam_metrics.update(dict.fromkeys(values))
        experiment, session_start, _ = hparams(self._tb_hparams, dict(self._hparam_metrics))
        self._add(experiment)
        self._add(session_start)
        self._session_open = True
        self._add_scalars(values)

    def flush(self) -> None:
        """Write pending events to disk now."""
        if self._events is not None:
            self._events.flush()
            self._flushed_at = time.monotonic()
        if self._writer is not None:
            self._writer.flush()

    def finalize(self, status: str) -> None:
        """End the HPARAMS session with ``status``, flush and close the event file.

        Safe to call again; logging afterwards opens a new event file in the same folder.
        """
        check_status(status)
        if self._session_open:
            self._add(_session_end_summary(status))
            self._session_open = False
        if self._events is not None:
            self._events.close()  # flushes first
            self._events = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
