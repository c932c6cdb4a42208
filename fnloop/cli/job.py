"""What one command builds from its parsed config: the model, data, steps' functions, optimizer,
trainer flags, checkpoint arguments and logger sinks, checked before any folder is created.

Example:
    >>> from fnloop.cli.job import make_sinks
    >>> import tempfile
    >>> sinks = make_sinks(["csv", "jsonl"], tempfile.mkdtemp())
    >>> [type(s).__name__ for s in sinks.loggers]
    ['CSVLogger', 'JSONLLogger']
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import yaml

from fnloop.checkpoint.manager import CheckpointManager
from fnloop.cli.optimizer import build_optimizer
from fnloop.cli.run_folder import run_name
from fnloop.cli.sweep import build_sweep
from fnloop.errors import ConfigError
from fnloop.loggers import ConsoleLogger, CSVLogger, JSONLLogger, LoggerCollection, TensorBoardLogger
from fnloop.trainer import Trainer

__all__ = ["Job", "build_job", "make_sinks", "CHECKPOINTS"]

CHECKPOINTS = "checkpoints"
"""Subfolder of the run folder that holds the checkpoints."""

_NOT_SAVED = ("run_dir", "overwrite_config")  # where and how to save, not what the run is
_SINKS = {"tensorboard": TensorBoardLogger, "csv": CSVLogger, "jsonl": JSONLLogger}


@dataclasses.dataclass(frozen=True)
class Job:
    """A command's objects, built and checked from its config.

    Attributes:
        stage: ``fit``, ``validate``, ``test`` or ``predict``.
        name: the run name.
        root: the folder holding every run (``trainer.default_root_dir`` or ``runs``).
        config_text: the resolved config as YAML (saved as ``config.yaml``).
        seed: the state's seed.
        model, data, loss_fn, metric_fn, predict_fn, tx: the run's objects; for a sweep ``tx``
            is the list of the members' optimizers (:mod:`fnloop.cli.sweep`).
        trainer: the Trainer (callbacks included, no logger yet).
        checkpoint_args: keyword arguments of the run's :class:`CheckpointManager`; None when
            checkpointing is off (``checkpoint: null`` or ``trainer.enable_checkpointing: false``).
        loggers: the ``trainer.loggers`` entries (names or sink instances).
        ckpt_path, run_dir, overwrite_config, test_after_fit: the command's options.
        sweep: each member's swept values by config key (``{"optimizer.lr": 0.001}``); empty
            when the config sweeps nothing.
    """

    stage: str
    name: str
    root: str
    config_text: str
    seed: int
    model: torch.nn.Module
    data: Any
    loss_fn: Callable[..., Any]
    metric_fn: Callable[..., Any]
    predict_fn: Callable[..., Any] | None
    tx: Any
    trainer: Trainer
    checkpoint_args: dict[str, Any] | None
    loggers: Sequence[Any]
    ckpt_path: str | None
    run_dir: str | None
    overwrite_config: bool
    test_after_fit: bool
    sweep: tuple[dict[str, Any], ...] = ()

    def manager(self, run_dir: str) -> CheckpointManager:
        """The checkpoint manager of ``run_dir/checkpoints`` (default arguments when checkpointing is off)."""
        return CheckpointManager(os.path.join(run_dir, CHECKPOINTS), **(self.checkpoint_args or {}))


def make_sinks(loggers: Sequence[Any], run_dir: str) -> LoggerCollection:
    """The logger sinks of a run, all writing into ``run_dir``: names (``tensorboard``, ``csv``,
    ``jsonl``, ``console``) or sink instances (file sinks without ``log_dir`` are pointed at it).

    Example:
        >>> make_sinks(["console"], "unused").log_dir is None
        True
    """
    sinks = []
    for entry in loggers:
        if entry == "console":
            sinks.append(ConsoleLogger())
        elif isinstance(entry, str):
            sinks.append(_SINKS[entry](log_dir=run_dir))
        else:
            sinks.append(entry)
    return LoggerCollection(sinks, run_dir=run_dir)


def _config_error_in(err: BaseException | None) -> ConfigError | None:
    """The ConfigError a constructor raised, when jsonargparse wrapped it in its own error."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _named(section: str, err: ConfigError) -> ConfigError:
    """``err`` with the config key in front: ``Trainer(max_epochs=-3): ...`` -> ``trainer.max_epochs: ...``."""
    m = re.match(r"\w+\((\w+)=", str(err))
    return ConfigError(f"{section}.{m.group(1) if m else ''}: {err}".replace(".: ", ": "))


