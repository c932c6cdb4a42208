"""Stack N states into one whose tensors have a leading member dimension, and split it back.

A stacked state is what :func:`fnloop.vmap` steps: N training runs as one batched computation
(ensembles, seeds). States built by separate ``TrainState.create`` calls hold different template
and optimizer objects; :func:`stack` compares those static parts *by structure* (module classes,
parameter names, shapes, dtypes and hyperparameters; an optimizer's hyperparameters are the
values its functions close over) and keeps the first state's.

What a stacked state holds:

* every tensor leaf (``step``, ``rng``, params, buffers, optimizer state, the step options'
  carried tensors) gains a leading dimension of size N; members may sit at different steps;
* the Python leaves of ``state.loop`` (epoch, counters, status, callback states) must be equal
  across members and are kept once: a stacked run advances them together.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> states = [fl.TrainState.create(torch.nn.Linear(3, 2), flo.adam(lr=1e-3), seed=i) for i in range(4)]
    >>> stacked = fl.stack(states)
    >>> stacked.params["weight"].shape, stacked.rng.tolist()
    (torch.Size([4, 2, 3]), [0, 1, 2, 3])
    >>> fl.testing.assert_trees_equal(fl.unstack(stacked)[2].params, states[2].params)
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Sequence
from typing import Any

import optree
import torch

from fnloop.errors import TreeMismatchError
from fnloop.state import OptionsState
from fnloop.tree import NAMESPACE, tree_flatten_with_path, tree_leaves, tree_map

__all__ = ["stack", "unstack", "num_members", "static_difference"]

# attributes of a module that do not describe its structure (a template's mode is never used)
_MODULE_SKIP = frozenset({"training"})


def _is_leaf(x: Any) -> bool:
    return optree.tree_is_leaf(x, namespace=NAMESPACE)


def _same_number(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _tensor_difference(a: torch.Tensor, b: torch.Tensor) -> str | None:
    for what in ("shape", "dtype", "device", "requires_grad"):
        if getattr(a, what) != getattr(b, what):
            return f"{what} {getattr(a, what)} vs {getattr(b, what)}"
    if a.device.type != "meta" and not torch.equal(a, b):
        return "values differ"
    return None


def static_difference(a: Any, b: Any, path: str = "", _seen: set[tuple[int, int]] | None = None) -> tuple[str, str] | None:
    """The first place where two static objects (templates, optimizers) differ by structure, as
    ``(key path, what differs)``; None when they are alike.

    Modules compare by class, attributes, parameter and buffer names, shapes and dtypes (their
    mode is ignored); functions by code, defaults and the values they close over (named by the
    closed-over variable, which for an optimizer is its hyperparameter); other objects by type
    and attributes, or ``==``.

    Example:
        >>> import fnloop.optim as flo
        >>> static_difference(flo.sgd(lr=0.1), flo.sgd(lr=0.1)) is None
        True
        >>> static_difference(flo.sgd(lr=0.1, momentum=0.9), flo.sgd(lr=0.1, momentum=0.5))[1]
        '0.9 vs 0.5'
    """
    if a is b:
        return None
    if type(a) is not type(b):
        return path, f"{type(a).__name__} vs {type(b).__name__}"
    seen = set() if _seen is None else _seen
    if (id(a), id(b)) in seen:
        return None
    seen.add((id(a), id(b)))

    def sub(name: Any, x: Any, y: Any) -> tuple[str, str] | None:
        return static_difference(x, y, f"{path}.{name}" if path else str(name), seen)

    if isinstance(a, torch.Tensor):
        found = _tensor_difference(a, b)
        return None if found is None else (path, found)
    if isinstance(a, (int, float, complex, str, bytes, bool, type(None), types.CodeType, type)):
        return None if _same_number(a, b) else (path, f"{a!r} vs {b!r}")
    if isinstance(a, types.FunctionType):
        if a.__code__ is not b.__code__ and a.__code__ != b.__code__:
            return path, f"function {a.__qualname__} vs {b.__qualname__}"
        cells = zip(a.__code__.co_freevars, a.__closure__ or (), b.__closure__ or ())
        parts = [("defaults", a.__defaults__, b.__defaults__), ("kwdefaults", a.__kwdefaults__, b.__kwdefaults__)]
        parts += [(name, x.cell_contents, y.cell_contents) for name, x, y in cells]
        parts += [(k, v, b.__dict__.get(k)) for k, v in a.__dict__.items()]  # attributes (a fused path)
        for name, x, y in parts:
            found = sub(name, x, y)
            if found:
                return found
        return None if a.__dict__.keys() == b.__dict__.keys() else (path, "function attributes differ")
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return path, f"length {len(a)} vs {len(b)}"
        names = getattr(a, "_fields", None) or range(len(a))
        return next((f for n, x, y in zip(names, a, b) if (f := sub(n, x, y))), None)
    if isinstance(a, dict):
        if list(a) != list(b):
            return path, f"keys {list(a)} vs {list(b)}"
        return next((f for k in a if (f := sub(k, a[k], b[k]))), None)
    if isinstance(a, (types.MethodType, types.BuiltinFunctionType)):
        return sub("__self__", a.__self__, b.__self__) if getattr(a, "__func__", a) == getattr(b, "__func__", b) else (path, f"{a!r} vs {b!r}")
    structure = getattr(type(a), "__fnloop_structure__", None)
    if structure is not None:  # the object names its structure; the rest is data of the state (inject_hyperparams)
        return sub("structure", structure(a), structure(b))
    attrs = getattr(a, "__dict__", None)
    if attrs is not None:
        skip = _MODULE_SKIP if isinstance(a, torch.nn.Module) else frozenset()
        keys = [k for k in attrs if k not in skip]
        if keys != [k for k in b.__dict__ if k not in skip]:
            return path, f"attributes {sorted(keys)} vs {sorted(b.__dict__)}"
        return next((f for k in keys if (f := sub(k, attrs[k], b.__dict__[k]))), None)
    slots = [s for c in type(a).__mro__ for s in getattr(c, "__slots__", ())]
    if slots:
        return next((f for s in slots if (f := sub(s, getattr(a, s, None), getattr(b, s, None)))), None)
    try:
        return None if bool(a == b) else (path, f"{a!r} vs {b!r}")
    except Exception:
        return path, f"{a!r} vs {b!r}"


def _mismatch(index: int, path: str, what: str) -> TreeMismatchError:
    for private in ("._modules.", "._parameters.", "._buffers."):
        path = path.replace(private, ".")
    return TreeMismatchError(f"fl.stack: state {index} differs from state 0 at {path or '<root>'} (state 0 vs state {index}): {what}")


def _stack_node(nodes: list[Any], path: str) -> Any:
    first = nodes[0]
    if _is_leaf(first):
        return _stack_leaves(nodes, path)
    children, meta, entries, unflatten = optree.tree_flatten_one_level(first, namespace=NAMESPACE)
    columns: list[list[Any]] = [[c] for c in children]
    for i, node in enumerate(nodes[1:], 1):
        if type(node) is not type(first) or _is_leaf(node):
            raise _mismatch(i, path, f"{type(first).__name__} vs {type(node).__name__}")
        kids, other_meta, other_entries, _ = optree.tree_flatten_one_level(node, namespace=NAMESPACE)
        if list(other_entries) != list(entries):
            raise _mismatch(i, path, f"entries {list(other_entries)} vs {list(entries)}")
        found = static_difference(meta, other_meta)
        if found:
            where = ".".join(p for p in (path, _static_name(first, found[0])) if p)
            raise _mismatch(i, where, found[1] + _optimizer_hint(first, node, where))
        for column, kid in zip(columns, kids):
            column.append(kid)
    names = [str(e) for e in entries]
    return unflatten(meta, [_stack_node(c, f"{path}/{n}" if path else n) for c, n in zip(columns, names)])


def _optimizer_hint(first: Any, other: Any, where: str) -> str:
    """For optimizers that differ: the hyperparameter (as the fused path names it) and how to sweep it."""
    if where.split(".")[0].split("/")[-1] != "tx":
        return ""
    fused = [getattr(getattr(x, "tx", None), "fused", None) for x in (first, other)]
    found = static_difference(*fused) if None not in fused else None
    name = (found[0] if found else where).rsplit(".", 1)[-1]
    if ".structure." in where:
        return (
            f"; {name!r} of the injected optimizers differs (static arguments, the names injected and the "
            "factory must be the same for every member; only their injected values may differ)"
        )
    return (
        f"; the optimizers differ in hyperparameter {name!r}: to stack a sweep, build each optimizer with "
        "fnloop.optim.inject_hyperparams(...)(...) so its hyperparameters are tensors of the state "
        "(or fl.sweep), or give every member the same value"
    )


def _static_name(node: Any, path: str) -> str:
    """``0.tx`` -> ``tx`` for a dataclass whose metadata is the tuple of its static fields."""
    fields = getattr(node, "__dataclass_fields__", None)
    if not fields or not path:
        return path
    head, _, rest = path.partition(".")
    static = [n for n, f in fields.items() if f.metadata.get("fnloop_static")]
    if head.isdigit() and int(head) < len(static):
        return ".".join(p for p in (static[int(head)], rest) if p)
    return path


def _stack_leaves(leaves: list[Any], path: str) -> Any:
    first = leaves[0]
    if isinstance(first, torch.Tensor):
        for i, x in enumerate(leaves[1:], 1):
            if not isinstance(x, torch.Tensor):
                raise _mismatch(i, path, f"a tensor vs {type(x).__name__}")
            for what in ("shape", "dtype", "device"):
                if getattr(x, what) != getattr(first, what):
                    raise _mismatch(i, path, f"{what} {getattr(first, what)} vs {getattr(x, what)}")
        return torch.stack([x.detach() if not x.requires_grad else x for x in leaves])
    if isinstance(first, OptionsState):
        for i, x in enumerate(leaves[1:], 1):
            if x.key != first.key or len(x.tensors) != len(first.tensors):
                raise _mismatch(i, path, f"step options {first.key} vs {x.key}; step every member with the same options")
        cols = zip(*(x.tensors for x in leaves))
        return OptionsState(first.key, tuple(_stack_leaves(list(c), f"{path}/tensors") for c in cols))
    for i, x in enumerate(leaves[1:], 1):
        found = static_difference(first, x)
        if found:
            raise _mismatch(
                i, path, f"{first!r} vs {x!r}; the Python leaves of a state (loop counters) must be equal across members"
            )
    return copy.deepcopy(first)


def stack(states: Sequence[Any], /) -> Any:
    """One state whose tensor leaves stack those of ``states`` along a new leading dimension.

    Args:
        states: states (or any pytrees) of the same structure: same module class and shapes,
            same optimizer and hyperparameters (but for those injected with
            ``fnloop.optim.inject_hyperparams``), equal Python leaves (loop counters). Static
            parts are compared by structure; the result keeps the first state's.

    Returns:
        The stacked state; ``state.params[k]`` has shape ``[len(states), *shape]``.

    Raises:
        TreeMismatchError: naming the first key path (leaf, template attribute or optimizer
            hyperparameter) where a state differs from the first.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> a = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1), seed=0)
        >>> b = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.2), seed=1)
        >>> fl.stack([a, b])
        Traceback (most recent call last):
        ...
        fnloop.errors.TreeMismatchError: fl.stack: state 1 differs from state 0 at tx...: 0.1 vs 0.2; the optimizers differ in hyperparameter 'lr': ...
        >>> make = flo.inject_hyperparams(flo.sgd)  # hyperparameters as tensors of the state: a sweep stacks
        >>> a, b = (fl.TrainState.create(torch.nn.Linear(2, 1), make(lr=lr)) for lr in (0.1, 0.2))
        >>> fl.stack([a, b]).opt_state.hyperparams["lr"].tolist()
        [0.1, 0.2]
    """
    from fnloop.execution import check_not_donated

    states = list(states)
    if not states:
        raise TreeMismatchError("fl.stack: got no states; pass a non-empty list")
    for s in states:  # a donated state's tensors are another state's now
        check_not_donated(s, "fl.stack")
    return _stack_node(states, "")


def num_members(stacked: Any, /) -> int:
    """N, the leading dimension every tensor leaf of a stacked state shares.

    Example:
        >>> import torch, fnloop as fl
        >>> num_members({"w": torch.zeros(3, 2), "b": torch.zeros(3)})
        3
    """
    found = {x.shape[0] if x.ndim else None for x in tree_leaves(stacked) if isinstance(x, torch.Tensor)}
    if len(found) == 1 and None not in found:
        return int(found.pop())  # type: ignore[arg-type]
    paths, leaves, _ = tree_flatten_with_path(stacked)  # the paths only to say where it is not stacked
    sizes = [(p, x.shape[0] if x.ndim else None) for p, x in zip(paths, leaves) if isinstance(x, torch.Tensor)]
    if not sizes:
        raise TreeMismatchError("unstack: the state holds no tensor")
    n = sizes[0][1]
    for p, size in sizes:
        if size is None or size != n:
            shown = "a 0-d tensor" if size is None else f"leading dimension {size}"
            raise TreeMismatchError(f"{p or '<root>'} has {shown}, but {sizes[0][0]} has {n}: this is not a stacked state (fl.stack)")
    return int(n)  # type: ignore[arg-type]


def _member(x: Any, i: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[i].clone()  # its own memory: stepping a member never writes into the stack
    if isinstance(x, OptionsState):
        return OptionsState(x.key, tuple(t[i].clone() for t in x.tensors))
    return copy.deepcopy(x)


def unstack(stacked: Any, /) -> list[Any]:
    """The members of a stacked state: ``unstack(stack(states))[i]`` equals ``states[i]`` bitwise
    (with the first state's template and optimizer objects).

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> s = fl.stack([fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1), seed=i) for i in range(3)])
        >>> [int(m.rng) for m in fl.unstack(s)]
        [0, 1, 2]
    """
    n = num_members(stacked)
    return [tree_map(lambda x, i=i: _member(x, i), stacked) for i in range(n)]
