"""A sweep in a config: a list where the optimizer or its schedule takes a number
(``optimizer: {name: adamw, lr: [1e-3, 3e-3, 1e-2]}``) gives one run per value, trained together as
one stacked state (:func:`fnloop.sweep`); the swept hyperparameters are injected into the state
(:func:`fnloop.optim.inject_hyperparams`). Several lists are zipped (one length for all); an
argument that takes a sequence (``betas``) is swept by a list of sequences.

Example:
    >>> txs, members = build_sweep({"name": "sgd", "lr": [0.1, 0.01], "momentum": 0.9})
    >>> len(txs), members
    (2, [{'optimizer.lr': 0.1}, {'optimizer.lr': 0.01}])
    >>> build_sweep({"name": "sgd", "lr": 0.1}) is None
    True
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import torch

import fnloop.optim as flo
from fnloop.callbacks.base import Callback
from fnloop.cli.optimizer import OPTIMIZERS, SCHEDULES, _arguments
from fnloop.errors import ConfigError

__all__ = ["build_sweep", "swept", "initial_state", "monitored", "MemberRecord", "report"]

_SEQUENCES = (tuple, list, collections.abc.Sequence)


def _takes_sequence(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_takes_sequence(h) for h in typing.get_args(hint))
    return typing.get_origin(hint) in _SEQUENCES or hint in _SEQUENCES


def swept(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The arguments of ``fn`` that ``kwargs`` sweeps: a list where ``fn`` takes a number, a list
    of lists where it takes a sequence.

    Example:
        >>> swept(flo.adam, {"lr": [0.1, 0.2], "betas": [0.9, 0.99], "eps": 1e-8})
        {'lr': [0.1, 0.2]}
    """
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: judge by the default value
        hints = {n: type(p.default) for n, p in inspect.signature(fn).parameters.items()}
    out = {}
    for name, value in kwargs.items():
        if not isinstance(value, list):
            continue
        if not _takes_sequence(hints.get(name)) or (value and all(isinstance(v, (list, tuple)) for v in value)):
            out[name] = value
    return out


def _column(where: str, values: list[Any], n: int | None) -> int:
    if not values:
        raise ConfigError(f"{where}=[] sweeps no value; give a list of at least one value")
    if n is not None and len(values) != n:
        raise ConfigError(
            f"{where} lists {len(values)} values but another swept key lists {n}; give swept lists of one length"
        )
    return len(values)


def build_sweep(
    optimizer: Mapping[str, Any], schedule: str | None = None, schedule_args: Mapping[str, Any] | None = None
) -> tuple[list[flo.GradientTransformation], list[dict[str, Any]]] | None:
    """The members' optimizers and swept values (by config key) of a config that sweeps; None
    when no optimizer or schedule argument is a list.

    Raises:
        ConfigError: lists of different lengths, an empty list, a bad value of a member, or a
            swept argument that cannot be injected (a flag, a step count): its config key.
    """
    name = optimizer.get("name") if isinstance(optimizer, Mapping) else None
    if name not in OPTIMIZERS or (schedule is not None and schedule not in SCHEDULES):
        return None  # build_optimizer reports it
    fn = getattr(flo, name)
    sched_args = dict(schedule_args or {})
    columns = {f"optimizer.{k}": v for k, v in swept(fn, optimizer).items()}
    if schedule is not None:
        columns.update({f"schedule.init_args.{k}": v for k, v in swept(getattr(flo, schedule), sched_args).items()})
    if not columns:
        return None
    n = None
    for where, values in columns.items():
        n = _column(where, values, n)
    assert n is not None
    txs, members = [], []
    for i in range(n):
        row = {where: values[i] for where, values in columns.items()}
        opt = {k: row.get(f"optimizer.{k}", v) for k, v in optimizer.items()}
        args = {k: row.get(f"schedule.init_args.{k}", v) for k, v in sched_args.items()}
        try:
            _, factory, kwargs = _arguments(opt, schedule, args)
            txs.append(flo.inject_hyperparams(factory)(**kwargs))
        except ConfigError as err:
            raise ConfigError(f"sweep member {i} ({_label(row)}): {err}") from None
        members.append(row)
    _check_injected(txs[0], columns)
    return txs, members


def _label(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in row.items())


def _check_injected(tx: flo.GradientTransformation, columns: Mapping[str, Any]) -> None:
    names = set(flo.hyperparams(tx.init({})))
    for where in columns:
        section, _, key = where.rpartition(".")
        wanted = f"lr.{key}" if section == "schedule.init_args" else key
        if wanted not in names and not any(n.startswith(f"{wanted}.") for n in names):
            raise ConfigError(
                f"{where} is a list, but {key} cannot be swept in one stacked run (it is not a number the "
                f"optimizer keeps as a tensor; injected: {', '.join(sorted(names))}); give it one value"
            )


