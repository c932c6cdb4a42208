"""Logger sinks: TensorBoard (tensorboardX), CSV, JSON Lines, console and MLflow.

Sinks take plain numbers at logging boundaries, write on global rank 0 only, and share one
run folder ``<root_dir>/<name>/version_<n>/`` when used together in a
:class:`LoggerCollection` (or when handed the same :class:`RunDir`).

Example:
    >>> import tempfile
    >>> import fnloop.loggers as fll
    >>> root = tempfile.mkdtemp()
    >>> logs = fll.LoggerCollection([fll.TensorBoardLogger(root), fll.CSVLogger(root)])
    >>> logs.log_hparams({"lr": 0.1})
    >>> logs.log_metrics({"train/loss": 0.5}, step=50)
    >>> logs.finalize("finished")
    >>> logs.log_dir.endswith("default/version_0")
    True
"""

from __future__ import annotations

from fnloop.loggers.base import STATUSES as STATUSES
from fnloop.loggers.base import Logger as Logger
from fnloop.loggers.base import LoggerCollection as LoggerCollection
from fnloop.loggers.base import NullLogger as NullLogger
from fnloop.loggers.base import check_status as check_status
from fnloop.loggers.base import global_rank as global_rank
from fnloop.loggers.base import is_global_zero as is_global_zero
from fnloop.loggers.base import scalar_metrics as scalar_metrics
from fnloop.loggers.base import to_scalar as to_scalar
from fnloop.loggers.console import ConsoleLogger as ConsoleLogger
from fnloop.loggers.console import format_metrics_table as format_metrics_table
from fnloop.loggers.console import format_value as format_value
from fnloop.loggers.csv import CSVLogger as CSVLogger
from fnloop.loggers.file_logger import FileLogger as FileLogger
from fnloop.loggers.hparams import HPARAMS_FILENAME as HPARAMS_FILENAME
from fnloop.loggers.hparams import flatten_hparams as flatten_hparams
from fnloop.loggers.hparams import read_hparams_file as read_hparams_file
from fnloop.loggers.hparams import to_plain as to_plain
from fnloop.loggers.hparams import write_hparams_file as write_hparams_file
from fnloop.loggers.jsonl import JSONLLogger as JSONLLogger
from fnloop.loggers.mlflow import MLFlowLogger as MLFlowLogger
from fnloop.loggers.run_dir import RunDir as RunDir
from fnloop.loggers.run_dir import next_version as next_version
from fnloop.loggers.run_dir import resolve_run_dir as resolve_run_dir
from fnloop.loggers.tensorboard import TensorBoardLogger as TensorBoardLogger

__all__ = [
    "STATUSES",
    "Logger",
    "LoggerCollection",
    "NullLogger",
    "check_status",
    "global_rank",
    "is_global_zero",
    "scalar_metrics",
    "to_scalar",
    "ConsoleLogger",
    "format_metrics_table",
    "format_value",
    "CSVLogger",
    "FileLogger",
    "HPARAMS_FILENAME",
    "flatten_hparams",
    "read_hparams_file",
    "to_plain",
    "write_hparams_file",
    "JSONLLogger",
    "MLFlowLogger",
    "RunDir",
    "next_version",
    "resolve_run_dir",
    "TensorBoardLogger",
]