def _check_function(key: str, fn: Any, named: Any) -> None:
    """A ``loss_fn``/``metric_fn``/``predict_fn`` must name a function (not a class, module or value)."""
    if fn is None:
        return
    problem = None
    if isinstance(fn, (type, torch.nn.Module)) or not callable(fn):
        problem = f"names {'a class' if isinstance(fn, (type, torch.nn.Module)) else 'a ' + type(fn).__name__}, not a function"
    else:
        try:
            inspect.signature(fn).bind(None, None)
        except TypeError:
            problem = "names a function that does not take (model, batch)"
        except ValueError:  # a builtin without a signature: it is called as given
            pass
    if problem is not None:
        named = getattr(named, "class_path", named)
        raise ConfigError(f"{key}: {named!r} {problem}; give the import path of a function f(model, batch)")


def _plain(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else dict(vars(value))


def build_job(stage: str, cfg: Any, parser: Any) -> Job:
    """Build and check everything ``cfg`` names (no folder or file is created).

    Args:
        stage: the subcommand.
        cfg: the subcommand's parsed namespace (not instantiated).
        parser: the subcommand's jsonargparse parser.

    Raises:
        ConfigError: a value a constructor rejects (e.g. ``trainer.max_epochs: -3``); the message
            names the config section.

    Example:
        >>> from fnloop.cli.parser import build_parser
        >>> parser = build_parser()
        >>> stage, cfg = parser.parse(["fit", "--config", "examples/digits.yaml"])  # doctest: +SKIP
        >>> build_job(stage, cfg, parser.stage_parsers[stage]).trainer.max_epochs  # doctest: +SKIP
        40
    """
    cfg.name = run_name(cfg.name, cfg.get("config"))
    dumped = yaml.safe_load(parser.dump(cfg, skip_unset=False)) or {}
    text = yaml.safe_dump({k: v for k, v in dumped.items() if k not in _NOT_SAVED}, sort_keys=False)
    try:
        with torch.random.fork_rng(devices=[]):  # the model's initial weights come from `seed`; the global RNG is kept
            torch.manual_seed(cfg.seed)
            objs = parser.instantiate(cfg)
    except Exception as err:
        found = _config_error_in(err)
        if found is None:
            raise
        raise ConfigError(f"building the objects of the config: {found}") from None
    for key in ("loss_fn", "metric_fn", "predict_fn"):
        _check_function(key, getattr(objs, key, None), cfg.get(key))
    found = build_sweep(cfg.optimizer, cfg.schedule.name, cfg.schedule.init_args)
    if found is None:
        tx, sweep = build_optimizer(cfg.optimizer, cfg.schedule.name, cfg.schedule.init_args), []
    else:
        tx, sweep = found
    flags = {k: v for k, v in _plain(objs.trainer).items() if k != "loggers"}
    if cfg.checkpoint is None:  # `checkpoint: null` turns checkpointing off
        flags["enable_checkpointing"] = False
    try:
        trainer = Trainer(**flags)
    except ConfigError as err:
        raise _named("trainer", err) from None
    ckpt = None if trainer.enable_checkpointing is False else _plain(cfg.checkpoint)
    try:
        CheckpointManager("memory://fnloop-cli/checked", **(ckpt or {})).close()
    except ConfigError as err:
        raise _named("checkpoint", err) from None
    return Job(
        stage=stage,
        name=cfg.name,
        root=cfg.trainer.default_root_dir or "runs",
        config_text=text,
        seed=cfg.seed,
        model=objs.model,
        data=objs.data,
        loss_fn=objs.loss_fn,
        metric_fn=objs.metric_fn or objs.loss_fn,
        predict_fn=objs.predict_fn,
        tx=tx,
        trainer=trainer,
        checkpoint_args=ckpt,
        loggers=list(objs.trainer.loggers or []),
        ckpt_path=cfg.ckpt_path,
        run_dir=cfg.run_dir,
        overwrite_config=cfg.overwrite_config,
        test_after_fit=cfg.test_after_fit,
        sweep=tuple(sweep),
    )
