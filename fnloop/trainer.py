"""The driver: a frozen configuration with Lightning's flag names, and ``fit``, ``validate``,
``test`` and ``predict`` that return values.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
    >>> loss = lambda model, b: torch.nn.functional.mse_loss(model(b[0]), b[1])
    >>> state = fl.TrainState.create(torch.nn.Linear(3, 1), flo.sgd(lr=0.1))
    >>> trainer = fl.Trainer(max_epochs=2, enable_progress_bar=False)
    >>> state = trainer.fit(state, fl.train_step(loss), data)
    >>> state.loop.global_step, state.loop.status
    (8, 'finished')
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

from fnloop.callbacks.base import Callback
from fnloop.callbacks.misc import parse_duration
from fnloop.connectors.signals import check_stop_signals
from fnloop.errors import ConfigError

__all__ = ["Trainer"]

_NONFINITE = ("raise", "skip", "stop")
_CLIP = ("norm", "value")


def _int_flag(name: str, value: Any, *, low: int, allow_none: bool = False, extra: str = "") -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        accepted = f"an int >= {low}" + (" or None" if allow_none else "") + extra
        raise ConfigError(f"Trainer({name}={value!r}): accepted values are {accepted}")


def _limit_flag(name: str, value: Any) -> None:
    if value is None:
        return
    ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0) or (
        isinstance(value, float) and 0.0 <= value <= 1.0
    )
    if not ok:
        raise ConfigError(
            f"Trainer({name}={value!r}): accepted values are an int >= 0 (batches) or a float in [0.0, 1.0] (a fraction)"
        )


def _distribution_flags(trainer: Any) -> None:
    """Check accelerator, devices, num_nodes, strategy, precision and the two booleans."""
    from fnloop.connectors.device import parse_devices, resolve_accelerator
    from fnloop.connectors.precision import resolve_precision
    from fnloop.connectors.strategy import resolve_strategy

    parse_devices(trainer.devices, resolve_accelerator(trainer.accelerator))
    _int_flag("num_nodes", trainer.num_nodes, low=1)
    resolve_strategy(trainer.strategy)
    resolve_precision(trainer.precision)
    for name in ("sync_batchnorm", "use_distributed_sampler"):
        if not isinstance(getattr(trainer, name), bool):
            raise ConfigError(f"Trainer({name}={getattr(trainer, name)!r}): accepted values are True or False")


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Lightning's ``Trainer`` flags, with the same meaning; the loops live in
    :mod:`fnloop.loops` and read every counter from ``state.loop``.

    Flags not in Lightning: ``on_nonfinite`` (``"raise"``, ``"skip"`` the update without a
    host sync, or ``"stop"``; checked at each logging boundary), ``seed`` (data order; defaults
    to the state's RNG key), ``stop_signals`` (OS signals that stop fit cleanly), ``donate``
    (default True: fit updates the state it is given in place, as a hand-written loop does, and
    that state is refused afterwards; use the state fit returns. ``False`` keeps it intact at the
    cost of a second copy of the weights and optimizer state). ``enable_checkpointing``: ``True``
    adds Lightning's default checkpoint callback when none is given, ``False`` turns checkpointing
    off (no ``ModelCheckpoint`` allowed); the default ``None`` checkpoints only when asked (a
    ``ModelCheckpoint`` callback or ``fit(checkpoint=...)``), so fit writes no file unasked.

    Devices, precision and distribution take Lightning's flags: ``accelerator`` (``"auto"``,
    ``"cpu"``, ``"cuda"``, ``"gpu"``, ``"mps"``), ``devices`` (int, list of indices, ``"auto"``),
    ``num_nodes``, ``strategy`` (``"auto"``, ``"ddp"``, a :class:`fnloop.DDPStrategy`; ``"fsdp"``
    is not available yet), ``precision`` (``"32-true"``, ``"64-true"``, ``"bf16-true"``,
    ``"16-true"``, ``"bf16-mixed"``, ``"16-mixed"`` and the short aliases), ``sync_batchnorm`` and
    ``use_distributed_sampler`` (see :mod:`fnloop.connectors.launch`).

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
    enable_checkpointing: bool | None = None
    accelerator: str = "auto"
    devices: int | list[int] | str = "auto"
    num_nodes: int = 1
    strategy: str | Any = "auto"
    precision: str | int = "32-true"
    sync_batchnorm: bool = False
    use_distributed_sampler: bool = True

    def __post_init__(self) -> None:
        _int_flag("max_epochs", self.max_epochs, low=-1, allow_none=True)
        _int_flag("min_epochs", self.min_epochs, low=0, allow_none=True)
        _int_flag("max_steps", self.max_steps, low=-1, extra=" (-1: no step limit)")
        _int_flag("min_steps", self.min_steps, low=0, allow_none=True)
        max_time = parse_duration(self.max_time, flag="Trainer(max_time)")
        if max_time is not None and math.isnan(max_time):
            raise ConfigError(f"Trainer(max_time={self.max_time!r}): not a number; give seconds > 0, a timedelta or None")
        for name in ("deterministic", "donate", "enable_progress_bar"):
            if not isinstance(getattr(self, name), bool):  # "no" or "false" must not read as True
                raise ConfigError(f"Trainer({name}={getattr(self, name)!r}): accepted values are True or False")
        check_stop_signals(self.stop_signals)
        for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
            _limit_flag(name, getattr(self, name))
        vci = self.val_check_interval
        if vci is not None and not (
            (isinstance(vci, numbers.Integral) and not isinstance(vci, bool) and vci >= 1)
            or (isinstance(vci, float) and 0.0 < vci <= 1.0)
        ):
            raise ConfigError(
                f"Trainer(val_check_interval={vci!r}): accepted values are an int >= 1 (batches) or a float in (0.0, 1.0] (a fraction of the epoch)"
            )
        _int_flag("check_val_every_n_epoch", self.check_val_every_n_epoch, low=1, allow_none=True)
        _int_flag("num_sanity_val_steps", self.num_sanity_val_steps, low=-1, extra=" (-1: all batches)")
        _int_flag("log_every_n_steps", self.log_every_n_steps, low=1)
        _int_flag("accumulate_grad_batches", self.accumulate_grad_batches, low=1)
        clip = self.gradient_clip_val
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real) or clip < 0):
            raise ConfigError(f"Trainer(gradient_clip_val={clip!r}): accepted values are a number >= 0 or None")
        if self.gradient_clip_algorithm not in (None, *_CLIP):
            raise ConfigError(
                f"Trainer(gradient_clip_algorithm={self.gradient_clip_algorithm!r}): accepted values are 'norm', 'value' or None"
            )
        fdr = self.fast_dev_run
        if not isinstance(fdr, (bool, numbers.Integral)) or (not isinstance(fdr, bool) and fdr < 0):
            raise ConfigError(f"Trainer(fast_dev_run={fdr!r}): accepted values are True/False or an int >= 0 (batches)")
        ob = self.overfit_batches
        if isinstance(ob, bool) or not isinstance(ob, numbers.Real) or ob < 0 or (isinstance(ob, float) and ob > 1.0):
            raise ConfigError(
                f"Trainer(overfit_batches={ob!r}): accepted values are an int >= 0 (batches) or a float in [0.0, 1.0]"
            )
        if self.on_nonfinite not in _NONFINITE:
            raise ConfigError(f"Trainer(on_nonfinite={self.on_nonfinite!r}): accepted values are 'raise', 'skip', 'stop'")
        for i, cb in enumerate(self.callback_list):
            if not isinstance(cb, Callback):
                raise ConfigError(
                    f"Trainer(callbacks[{i}]={cb!r}): callbacks must be fnloop.Callback instances (subclass fnloop.Callback)"
                )
        if self.seed is not None:
            _int_flag("seed", self.seed, low=0, allow_none=True)
        from fnloop.checkpoint.callback import check_enable_checkpointing

        check_enable_checkpointing(self.enable_checkpointing, self.callback_list)
        _distribution_flags(self)
        if self.min_epochs is not None and self.max_epochs not in (None, -1) and self.min_epochs > self.max_epochs:
            raise ConfigError(
                f"Trainer(min_epochs={self.min_epochs}, max_epochs={self.max_epochs}): min_epochs must be <= max_epochs"
            )

    # --- resolved values -------------------------------------------------------------------

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
        state: Any,
        train_step: Any,
        train_data: Any = None,
        *,
        val_step: Any = None,
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
            self, state, train_step, train_data, val_step=val_step, val_data=val_data,
            datamodule=datamodule, ckpt_path=ckpt_path, checkpoint=checkpoint,
        )

    def validate(self, state: Any, eval_step: Any, data: Any = None, *, datamodule: Any = None) -> dict[str, float]:
        """Run ``eval_step`` over ``data``; metrics reduced over the loader (``val/...``)."""
        from fnloop.loops.evaluate import run_stage

        return run_stage(self, state, eval_step, data, stage="val", datamodule=datamodule)

    def test(self, state: Any, eval_step: Any, data: Any = None, *, datamodule: Any = None) -> dict[str, float]:
        """Run ``eval_step`` over ``data``; metrics reduced over the loader (``test/...``)."""
        from fnloop.loops.evaluate import run_stage

        return run_stage(self, state, eval_step, data, stage="test", datamodule=datamodule)

    def predict(self, state: Any, predict_step: Any, data: Any = None, *, datamodule: Any = None) -> list[Any]:
        """Run ``predict_step`` over ``data``; returns the outputs of every batch, in order."""
        from fnloop.loops.predict import run_predict

        return run_predict(self, state, predict_step, data, datamodule=datamodule)
