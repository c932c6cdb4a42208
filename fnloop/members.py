"""The members of a stacked state in a fit: which still train, their metric names, member i alone.

A stacked state (:func:`fnloop.stack`) trained by ``Trainer.fit`` is N runs at once. The driver
needs three things of them, kept here:

* **Which members still train.** ``state.loop.callbacks["members"]["active"]`` is a list of N
  booleans (absent: all train). :func:`fnloop.vmap`'s train step keeps the tensors of a member
  that stopped (params, buffers, optimizer state, step counter, carried option tensors) exactly
  as they were, with ``torch.where``; a callback stops members with :func:`stop_members`. The
  mask is a Python leaf of the state, so it is checkpointed and costs no host sync.
* **Metric names.** A metric of shape ``[N]`` is logged as the name a single run logs, then
  ``/member_<i>`` (``train/loss/member_3``, ``val/loss/member_0``, ``train/loss_epoch/member_1``),
  and under the plain name as the mean over the members (what the progress bar shows).
* **Member i alone.** :func:`member_state` is member i as a state of its own, its per-member
  callback records (``{"members": [record_0, ...]}``) replaced by its own record.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> s = fl.stack([fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1), seed=i) for i in range(3)])
    >>> active(stop_members(s, [1]))
    [True, False, True]
    >>> expand({"val/loss": torch.tensor([1.0, 2.0, 6.0])})
    {'val/loss': 3.0, 'val/loss/member_0': 1.0, 'val/loss/member_1': 2.0, 'val/loss/member_2': 6.0}
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fnloop.stacking import num_members, unstack
from fnloop.tree import tree_map

__all__ = [
    "MEMBERS_KEY",
    "is_stacked",
    "active",
    "stop_members",
    "keep_stopped",
    "member_key",
    "split_key",
    "renamed",
    "expand",
    "member_values",
    "member_metrics",
    "member_state",
]

MEMBERS_KEY = "members"
"""The entry of ``state.loop.callbacks`` holding ``{"active": [bool] * N}``."""

_SUFFIX = re.compile(r"^(.*)/member_(\d+)$")


def is_stacked(state: Any) -> bool:
    """Whether ``state`` is a stacked state (its ``step`` counter has a member dimension).

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> s = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
        >>> is_stacked(s), is_stacked(fl.stack([s, s]))
        (False, True)
    """
    step = getattr(state, "step", None)
    return isinstance(step, torch.Tensor) and step.ndim == 1


def active(state: Any) -> list[bool] | None:
    """Which members still train (a list of N booleans), None when no member ever stopped.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> active(fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))) is None
        True
    """
    record = state.loop.callbacks.get(MEMBERS_KEY)
    return None if record is None else list(record["active"])


def stop_members(state: Any, members: Iterable[int]) -> Any:
    """The state with ``members`` stopped: from the next step on, their tensors stay as they are.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> s = fl.stack([fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))] * 2)
        >>> active(stop_members(stop_members(s, [0]), [1]))
        [False, False]
    """
    from fnloop.callbacks.base import with_callback_state

    mask = active(state) or [True] * num_members(state.params)
    for i in members:
        mask[i] = False
    return with_callback_state(state, MEMBERS_KEY, {"active": mask})


@functools.lru_cache(maxsize=64)
def _mask_on(mask: tuple[bool, ...], device: torch.device) -> torch.Tensor:
    """The mask as a tensor on ``device``, made once per mask (no host-to-device copy per step);
    never written to."""
    return torch.tensor(mask, device=device)


def _keep(mask: tuple[bool, ...], old: Any, new: Any) -> Any:
    if not isinstance(new, torch.Tensor):
        return new
    return torch.where(_mask_on(mask, new.device).reshape(-1, *([1] * (new.ndim - 1))), new, old)


def keep_stopped(old: Any, new: Any) -> Any:
    """``new`` (one train step after ``old``) with every tensor of a stopped member taken from
    ``old`` (bitwise: ``torch.where``); ``new`` itself when every member trains.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> s = stop_members(fl.stack([fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))] * 2), [1])
        >>> keep_stopped(s, s.replace(step=s.step + 1)).step.tolist()
        [1, 0]
    """
    found = active(old)
    if found is None or all(found):
        return new
    mask = tuple(found)

    def keep(a: Any, b: Any) -> Any:
        return tree_map(lambda x, y: _keep(mask, x, y), a, b)

    options = new.loop.options
    if options.tensors and old.loop.options.key == options.key:
        kept = tuple(_keep(mask, x, y) for x, y in zip(old.loop.options.tensors, options.tensors))
        new = new.replace(loop=new.loop.replace(options=type(options)(options.key, kept)))
    return new.replace(
        step=_keep(mask, old.step, new.step),
        params=keep(old.params, new.params),
        buffers=keep(old.buffers, new.buffers),
        opt_state=keep(old.opt_state, new.opt_state),
    )


def member_key(name: str, i: int) -> str:
    """The name member i's value of ``name`` is logged under.

    Example:
        >>> member_key("val/loss", 3)
        'val/loss/member_3'
    """
    return f"{name}/member_{i}"


def split_key(name: str) -> tuple[str, int | None]:
    """``(name without its member suffix, member index or None)``.

    Example:
        >>> split_key("val/loss/member_12"), split_key("val/loss")
        (('val/loss', 12), ('val/loss', None))
    """
    found = _SUFFIX.match(name)
    return (name, None) if found is None else (found.group(1), int(found.group(2)))


def renamed(name: str, change: Any) -> str:
    """``change`` applied to the name without its member suffix, the suffix kept.

    Example:
        >>> renamed("train/loss/member_2", lambda n: n + "_epoch")
        'train/loss_epoch/member_2'
    """
    base, i = split_key(name)
    return change(base) if i is None else member_key(change(base), i)


def expand(values: Mapping[str, Any]) -> dict[str, float]:
    """Tensors (0-d, or ``[N]`` for a stacked run, N >= 1) as floats, in one transfer to the host:
    a ``[N]`` value under its name (the mean over members) and under each member's name.

    Example:
        >>> expand({"loss": torch.tensor(2.0), "acc": torch.tensor([0.5, 1.0])})
        {'loss': 2.0, 'acc': 0.75, 'acc/member_0': 0.5, 'acc/member_1': 1.0}
    """
    if not values:
        return {}
    parts = []
    for v in values.values():
        v = torch.as_tensor(v).detach().to(torch.float64)
        parts.append(torch.cat([v.mean().reshape(1), v]) if v.ndim == 1 else v.reshape(1))
    flat = torch.cat([p.to("cpu") for p in parts]).tolist()
    out: dict[str, float] = {}
    at = 0
    for name, part in zip(values, parts):
        out[name] = flat[at]
        out.update({member_key(name, i): flat[at + 1 + i] for i in range(part.numel() - 1)})
        at += part.numel()
    return out


def member_values(metrics: Mapping[str, float], name: str, n: int) -> list[float] | None:
    """Member values of ``name`` (``name/member_<i>`` for i < n), None when they are not there.

    Example:
        >>> member_values({"val/loss/member_0": 1.0, "val/loss/member_1": 3.0}, "val/loss", 2)
        [1.0, 3.0]
    """
    keys = [member_key(name, i) for i in range(n)]
    return [float(metrics[k]) for k in keys] if all(k in metrics for k in keys) else None


def member_metrics(metrics: Mapping[str, float], i: int) -> dict[str, float]:
    """Member i's metrics under the names a run of it alone logs: ``<name>/member_<i>`` becomes
    ``<name>``; the other members' values and the means over members are dropped.

    Example:
        >>> member_metrics({"val/loss": 2.0, "val/loss/member_0": 1.0, "val/loss/member_1": 3.0, "lr": 0.1}, 1)
        {'lr': 0.1, 'val/loss': 3.0}
    """
    split = {k: split_key(k) for k in metrics}
    stacked = {base for base, j in split.values() if j is not None}
    out = {k: v for k, v in metrics.items() if split[k][1] is None and k not in stacked}
    out.update({split[k][0]: v for k, v in metrics.items() if split[k][1] == i})
    return out


def _local(record: Any, i: int) -> Any:
    if isinstance(record, Mapping) and isinstance(record.get("members"), list) and len(record) == 1:
        return dict(record["members"][i])
    return record


def member_state(stacked: Any, i: int, /) -> Any:
    """Member i of a stacked state as a state of its own: its tensors, and the callbacks' records
    of member i (an entry ``{"members": [record_0, ...]}`` becomes ``record_i``); the
    ``"members"`` mask is dropped.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> s = fl.stack([fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1), seed=i) for i in range(3)])
        >>> from fnloop.callbacks.base import with_callback_state
        >>> s = with_callback_state(s, "EarlyStopping[val/loss]", {"members": [{"wait_count": i} for i in range(3)]})
        >>> dict(member_state(stop_members(s, [2]), 2).loop.callbacks)
        {'EarlyStopping[val/loss]': {'wait_count': 2}}
    """
    from fnloop.state import CallbackStates

    member = unstack(stacked)[i]
    records = {k: _local(v, i) for k, v in member.loop.callbacks.items() if k != MEMBERS_KEY}
    return member.replace(loop=member.loop.replace(callbacks=CallbackStates(records)))
