"""The ``fnloop`` argument parser: one jsonargparse parser per subcommand, all accepting the
same config keys, and error messages that name the key and the accepted values.

Example:
    >>> from fnloop.cli.parser import build_parser
    >>> parser = build_parser()
    >>> sorted(parser.stage_parsers)
    ['fit', 'predict', 'test', 'validate']
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import difflib
import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any, Literal

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace

from fnloop.checkpoint.manager import CheckpointManager
from fnloop.cli.optimizer import SCHEDULES
from fnloop.errors import ConfigError
from fnloop.loggers import Logger
from fnloop.trainer import Trainer

__all__ = ["STAGES", "LOGGER_NAMES", "ScheduleSpec", "AnyDataModule", "CLIParser", "ShortHelp", "build_parser", "explain"]

STAGES: tuple[str, ...] = ("fit", "validate", "test", "predict")
"""The subcommands."""

LOGGER_NAMES: tuple[str, ...] = ("tensorboard", "csv", "jsonl", "console")
"""Shorthands accepted in ``trainer.loggers``."""

_DESCRIPTIONS = {
    "fit": "Train (then test, with test_after_fit), checkpointing and logging into the run folder.",
    "validate": "Run the metric function over the validation data.",
    "test": "Run the metric function over the test data.",
    "predict": "Run predict_fn over the predict data; outputs go to <run folder>/predictions.pt.",
}


@dataclasses.dataclass
class ScheduleSpec:
    """``schedule:`` in a config: a ``fnloop.optim`` schedule by name and its arguments.

    Attributes:
        name: the schedule (``warmup_cosine``, ``linear``, ...); ``None``: a constant ``optimizer.lr``.
        init_args: its keyword arguments; its first argument (``peak_lr``, ``lr``, ``start_lr``,
            ``max_lr``) defaults to ``optimizer.lr``.
    """

    name: Literal[SCHEDULES] | None = None  # type: ignore[valid-type]
    init_args: dict[str, Any] = dataclasses.field(default_factory=dict)


class AnyDataModule(abc.ABC):
    """Any class with at least one data module method counts as a subclass (for ``data:``).

    Example:
        >>> class Data:
        ...     def train_data(self):
        ...         return []
        >>> issubclass(Data, AnyDataModule), issubclass(int, AnyDataModule)
        (True, False)
    """

    _METHODS = ("setup", "train_data", "val_data", "test_data", "predict_data", "train_dataloader", "test_dataloader")

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        return True if any(callable(getattr(other, m, None)) for m in cls._METHODS) else NotImplemented


class CLIParser:
    """The top parser and the parser of each subcommand (kept to dump and explain configs)."""

    def __init__(self, top: ArgumentParser, stage_parsers: dict[str, ArgumentParser]) -> None:
        self.top = top
        self.stage_parsers = stage_parsers

    def parse(self, argv: list[str]) -> tuple[str, Namespace]:
        """``(stage, config)`` from the command line.

        Raises:
            ConfigError: a bad key, value or import path; the message names the key and what
                is accepted.
            SystemExit: ``--help`` or ``--print_config`` (code 0).
        """
        try:
            cfg = self.top.parse_args(argv)
        except argparse.ArgumentError as err:
            stage = next((a for a in argv if a in self.stage_parsers), None)
            raise ConfigError(explain(str(err), self.stage_parsers.get(stage))) from None
        return cfg.subcommand, cfg[cfg.subcommand]


_KNOWN_SUBCLASSES = re.compile(r", known subclasses: [^()]*")


class ShortHelp(DefaultHelpFormatter):
    """jsonargparse's help without the list of every known subclass (of ``torch.nn.Module``:
    about a hundred torch internals), under a one-line usage."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return _KNOWN_SUBCLASSES.sub("", super()._get_help_string(action))


