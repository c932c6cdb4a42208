"""The checks of the Trainer's flags: each bad value raises a ConfigError that names the flag
and the accepted values.

Example:
    >>> import fnloop as fl
    >>> fl.Trainer(max_epochs=-3)
    Traceback (most recent call last):
    ...
    fnloop.errors.ConfigError: Trainer(max_epochs=-3): accepted values are an int >= -1 or None
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from fnloop.callbacks.base import Callback
from fnloop.callbacks.misc import parse_duration
from fnloop.connectors.signals import check_stop_signals
from fnloop.errors import ConfigError

__all__ = ["check_flags"]

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


def check_flags(trainer: Any) -> None:
    """Check every flag of ``trainer`` (a :class:`fnloop.Trainer`, from its ``__post_init__``)."""
    _int_flag("max_epochs", trainer.max_epochs, low=-1, allow_none=True)
    _int_flag("min_epochs", trainer.min_epochs, low=0, allow_none=True)
    _int_flag("max_steps", trainer.max_steps, low=-1, extra=" (-1: no step limit)")
    _int_flag("min_steps", trainer.min_steps, low=0, allow_none=True)
    max_time = parse_duration(trainer.max_time, flag="Trainer(max_time)")
    if max_time is not None and math.isnan(max_time):
        raise ConfigError(f"Trainer(max_time={trainer.max_time!r}): not a number; give seconds > 0, a timedelta or None")
    for name in ("deterministic", "donate", "enable_progress_bar"):
        if not isinstance(getattr(trainer, name), bool):  # "no" or "false" must not read as True
            raise ConfigError(f"Trainer({name}={getattr(trainer, name)!r}): accepted values are True or False")
    check_stop_signals(trainer.stop_signals)
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        _limit_flag(name, getattr(trainer, name))
    vci = trainer.val_check_interval
    if vci is not None and not (
        (isinstance(vci, numbers.Integral) and not isinstance(vci, bool) and vci >= 1)
        or (isinstance(vci, float) and 0.0 < vci <= 1.0)
    ):
        raise ConfigError(
            f"Trainer(val_check_interval={vci!r}): accepted values are an int >= 1 (batches) or a float in (0.0, 1.0] (a fraction of the epoch)"
        )
    _int_flag("check_val_every_n_epoch", trainer.check_val_every_n_epoch, low=1, allow_none=True)
    _int_flag("num_sanity_val_steps", trainer.num_sanity_val_steps, low=-1, extra=" (-1: all batches)")
    _int_flag("log_every_n_steps", trainer.log_every_n_steps, low=1)
    _int_flag("accumulate_grad_batches", trainer.accumulate_grad_batches, low=1)
    clip = trainer.gradient_clip_val
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real) or clip < 0):
        raise ConfigError(f"Trainer(gradient_clip_val={clip!r}): accepted values are a number >= 0 or None")
    if trainer.gradient_clip_algorithm not in (None, *_CLIP):
        raise ConfigError(
            f"Trainer(gradient_clip_algorithm={trainer.gradient_clip_algorithm!r}): accepted values are 'norm', 'value' or None"
        )
    fdr = trainer.fast_dev_run
    if not isinstance(fdr, (bool, numbers.Integral)) or (not isinstance(fdr, bool) and fdr < 0):
        raise ConfigError(f"Trainer(fast_dev_run={fdr!r}): accepted values are True/False or an int >= 0 (batches)")
    ob = trainer.overfit_batches
    if isinstance(ob, bool) or not isinstance(ob, numbers.Real) or ob < 0 or (isinstance(ob, float) and ob > 1.0):
        raise ConfigError(
            f"Trainer(overfit_batches={ob!r}): accepted values are an int >= 0 (batches) or a float in [0.0, 1.0]"
        )
    if trainer.on_nonfinite not in _NONFINITE:
        raise ConfigError(f"Trainer(on_nonfinite={trainer.on_nonfinite!r}): accepted values are 'raise', 'skip', 'stop'")
    for i, cb in enumerate(trainer.callback_list):
        if not isinstance(cb, Callback):
            raise ConfigError(
                f"Trainer(callbacks[{i}]={cb!r}): callbacks must be fnloop.Callback instances (subclass fnloop.Callback)"
            )
    if trainer.seed is not None:
        _int_flag("seed", trainer.seed, low=0, allow_none=True)
    for name in ("enable_model_summary", "inference_mode", "log_window_spans_epochs"):
        if not isinstance(getattr(trainer, name), bool):
            raise ConfigError(f"Trainer({name}={getattr(trainer, name)!r}): accepted values are True or False")
    _int_flag("reload_dataloaders_every_n_epochs", trainer.reload_dataloaders_every_n_epochs, low=0, extra=" (0: never)")
    from fnloop.checkpoint.callback import check_enable_checkpointing

    check_enable_checkpointing(trainer.enable_checkpointing, trainer.callback_list)
    _distribution_flags(trainer)
    if trainer.min_epochs is not None and trainer.max_epochs not in (None, -1) and trainer.min_epochs > trainer.max_epochs:
        raise ConfigError(
            f"Trainer(min_epochs={trainer.min_epochs}, max_epochs={trainer.max_epochs}): min_epochs must be <= max_epochs"
        )
