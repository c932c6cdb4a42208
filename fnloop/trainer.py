"""The driver: a frozen configuration with Lightning's flag names, and ``fit``, ``validate``,
``test`` and ``predict`` that return values.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
    >>> loss = lambda model, b: torch.nn.functional.mse_loss(model(b[0]), b[1])
    >>> state = fl.TrainState.create(torch.nn.Linear(3, 1), flo.sgd(lr=0.1))
    >>> trainer = fl.Trainer(max_epochs=2, enable_progress_bar=False, enable_model_summary=False, logger=False)
    >>> state = trainer.fit(state, fl.train_step(loss), data)
    >>> state.loop.global_step, state.loop.status
    (8, 'finished')
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fnloop.callbacks.base import Callback
from fnloop.callbacks.misc import parse_duration
from fnloop.errors import ConfigError
from fnloop.trainer_flags import check_flags

if TYPE_CHECKING:
    from fnloop.loops.config import LoopConfig
    from fnloop.state import TrainState
    from fnloop.types import EvalStepFn, PredictStepFn, StepFn

__all__ = ["Trainer"]


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The driver's flags, with Lightning's names and meanings.

    The loops live in :mod:`fnloop.loops` and read every counter from ``state.loop``. Flags not
    in Lightning: ``on_nonfinite``, ``seed``, ``stop_signals`` and ``donate`` (below);
    ``enable_checkpointing`` keeps Lightning's name with a different default (below).

    Args:
        max_epochs: epochs to train (-1: no limit; 1000 when no limit is set).
        min_epochs: no early stop before this many epochs.
        max_steps: stop after this many optimizer steps (-1: no limit).
        min_steps: do not stop early before this many optimizer steps.
        max_time: wall time limit ("DD:HH:MM:SS", a dict or seconds).
        limit_train_batches: train batches per epoch (int or fraction).
        limit_val_batches: val batches per loader (int or fraction).
        limit_test_batches: test batches per loader (int or fraction).
        limit_predict_batches: prediction batches per loader (int or fraction).
        val_check_interval: validate every n batches (int) or epoch fraction.
        check_val_every_n_epoch: validate in every n-th epoch only (None: count batches across epochs).
        num_sanity_val_steps: validation batches run before training (-1: all, 0: none).
        log_every_n_steps: log train metrics every this many optimizer steps.
        accumulate_grad_batches: batches whose gradients are summed into one optimizer step.
        gradient_clip_val: clip gradients at this norm or value (None: no clipping).
        gradient_clip_algorithm: "norm" (global norm, the default) or "value".
        fast_dev_run: run 1 (True) or n batches of each loop, once, to check the code path.
        overfit_batches: train and validate on this many (or this fraction of) train batches.
        callbacks: a fnloop.Callback or a list of them.
        logger: None or True: TensorBoard and CSV in default_root_dir; False: none; a sink or a list.
        default_root_dir: where default loggers write (default: ./runs).
        enable_progress_bar: show a progress bar during fit and the metrics table after validate/test.
        deterministic: use torch's deterministic algorithms during fit.
        seed: the seed of the data order (default: the state's RNG key).
        on_nonfinite: a non-finite loss "raise"s, "skip"s the update (no host sync) or "stop"s fit.
        stop_signals: OS signals that stop fit cleanly after the current step.
        donate: fit updates the given state in place and refuses it afterwards (False: keep a copy).
        enable_model_summary: print the model summary (ModelSummary) when fit starts.
        inference_mode: evaluate and predict under torch.inference_mode (False: torch.no_grad).
        reload_dataloaders_every_n_epochs: new train/val data from the datamodule every n epochs.
        log_window_spans_epochs: logging windows may span epochs.
        enable_checkpointing: True adds the default ModelCheckpoint, False forbids one; None checkpoints only when asked.
        accelerator: "auto", "cpu", "cuda", "gpu" or "mps".
        devices: devices per node: an int, a list of device indices or "auto".
        num_nodes: machines taking part in a distributed run.
        strategy: "auto", "ddp", "fsdp", or a fnloop.DDPStrategy / fnloop.FSDPStrategy for options.
        precision: "32-true", "64-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed" or a short alias.
        sync_batchnorm: synchronise BatchNorm statistics across ranks (DDP).
        use_distributed_sampler: each rank reads its share of every loader.

    ``on_nonfinite`` is checked at each logging boundary. With ``donate`` (default True) fit
    updates the state it is given in place, as a hand-written loop does, and that state is
    refused afterwards; use the state fit returns. ``False`` keeps it intact at the cost of a
    second copy of the weights and optimizer state. With ``enable_checkpointing=None`` (the
    default) fit writes no checkpoint file unasked: only a ``ModelCheckpoint`` callback or
    ``fit(checkpoint=...)`` saves; ``True`` adds Lightning's default checkpoint callback when
    none is given, ``False`` turns checkpointing off (no ``ModelCheckpoint`` allowed).

    Devices, precision and distribution take Lightning's flags and meanings (see
    :mod:`fnloop.connectors.launch`): in a distributed run each rank trains on its share of the
    data, metrics are reduced across ranks, and rank 0 alone logs, prints and writes files.

    Example:
        >>> import fnloop as fl
        >>> fl.Trainer(max_epochs=20, val_check_interval=0.5, accumulate_grad_batches=2, gradient_clip_val=1.0).max_epochs
        20
    """

    max_epochs: int | None = None
    min_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    max_time: Any = None
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    limit_test_batches: int | float | None = None
    limit_predict_batches: int | float | None = None
    val_check_interval: int | float | None = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int = 2
    log_every_n_steps: int = 50
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    fast_dev_run: bool | int = False
    overfit_batches: int | float = 0.0
    callbacks: Sequence[Callback] | Callback | None = None
    logger: Any = None
    default_root_dir: str | None = None
    enable_progress_bar: bool = True
    deterministic: bool = False
    seed: int | None = None
    on_nonfinite: str = "raise"
    stop_signals: Sequence[int] | None = None
    donate: bool = True
    enable_model_summary: bool = True
    inference_mode: bool = True
    reload_dataloaders_every_n_epochs: int = 0
    enable_checkpointing: bool | None = None
    accelerator: str = "auto"
    devices: int | list[int] | str = "auto"
    num_nodes: int = 1
    strategy: str | Any = "auto"
    precision: str | int = "32-true"
    sync_batchnorm: bool = False
    use_distributed_sampler: bool = True
    log_window_spans_epochs: bool = False

    def __post_init__(self) -> None:
        check_flags(self)

    # --- resolved values -------------------------------------------------------------------

    @functools.cached_property
    def loggers(self) -> Any:
        """The sinks of ``logger`` (Lightning's meanings: None or True -> TensorBoard and CSV in
        ``default_root_dir`` (``runs``), False -> none), made once per Trainer so that ``fit``
        and a later ``test`` write to the same run folder.

        Example:
            >>> import fnloop as fl
            >>> type(fl.Trainer(logger=False).loggers).__name__
            'NullLogger'
        """
        from fnloop.loops.logging import make_logger

        return make_logger(self.logger, self.default_root_dir)

    @functools.cached_property
    def config(self) -> LoopConfig:
        """The values the loops read, resolved once from the flags (see
        :class:`fnloop.loops.config.LoopConfig`); ``fit``, ``validate``, ``test`` and ``predict``
        hand it to the loops in place of the Trainer.

        Example:
            >>> import fnloop as fl
            >>> fl.Trainer(max_steps=10, overfit_batches=3, logger=False).config.limit("val")
            3
        """
        from fnloop.connectors.precision import resolve_precision
        from fnloop.loops.config import LoopConfig
        from fnloop.options import StepOptions

        interval, every_n_epochs = self.resolved_val_check
        step = StepOptions(
            self.accumulate_grad_batches, self.gradient_clip_val, self.gradient_clip_algorithm,
            self.on_nonfinite == "skip", resolve_precision(self.precision),
        )
        skip = {"callbacks", "logger", "stop_signals"}  # not hyperparameters (callbacks: by name, with the run's own)
        return LoopConfig(
            max_epochs=self.resolved_max_epochs, max_steps=self.resolved_max_steps, min_epochs=self.min_epochs,
            min_steps=self.min_steps, max_time=parse_duration(self.max_time),
            **{f"limit_{stage}_batches": self.limit(stage) for stage in ("train", "val", "test", "predict")},
            val_check_interval=interval, check_val_every_n_epoch=every_n_epochs,
            num_sanity_val_steps=0 if self.dev_batches else self.num_sanity_val_steps,
            log_every_n_steps=self.log_every_n_steps, log_window_spans_epochs=self.log_window_spans_epochs,
            on_nonfinite=self.on_nonfinite, step=step, seed=self.seed, use_distributed_sampler=self.use_distributed_sampler,
            overfit_batches=self.overfit_batches, reload_dataloaders_every_n_epochs=self.reload_dataloaders_every_n_epochs,
            callbacks=tuple(self.callback_list), loggers=self.loggers, enable_model_summary=self.enable_model_summary,
            enable_progress_bar=self.enable_progress_bar, enable_checkpointing=self.enable_checkpointing,
            checkpoint_root=self._checkpoint_root(), deterministic=self.deterministic, stop_signals=self.stop_signals,
            donate=self.donate, inference_mode=self.inference_mode, accelerator=self.accelerator, devices=self.devices,
            num_nodes=self.num_nodes, strategy=self.strategy, sync_batchnorm=self.sync_batchnorm,
            flags={f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip},
        )

    def _checkpoint_root(self) -> str | None:
        """Where ``enable_checkpointing=True`` puts its default checkpoint: the logger's folder or ``default_root_dir``."""
        if not self.enable_checkpointing:
            return None
        return getattr(self.logger, "log_dir", None) or self.default_root_dir

    @property
    def callback_list(self) -> list[Callback]:
        """The callbacks as a list."""
        cbs = self.callbacks
        if cbs is None:
            return []
        if isinstance(cbs, Callback):
            return [cbs]
        if not isinstance(cbs, (list, tuple)):
            raise ConfigError(f"Trainer(callbacks={cbs!r}): accepted values are a fnloop.Callback or a list of them")
        return list(cbs)

    @property
    def dev_batches(self) -> int:
        """Batches per loop under ``fast_dev_run`` (0 when off)."""
        return int(self.fast_dev_run) if not isinstance(self.fast_dev_run, bool) else (1 if self.fast_dev_run else 0)

    @property
    def resolved_max_epochs(self) -> int:
        """``max_epochs`` as Lightning resolves it (1000 when neither epochs nor steps are limited)."""
        if self.dev_batches:
            return 1
        if self.max_epochs is None:
            return 1000 if self.max_steps == -1 and self.max_time is None else -1
        return self.max_epochs

    @property
    def resolved_val_check(self) -> tuple[int | float, int | None]:
        """``(val_check_interval, check_val_every_n_epoch)``; ``fast_dev_run`` validates once per epoch."""
        if self.dev_batches:
            return 1.0, 1
        return (self.val_check_interval if self.val_check_interval is not None else 1.0), self.check_val_every_n_epoch

    @property
    def resolved_max_steps(self) -> int:
        return self.dev_batches if self.dev_batches else self.max_steps

    def limit(self, stage: str) -> int | float | None:
        """The batch limit of a stage (``train``, ``val``, ``test``, ``predict``) after
        ``fast_dev_run`` and ``overfit_batches``."""
        if self.dev_batches:
            return self.dev_batches
        if self.overfit_batches and stage in ("train", "val"):
            return self.overfit_batches
        return getattr(self, f"limit_{stage}_batches")

    # --- entry points ------------------------------------------------------------------------

    def fit(
        self,
        state: TrainState,
        train_step: StepFn,
        train_data: Any = None,
        *,
        val_step: EvalStepFn | Sequence[EvalStepFn] | Mapping[str, EvalStepFn] | None = None,
        val_data: Any = None,
        datamodule: Any = None,
        ckpt_path: str | None = None,
        checkpoint: Any = None,
    ) -> Any:
        """Train; returns the final state (``state.loop.status`` says how it ended).

        Args:
            state: a :class:`fnloop.TrainState` (fresh or with progress: fit continues it).
            train_step: ``fl.train_step(loss_fn)`` (or its ``fl.compile`` version).
            train_data: a Dataset, DataLoader, list of batches or re-iterable.
            val_step: ``fl.eval_step(fn)`` for validation.
            val_data: validation data.
            datamodule: an object with ``setup(stage)``, ``train_data()``, ``val_data()``...
            ckpt_path: ``"last"``, ``"best"`` or a checkpoint URL to resume from.
            checkpoint: a :class:`fnloop.CheckpointManager` (saves during fit).
        """
        from fnloop.loops.fit import run_fit

        return run_fit(
            self.config, state, train_step, train_data, val_step=val_step, val_data=val_data,
            datamodule=datamodule, ckpt_path=ckpt_path, checkpoint=checkpoint,
        )

    def validate(
        self,
        state: TrainState,
        eval_step: EvalStepFn | Sequence[EvalStepFn] | Mapping[str, EvalStepFn],
        data: Any = None,
        *,
        datamodule: Any = None,
        verbose: bool = True,
    ) -> dict[str, float]:
        """Run ``eval_step`` over ``data``; metrics reduced over the loader (``val/...``).

        ``data`` may be several loaders (a list or dict: ``val/loss/dataloader_idx_1`` or
        ``val/loss/<key>``; see :mod:`fnloop.loops.loaders`), ``eval_step`` one step or one per
        loader. With ``enable_progress_bar`` and ``verbose`` the metrics are printed as a table.
        """
        from fnloop.loops.evaluate import run_stage

        return run_stage(self.config, state, eval_step, data, stage="val", datamodule=datamodule, verbose=verbose)

    def test(
        self,
        state: TrainState,
        eval_step: EvalStepFn | Sequence[EvalStepFn] | Mapping[str, EvalStepFn],
        data: Any = None,
        *,
        datamodule: Any = None,
        verbose: bool = True,
    ) -> dict[str, float]:
        """Run ``eval_step`` over ``data``; metrics reduced over the loader (``test/...``); see :meth:`validate`."""
        from fnloop.loops.evaluate import run_stage

        return run_stage(self.config, state, eval_step, data, stage="test", datamodule=datamodule, verbose=verbose)

    def predict(
        self,
        state: TrainState,
        predict_step: PredictStepFn | Sequence[PredictStepFn] | Mapping[str, PredictStepFn],
        data: Any = None,
        *,
        datamodule: Any = None,
        return_predictions: bool = True,
    ) -> Any:
        """Run ``predict_step`` over ``data``; returns the outputs of every batch, in order.

        ``data`` may be several loaders (a list or a dict, see :mod:`fnloop.loops.loaders`): the
        result is then a list (or dict) of such lists. ``return_predictions=False`` keeps nothing
        in memory and returns None (a :class:`fnloop.PredictionWriter` callback writes them).
        """
        from fnloop.loops.predict import run_predict

        return run_predict(self.config, state, predict_step, data, datamodule=datamodule, return_predictions=return_predictions)