def _stage_parser(stage: str) -> ArgumentParser:
    p = ArgumentParser(
        description=_DESCRIPTIONS[stage], exit_on_error=False, allow_abbrev=False, formatter_class=ShortHelp,
        usage=f"fnloop {stage} --config CONFIG [--KEY VALUE ...]  (keys below; --print_config shows a full config)",
    )
    p.add_argument("--config", action=ActionConfigFile, help="a YAML config file (repeatable; later ones override)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initial weights and the state's RNG")
    p.add_argument("--name", type=str | None, default=None, help="run name (default: the config file's stem)")
    p.add_subclass_arguments(torch.nn.Module, "model", required=True, help="the model: class_path and init_args")
    p.add_argument("--loss_fn", type=Callable, required=True, help="import path of loss_fn(model, batch)")
    p.add_argument("--metric_fn", type=Callable | None, default=None, help="eval function (default: loss_fn)")
    p.add_argument("--predict_fn", type=Callable | None, default=None, help="predict function (for predict)")
    p.add_subclass_arguments(AnyDataModule, "data", required=True, help="a data module: class_path and init_args")
    p.add_argument("--optimizer", type=dict[str, Any], default={"name": "adamw"},
                   help="a fnloop.optim optimizer name and its keyword arguments, e.g. {name: adamw, lr: 0.001}")
    p.add_argument("--schedule", type=ScheduleSpec, default=ScheduleSpec(), help="a learning rate schedule")
    p.add_class_arguments(Trainer, "trainer", skip={"logger"}, instantiate=False)
    sinks = list[Literal[LOGGER_NAMES] | Logger]  # type: ignore[valid-type]
    p.add_argument("--trainer.loggers", type=sinks, default=[],
                   help=f"logger sinks: {', '.join(LOGGER_NAMES)} or class_path entries")
    p.add_class_arguments(CheckpointManager, "checkpoint", skip={"directory_url"}, instantiate=False)
    p.add_argument("--ckpt_path", type=str | None, default=None, help="'last', 'best' or a checkpoint URL")
    p.add_argument("--test_after_fit", type=bool, default=True, nargs="?", const=True,
                   help="fit: then test the best checkpoint (else the final state)")
    p.add_argument("--run_dir", type=str | None, default=None, help="use this run folder instead of a new version")
    p.add_argument("--overwrite_config", type=bool, default=False, nargs="?", const=True,
                   help="replace a config.yaml of the run folder that differs from this config")
    return p


def build_parser() -> CLIParser:
    """The ``fnloop`` parser with its four subcommands.

    Example:
        >>> build_parser().top.prog
        'fnloop'
    """
    top = ArgumentParser(prog="fnloop", description="fnloop: train, validate, test and predict from a config.", formatter_class=ShortHelp,
                         exit_on_error=False, allow_abbrev=False)
    sub = top.add_subcommands(required=True)
    stage_parsers = {}
    for stage in STAGES:
        stage_parsers[stage] = _stage_parser(stage)
        sub.add_subcommand(stage, stage_parsers[stage], help=_DESCRIPTIONS[stage])
    return CLIParser(top, stage_parsers)


# --- error messages -----------------------------------------------------------------------------

_UNKNOWN = (
    re.compile(r"unrecognized arguments: --([\w.]+)"),
    re.compile(r"does not accept options? '([\w.]+)'"),
    re.compile(r"Key '([\w.]+)' is not expected"),
)

_BAD_INIT_ARG = re.compile(
    r'Parser key "([\w.]+)":.*?class_path \'([\w.]+)\':\s*Option \'(\w+)\' is not accepted', re.S
)


def _keys(parser: ArgumentParser) -> list[str]:
    return sorted({a.dest for a in parser._actions if a.dest not in ("help", "config", "print_config", "==SUPPRESS==")})


def _class_params(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _accepted(keys: list[str], key: str) -> tuple[list[str], str]:
    """The keys accepted next to ``key`` (under its parent group, else at the top level)."""
    prefix = key.rpartition(".")[0]
    under = {k[len(prefix) + 1:] for k in keys if prefix and k.startswith(prefix + ".")}
    accepted = sorted(k for k in under if "." not in k)
    if accepted:
        return accepted, f"under {prefix!r}"
    return sorted({k.split(".")[0] for k in keys}), "at the top level"


def _hint(key: str, accepted: list[str], where: str) -> str:
    close = difflib.get_close_matches(key.rpartition(".")[2], accepted, n=1)
    maybe = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{maybe}; accepted keys {where}: {', '.join(accepted)}"


def explain(message: str, parser: ArgumentParser | None) -> str:
    """jsonargparse's ``message`` with a hint naming the unknown key and the accepted keys.

    Example:
        >>> text = explain("unrecognized arguments: --lossfn x", build_parser().stage_parsers["fit"])
        >>> print(text.splitlines()[1][:61])
        unknown key 'lossfn' (did you mean 'loss_fn'?); accepted keys
    """
    message = message.strip()
    if parser is None:
        return message
    for pattern in _UNKNOWN:
        m = pattern.search(message)
        if m:
            return f"{message}\n{_hint(m.group(1), *_accepted(_keys(parser), m.group(1)))}"
    m = _BAD_INIT_ARG.search(message)
    if m:
        section, class_path, option = m.groups()
        where = f"in {section}.init_args of {class_path}"
        hint = _hint(f"{section}.init_args.{option}", _class_params(class_path), where)
        return f"{message}\n{hint}"
    return message