def initial_state(module: torch.nn.Module, tx: Any, seed: int) -> Any:
    """The state of a run: ``TrainState.create``, or for a sweep (a list of optimizers) the stack
    of its members, all from the same initial weights (``seed``).

    Example:
        >>> txs, _ = build_sweep({"name": "sgd", "lr": [0.1, 0.01]})
        >>> initial_state(torch.nn.Linear(2, 1), txs, 0).params["weight"].shape
        torch.Size([2, 1, 2])
    """
    from fnloop.stacking import stack
    from fnloop.state import TrainState

    if isinstance(tx, list):  # a GradientTransformation is a (named) tuple
        return stack([TrainState.create(module, t, seed=seed) for t in tx])
    return TrainState.create(module, tx, seed=seed)


def monitored(checkpoint_args: Mapping[str, Any] | None, callbacks: Any) -> tuple[str, str]:
    """The metric that ranks the members and its mode: the checkpoint's ``monitor``, else the
    first ``EarlyStopping``'s, else ``val/loss`` (min).

    Example:
        >>> monitored({"monitor": "val/acc", "mode": "max"}, [])
        ('val/acc', 'max')
    """
    if checkpoint_args and checkpoint_args.get("monitor"):
        return checkpoint_args["monitor"], checkpoint_args.get("mode", "min")
    for cb in callbacks or ():
        if type(cb).__name__ == "EarlyStopping":
            return cb.monitor, cb.mode
    return "val/loss", "min"


class MemberRecord(Callback):
    """A callback keeping each member's best value of ``monitor`` over the fit's validations.

    Example:
        >>> r = MemberRecord("val/loss", "min")
        >>> r.on_validation_end(None, {"val/loss/member_0": 2.0, "val/loss/member_1": 1.0})
        >>> r.on_validation_end(None, {"val/loss/member_0": 1.5, "val/loss/member_1": 3.0})
        >>> r.best
        {0: 1.5, 1: 1.0}
    """

    def __init__(self, monitor: str, mode: str) -> None:
        self.monitor, self.mode = monitor, mode
        self.best: dict[int, float] = {}

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        prefix = f"{self.monitor}/member_"
        for key, value in metrics.items():
            if key.startswith(prefix) and key[len(prefix):].isdigit():
                i, value = int(key[len(prefix):]), float(value)
                old = self.best.get(i)
                if old is None or (value < old if self.mode == "min" else value > old):
                    self.best[i] = value


def report(members: list[dict[str, Any]], record: MemberRecord, test: Mapping[str, float] | None) -> int:
    """Print each member's swept values, best monitored value and test accuracy, then the best
    member (by the monitored metric, else by test accuracy); return its index.

    Example:
        >>> r = MemberRecord("val/loss", "min"); r.best = {0: 0.5, 1: 0.2}
        >>> test = {"test/acc/member_0": 0.9, "test/acc/member_1": 0.95}
        >>> report([{"optimizer.lr": 0.1}, {"optimizer.lr": 0.01}], r, test)
        sweep member 0: lr=0.1  best val/loss 0.5000  test accuracy 0.9000
        sweep member 1: lr=0.01  best val/loss 0.2000  test accuracy 0.9500
        best member: 1 (lr=0.01) by val/loss 0.2000
        1
    """
    keys = {i: f"test/acc/member_{i}" for i in range(len(members))}
    accs = {i: float(test[k]) for i, k in keys.items() if test and k in test}
    for i, row in enumerate(members):
        parts = [f"sweep member {i}: {_label(row)}"]
        if i in record.best:
            parts.append(f"best {record.monitor} {record.best[i]:.4f}")
        if i in accs:
            parts.append(f"test accuracy {accs[i]:.4f}")
        print("  ".join(parts), flush=True)
    if len(record.best) == len(members):
        pick = min if record.mode == "min" else max
        best = pick(record.best, key=lambda i: record.best[i])
        how = f"{record.monitor} {record.best[best]:.4f}"
    elif len(accs) == len(members):
        best = max(accs, key=lambda i: accs[i])
        how = f"test accuracy {accs[best]:.4f}"
    else:
        print("best member: no validation or test metric per member to rank them", flush=True)
        return -1
    print(f"best member: {best} ({_label(members[best])}) by {how}", flush=True)
    return best
