"""MLflow sink: metrics with their steps, hyperparameters as params, tags, and the final
checkpoint as an artifact, through the real ``mlflow`` client (an optional dependency:
``pip install mlflow``; imported only when the sink first writes).

Example:
    >>> import tempfile, os
    >>> uri = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "mlflow.db")
    >>> sink = MLFlowLogger("doc", tracking_uri=uri, tags={"team": "vision"})  # doctest: +SKIP
    >>> sink.log_metrics({"train/loss": 0.5}, step=10)  # doctest: +SKIP
    >>> sink.finalize("finished")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from fnloop.errors import ConfigError
from fnloop.loggers.base import check_status, is_global_zero, scalar_metrics
from fnloop.loggers.hparams import flatten_hparams

__all__ = ["MLFlowLogger"]

_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
_BATCH = 100  # MLflow's limit of params per log_batch call
_PARAM_LEN = 6000  # MLflow's limit of a param value's length


def _mlflow() -> Any:
    try:
        import mlflow.tracking  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(
            "MLFlowLogger needs the mlflow package: pip install mlflow (or use TensorBoardLogger/CSVLogger)"
        ) from None
    return MlflowClient


class MLFlowLogger:
    """Log a run to an MLflow tracking server or store.

    Args:
        experiment_name: the experiment (created when missing).
        run_name: the run's name in the MLflow UI.
        tracking_uri: ``"sqlite:///path.db"``, ``"http://host:port"``, a folder...; None: MLflow's
            default (``MLFLOW_TRACKING_URI`` or its local default).
        tags: run tags.
        log_model: log the final checkpoint of fit (a :class:`fnloop.ModelCheckpoint`'s last
            save) as an artifact under ``checkpoints/``.
        run_id: continue this existing run instead of creating one.
        prefix: put before every metric name (``"fold1/"``).

    One object is one run: ``fit`` and a later ``test`` with the same logger write to the
    same run. Writes on global rank 0 only.

    Example:
        >>> sink = MLFlowLogger("exp", tracking_uri="sqlite:///unused.db")
        >>> sink.experiment_name, sink.log_dir
        ('exp', None)
    """

    def __init__(
        self,
        experiment_name: str = "default",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        *,
        log_model: bool = False,
        run_id: str | None = None,
        prefix: str = "",
    ) -> None:
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tracking_uri = tracking_uri if tracking_uri is not None else os.environ.get("MLFLOW_TRACKING_URI")
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.log_model = log_model
        self.prefix = prefix
        self._run_id = run_id
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The ``mlflow.tracking.MlflowClient`` (created on first use)."""
        if self._client is None:
            self._client = _mlflow()(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def run_id(self) -> str:
        """The MLflow run id (the run is created on first use)."""
        if self._run_id is None:
            client = self.client
            experiment = client.get_experiment_by_name(self.experiment_name)
            experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(self.experiment_name)
            tags = dict(self.tags)
            if self.run_name is not None:
                tags["mlflow.runName"] = self.run_name
            self._run_id = client.create_run(experiment_id, tags=tags, run_name=self.run_name).info.run_id
        return self._run_id

    @property
    def log_dir(self) -> str | None:
        """None: the run lives in the tracking store, not in a local folder."""
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Every metric at ``step`` in one ``log_batch`` call."""
        if not is_global_zero() or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = scalar_metrics(metrics)
        batch = [Metric(f"{self.prefix}{k}", float(v), now, int(step)) for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        """Nested hyperparameters as dotted params (``trainer.max_epochs``)."""
        if not is_global_zero():
            return
        from mlflow.entities import Param

        flat = flatten_hparams(params)
        items = [Param(k, str(v)[:_PARAM_LEN]) for k, v in flat.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])
        if metrics:
            self.log_metrics(metrics, step=0)

    def log_checkpoint(self, path: str) -> None:
        """Upload the checkpoint folder ``path`` as ``checkpoints/<folder name>`` (with ``log_model``)."""
        if not self.log_model or not is_global_zero():
            return
        local = path[len("file://") :] if path.startswith("file://") else path
        if not os.path.isdir(local):
            raise ConfigError(
                f"MLFlowLogger(log_model=True): the checkpoint {path} is not a local folder; "
                "save checkpoints to a local path to log them as artifacts"
            )
        self.client.log_artifacts(self.run_id, local, artifact_path=f"checkpoints/{os.path.basename(local.rstrip('/'))}")

    def finalize(self, status: str) -> None:
        """Mark the run FINISHED, KILLED (interrupted) or FAILED."""
        check_status(status)
        if is_global_zero() and (self._run_id is not None or self._client is not None):
            self.client.set_terminated(self.run_id, status=_STATUS[status])
