"""Frozen pytree dataclasses and tree helpers bound to the ``fnloop`` optree namespace.

Every class made with :func:`dataclass` is registered twice: with optree (namespace
``"fnloop"``) and with ``torch.utils._pytree``, so optree, ``torch.compile`` and
``torch.func.vmap`` all see the same leaves.

Example:
    >>> import torch, fnloop as fl
    >>> @fl.dataclass
    ... class Pair:
    ...     a: torch.Tensor
    ...     name: str = fl.field(static=True, default="p")
    >>> fl.tree_leaves(Pair(torch.ones(2)))
    [tensor([1., 1.])]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import optree
import torch.utils._pytree as torch_pytree

from fnloop.errors import ConfigError, TreeMismatchError

__all__ = [
    "NAMESPACE",
    "dataclass",
    "field",
    "tree_map",
    "tree_map_with_path",
    "tree_leaves",
    "tree_flatten",
    "tree_flatten_with_path",
    "tree_unflatten",
    "tree_structure",
    "tree_paths",
    "keystr",
    "check_same_structure",
]

NAMESPACE = "fnloop"
_STATIC = "fnloop_static"
T = TypeVar("T")


def field(*, static: bool = False, **kwargs: Any) -> Any:
    """A dataclass field; ``static=True`` keeps it out of the leaves (it becomes tree metadata).

    Example:
        >>> import fnloop as fl
        >>> f = fl.field(static=True, default=3)
    """
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata[_STATIC] = static
    return dataclasses.field(metadata=metadata, **kwargs)


def dataclass(cls: type[T] | None = None, /, **kwargs: Any) -> Any:
    """Frozen dataclass registered as a pytree with optree (namespace ``fnloop``) and torch.

    Non-static fields are children in declaration order; static fields are part of the tree
    structure. ``replace(**changes)`` returns a copy with fields changed.

    Example:
        >>> import torch, fnloop as fl
        >>> @fl.dataclass
        ... class Box:
        ...     x: torch.Tensor
        >>> Box(torch.zeros(1)).replace(x=torch.ones(1)).x
        tensor([1.])
    """
    if cls is None:
        return functools.partial(dataclass, **kwargs)
    kwargs.setdefault("frozen", True)
    cls = dataclasses.dataclass(cls, **kwargs)  # type: ignore[assignment]
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    data = tuple(f.name for f in fields if not f.metadata.get(_STATIC, False))
    meta = tuple(f.name for f in fields if f.metadata.get(_STATIC, False))

    def flatten(obj: Any) -> tuple[list[Any], tuple[Any, ...]]:
        return [getattr(obj, n) for n in data], tuple(getattr(obj, n) for n in meta)

    def unflatten(static: tuple[Any, ...], children: Iterable[Any]) -> Any:
        obj = object.__new__(cls)
        for n, v in zip(data, children):
            object.__setattr__(obj, n, v)
        for n, v in zip(meta, static):
            object.__setattr__(obj, n, v)
        return obj

    optree.register_pytree_node(
        cls,
        lambda obj: (*flatten(obj), data),
        unflatten,
        namespace=NAMESPACE,
        path_entry_type=optree.GetAttrEntry,
    )
    torch_pytree.register_pytree_node(
        cls,
        lambda obj: flatten(obj),
        lambda children, static: unflatten(static, children),
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=lambda obj: (
            [(torch_pytree.GetAttrKey(n), getattr(obj, n)) for n in data],
            tuple(getattr(obj, n) for n in meta),
        ),
    )
    names = frozenset(data + meta)

    def replace(self: Any, **changes: Any) -> Any:
        """Return a copy with the given fields changed."""
        unknown = changes.keys() - names
        if unknown:
            raise ConfigError(f"{cls.__name__}.replace: unknown field(s) {sorted(unknown)}; fields are {sorted(names)}")
        new = object.__new__(cls)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        new.__dict__.pop("_fnloop_donated", None)  # a marker of the old object, not of its copy
        return new

    cls.replace = replace  # type: ignore[attr-defined]
    return cls


def tree_map(fn: Callable[..., Any], tree: Any, /, *rest: Any, **kwargs: Any) -> Any:
    """``optree.tree_map`` in the fnloop namespace."""
    return optree.tree_map(fn, tree, *rest, namespace=NAMESPACE, **kwargs)


def tree_map_with_path(fn: Callable[..., Any], tree: Any, /, *rest: Any, **kwargs: Any) -> Any:
    """Like :func:`tree_map`, ``fn`` receives the key path string (``"params/0.weight"``) first."""
    paths = tree_paths(tree)
    leaves, spec = tree_flatten(tree)
    others = [spec.flatten_up_to(r) for r in rest]
    out = [fn(p, x, *(o[i] for o in others)) for i, (p, x) in enumerate(zip(paths, leaves))]
    return spec.unflatten(out)


def tree_leaves(tree: Any, /, **kwargs: Any) -> list[Any]:
    """``optree.tree_leaves`` in the fnloop namespace."""
    return optree.tree_leaves(tree, namespace=NAMESPACE, **kwargs)


def tree_flatten(tree: Any, /, **kwargs: Any) -> tuple[list[Any], optree.PyTreeSpec]:
    """``optree.tree_flatten`` in the fnloop namespace."""
    return optree.tree_flatten(tree, namespace=NAMESPACE, **kwargs)


def tree_flatten_with_path(tree: Any, /) -> tuple[list[str], list[Any], optree.PyTreeSpec]:
    """``(key path strings, leaves, treespec)``."""
    accessors, leaves, spec = optree.tree_flatten_with_accessor(tree, namespace=NAMESPACE)
    return [keystr(a) for a in accessors], leaves, spec


def tree_unflatten(spec: optree.PyTreeSpec, leaves: Iterable[Any], /) -> Any:
    """``optree.tree_unflatten``."""
    return optree.tree_unflatten(spec, leaves)


def tree_structure(tree: Any, /, **kwargs: Any) -> optree.PyTreeSpec:
    """``optree.tree_structure`` in the fnloop namespace."""
    return optree.tree_structure(tree, namespace=NAMESPACE, **kwargs)


def tree_paths(tree: Any, /) -> list[str]:
    """Key path strings of every leaf, in leaf order."""
    return tree_flatten_with_path(tree)[0]


def _entry_name(entry: Any) -> str:
    for attr in ("name", "field", "key", "index"):
        value = getattr(entry, attr, None)
        if value is not None:
            return str(value)
    return str(entry.entry)


def keystr(accessor: Iterable[Any], /) -> str:
    """A readable key path: ``opt_state/1/mu/0.weight``."""
    return "/".join(_entry_name(e) for e in accessor)


def check_same_structure(expected: Any, actual: Any, /, *, what: str = "tree") -> None:
    """Raise :class:`TreeMismatchError` listing every key path that differs between two trees.

    Example:
        >>> import torch, fnloop as fl
        >>> fl.check_same_structure({"a": torch.zeros(1)}, {"a": torch.ones(1)})
    """
    if tree_structure(expected) == tree_structure(actual):
        return
    want, got = set(tree_paths(expected)), set(tree_paths(actual))
    missing = sorted(want - got)
    extra = sorted(got - want)
    lines = [f"{what}: structures differ."]
    if missing:
        lines.append("  missing key paths: " + ", ".join(missing))
    if extra:
        lines.append("  unexpected key paths: " + ", ".join(extra))
    if not missing and not extra:
        lines.append(f"  expected {tree_structure(expected)}\n  got      {tree_structure(actual)}")
    raise TreeMismatchError("\n".join(lines))
