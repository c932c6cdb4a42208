"""What the loops read: the Trainer's flags resolved once into plain values.

``Trainer`` builds one :class:`LoopConfig` from its flags (``Trainer.config``) and hands it to
the fit, evaluation and prediction loops; they never see the Trainer. Resolved means Lightning's
rules are already applied: ``fast_dev_run`` and ``overfit_batches`` fold into the batch limits,
``max_epochs`` gets its default, ``max_time`` is in seconds, the step flags are a
:class:`fnloop.options.StepOptions` (without the strategy's gradient reduction, which only the
connected run knows).

Example:
    >>> import fnloop as fl
    >>> config = fl.Trainer(fast_dev_run=2, enable_progress_bar=False, logger=False).config
    >>> config.max_epochs, config.max_steps, config.limit("val"), config.num_sanity_val_steps
    (1, 2, 2, 0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fnloop.options import StepOptions

__all__ = ["LoopConfig"]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The resolved values the loops read (see :class:`fnloop.Trainer` for each flag's meaning).

    Attributes:
        max_epochs: epochs to train (-1: no limit; 1000 when neither epochs, steps nor time are limited).
        max_steps: optimizer steps to train (-1: no limit).
        min_epochs: no early stop before this many epochs (None: no minimum).
        min_steps: no early stop before this many optimizer steps (None: no minimum).
        max_time: wall time limit in seconds (None: no limit).
        limit_train_batches: train batches per epoch (int, fraction or None: all).
        limit_val_batches: validation batches per loader.
        limit_test_batches: test batches per loader.
        limit_predict_batches: prediction batches per loader.
        val_check_interval: validate every n batches (int) or epoch fraction (float).
        check_val_every_n_epoch: validate in every n-th epoch only (None: count batches across epochs).
        num_sanity_val_steps: validation batches before training (-1: all, 0: none).
        log_every_n_steps: log train metrics every this many optimizer steps.
        log_window_spans_epochs: logging windows may span epochs.
        on_nonfinite: what a non-finite loss does at a logging boundary: "raise", "skip" or "stop".
        step: the train step's options (accumulation, clipping, non-finite skipping, precision).
        seed: the seed of the data order (None: the state's RNG key).
        use_distributed_sampler: each rank reads its share of every loader.
        overfit_batches: train and validate on this many train batches (0: off; no shuffling when on).
        reload_dataloaders_every_n_epochs: new data from the datamodule every n epochs (0: never).
        callbacks: the callbacks, in the order their hooks run.
        loggers: the run's sinks (a logger collection, made once per Trainer).
        enable_model_summary: add a ModelSummary when fit starts.
        enable_progress_bar: show a progress bar (fit) and the metrics table (validate/test).
        enable_checkpointing: True adds the default checkpoint, False forbids one, None: only when asked.
        checkpoint_root: the folder of the default checkpoint (None: the current folder at fit time).
        deterministic: torch's deterministic algorithms during fit.
        stop_signals: OS signals that stop fit cleanly (None: fnloop's default).
        donate: fit updates the given state in place and refuses it afterwards.
        inference_mode: evaluate and predict under ``torch.inference_mode`` (else ``torch.no_grad``).
        accelerator: the accelerator flag (read by :func:`fnloop.connectors.launch.connect`).
        devices: devices per node.
        num_nodes: machines taking part in the run.
        strategy: "auto", "ddp", "fsdp" or a strategy object.
        sync_batchnorm: synchronise BatchNorm statistics across ranks.
        flags: the Trainer's flags worth recording with the run (the logged hyperparameters).
    """

    max_epochs: int = 1000
    max_steps: int = -1
    min_epochs: int | None = None
    min_steps: int | None = None
    max_time: float | None = None
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    limit_test_batches: int | float | None = None
    limit_predict_batches: int | float | None = None
    val_check_interval: int | float = 1.0
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int = 2
    log_every_n_steps: int = 50
    log_window_spans_epochs: bool = False
    on_nonfinite: str = "raise"
    step: StepOptions = dataclasses.field(default_factory=StepOptions)
    seed: int | None = None
    use_distributed_sampler: bool = True
    overfit_batches: int | float = 0.0
    reload_dataloaders_every_n_epochs: int = 0
    callbacks: tuple[Any, ...] = ()
    loggers: Any = dataclasses.field(default_factory=lambda: _null_logger())
    enable_model_summary: bool = True
    enable_progress_bar: bool = True
    enable_checkpointing: bool | None = None
    checkpoint_root: str | None = None
    deterministic: bool = False
    stop_signals: Any = None
    donate: bool = True
    inference_mode: bool = True
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: Any = "auto"
    sync_batchnorm: bool = False
    flags: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def limit(self, stage: str) -> int | float | None:
        """The batch limit of ``stage`` (``train``, ``val``, ``test`` or ``predict``).

        Example:
            >>> LoopConfig(limit_val_batches=0.5).limit("val")
            0.5
        """
        return getattr(self, f"limit_{stage}_batches")


def _null_logger() -> Any:
    from fnloop.loggers import NullLogger

    return NullLogger()
