"""Leaves of a checkpointed pytree: split into tensors and JSON values, described, matched back.

Tensor leaves go to ``state.safetensors`` under their key path; every other leaf (ints,
floats, bools, strings of ``state.loop``) is stored in ``meta.json`` with its type. Floats
keep nan and infinities as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` so the JSON stays
standard. Restoring matches the stored leaves to the leaves of ``like`` by key path and
reports every difference at once.

Example:
    >>> import torch

    >>> from fnloop.checkpoint import _leaves
    >>> tensors, entries, _ = _leaves.split({"w": torch.zeros(2), "epoch": 3}, "x")
    >>> list(tensors), entries[0]
    (['w'], {'path': 'epoch', 'kind': 'value', 'value': 3, 'type': 'int'})
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

import optree
import torch

from fnloop.checkpoint._safetensors import DTYPE_CODES
from fnloop.errors import CheckpointError, ConfigError
from fnloop.state import CallbackStates, OptionsState
from fnloop.tree import tree_flatten_with_path

__all__ = [
    "DTYPES_BY_NAME",
    "encode_value",
    "decode_value",
    "encode_metrics",
    "decode_metrics",
    "split",
    "stored_tensors",
    "describe",
    "rebuild",
]

DTYPES_BY_NAME: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in DTYPE_CODES}
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_value(x: Any) -> tuple[Any, str]:
    """``(json value, type name)`` of a non-tensor leaf; raises ``TypeError`` for other types.

    Example:
        >>> encode_value(float("nan")), encode_value(True)
        (('nan', 'float'), (True, 'bool'))
    """
    if x is None:
        return None, "none"
    if isinstance(x, bool):
        return x, "bool"
    if isinstance(x, numbers.Integral):
        return int(x), "int"
    if isinstance(x, numbers.Real):
        f = float(x)
        if math.isnan(f):
            return "nan", "float"
        if math.isinf(f):
            return ("inf" if f > 0 else "-inf"), "float"
        return f, "float"
    if isinstance(x, str):
        return str(x), "str"
    if isinstance(x, CallbackStates):
        return json.dumps(x, allow_nan=True, sort_keys=True), "callbacks"
    raise TypeError(type(x).__name__)


def decode_value(value: Any, type_name: str) -> Any:
    """Inverse of :func:`encode_value`; raises ``ValueError`` on a value that does not fit its type.

    Example:
        >>> decode_value("-inf", "float")
        -inf
    """
    if type_name == "none" and value is None:
        return None
    if type_name == "bool" and isinstance(value, bool):
        return value
    if type_name == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if type_name == "float":
        if isinstance(value, str) and value in _NON_FINITE:
            return _NON_FINITE[value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    if type_name == "str" and isinstance(value, str):
        return value
    if type_name == "callbacks" and isinstance(value, str):
        try:
            decoded = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"callback states are not valid JSON: {e}") from None
        if isinstance(decoded, dict):
            return CallbackStates(decoded)
    raise ValueError(f"value {value!r} is not a valid {type_name}")


def encode_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """JSON form of a metrics dict (numbers, 0-d tensors, bools, strings).

    Example:
        >>> import torch
        >>> encode_metrics({"loss": torch.tensor(0.5), "acc": float("inf")})
        {'loss': 0.5, 'acc': 'inf'}
    """
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ConfigError(
                    f"metrics[{key!r}]: a tensor of shape {list(value.shape)}; pass one number per metric"
                )
            value = value.item()
        try:
            out[str(key)] = encode_value(value)[0]
        except TypeError:
            raise ConfigError(
                f"metrics[{key!r}]: a {type(value).__name__} cannot be stored; "
                "pass numbers, strings or 1-element tensors"
            ) from None
    return out


def decode_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`encode_metrics` (``"nan"``/``"inf"``/``"-inf"`` become floats again).

    Example:
        >>> decode_metrics({"loss": "nan"})["loss"]
        nan
    """
    return {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in metrics.items()}


def split(tree: Any, where: str) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], optree.PyTreeSpec]:
    """``(tensors by key path, meta.json leaf entries, treespec)`` of ``tree``; ``where`` names the target.

    Raises :class:`CheckpointError` listing every leaf that cannot be stored.

    Example:
        >>> import torch
        >>> split({"a": torch.ones(1)}, "x")[1]
        [{'path': 'a', 'kind': 'tensor', 'dtype': 'float32', 'shape': [1]}]
    """
    paths, leaves, spec = tree_flatten_with_path(tree)
    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for path, leaf in zip(paths, leaves):
        if path in seen or path == "__metadata__":
            problems.append(f"  {path!r}: two leaves share this key path (or it is reserved); rename a key")
            continue
        seen.add(path)
        if isinstance(leaf, OptionsState):  # its tensors sit beside the others, named <path>/<i>
            described = []
            for i, t in enumerate(leaf.tensors):
                if t.dtype not in DTYPE_CODES or t.layout != torch.strided or t.device.type == "meta":
                    problems.append(f"  {path}/{i}: a {t.layout} {_dtype_name(t.dtype)} tensor on {t.device} cannot be stored")
                    continue
                tensors[f"{path}/{i}"] = t
                described.append({"dtype": _dtype_name(t.dtype), "shape": list(t.shape)})
            key = list(leaf.key) if leaf.key is not None else None
            entries.append({"path": path, "kind": "options", "key": key, "tensors": described})
            continue
        if isinstance(leaf, torch.Tensor):
            if leaf.dtype not in DTYPE_CODES:
                problems.append(f"  {path}: dtype {_dtype_name(leaf.dtype)} cannot be stored; convert it")
            elif leaf.layout != torch.strided or leaf.device.type == "meta":
                problems.append(f"  {path}: a {leaf.layout} tensor on {leaf.device} cannot be stored; make it dense")
            else:
                tensors[path] = leaf
                dtype, shape = _dtype_name(leaf.dtype), list(leaf.shape)
                entries.append({"path": path, "kind": "tensor", "dtype": dtype, "shape": shape})
            continue
        try:
            value, type_name = encode_value(leaf)
        except TypeError:
            kind = type(leaf).__name__
            problems.append(f"  {path}: a {kind} leaf; only tensors and int/float/bool/str/None are stored")
            continue
        entries.append({"path": path, "kind": "value", "value": value, "type": type_name})
    if problems:
        raise CheckpointError(f"{where}: cannot save this tree:\n" + "\n".join(problems))
    return tensors, entries, spec


def stored_tensors(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{name in state.safetensors: {"dtype", "shape"}}`` for every tensor ``entries`` describe."""
    out = {e["path"]: e for e in entries if e["kind"] == "tensor"}
    for e in entries:
        if e["kind"] == "options":
            out.update({f"{e['path']}/{i}": d for i, d in enumerate(e["tensors"]) if isinstance(d, dict)})
    return out


def describe(spec: optree.PyTreeSpec) -> str:
    """A readable one-line structure: ``TrainState(step=*, params={'w': *}, ...)``.

    Example:
        >>> import torch
        >>> from fnloop.tree import tree_structure
        >>> describe(tree_structure({"a": [torch.ones(1), 2], "b": None}))
        "{'a': [*, *], 'b': None}"
    """
    kind = spec.kind
    if kind == optree.PyTreeKind.LEAF:
        return "*"
    if kind == optree.PyTreeKind.NONE:
        return "None"
    children = [describe(c) for c in spec.children()]
    entries = spec.entries()
    if kind in (optree.PyTreeKind.DICT, optree.PyTreeKind.ORDEREDDICT, optree.PyTreeKind.DEFAULTDICT):
        return "{" + ", ".join(f"{k!r}: {c}" for k, c in zip(entries, children)) + "}"
    if kind == optree.PyTreeKind.LIST:
        return "[" + ", ".join(children) + "]"
    if kind == optree.PyTreeKind.TUPLE:
        return "(" + ", ".join(children) + ("," if len(children) == 1 else "") + ")"
    name = getattr(spec.type, "__name__", str(spec.type))
    if kind == optree.PyTreeKind.NAMEDTUPLE:
        entries = list(spec.type._fields)
    if kind == optree.PyTreeKind.DEQUE:
        return f"{name}([" + ", ".join(children) + "])"
    return f"{name}(" + ", ".join(f"{k}={c}" for k, c in zip(entries, children)) + ")"


def _show(entry: dict[str, Any]) -> str:
    if entry["kind"] == "tensor":
        return f"tensor {entry['dtype']}{entry['shape']}"
    return f"{entry['type']} {entry['value']!r}"


def _show_leaf(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        return f"tensor {_dtype_name(leaf.dtype)}{list(leaf.shape)}"
    try:
        return f"{encode_value(leaf)[1]} {leaf!r}"
    except TypeError:
        return type(leaf).__name__


def _place(t: torch.Tensor, ref: torch.Tensor | None, map_location: Any) -> torch.Tensor:
    device = map_location if map_location is not None else (ref.device if ref is not None else None)
    if device is not None and torch.device(device).type != "meta":
        t = t.to(device)
    if ref is not None and ref.requires_grad and t.is_floating_point():
        t.requires_grad_(True)
    return t


def _options(
    path: str, entry: dict[str, Any] | None, tensors: dict[str, torch.Tensor], ref: OptionsState, map_location: Any, problems: list[str]
) -> OptionsState:
    """The stored :class:`OptionsState` at ``path`` (empty when the checkpoint has none: written
    before step options were state, or without options)."""
    if entry is None:
        return OptionsState()
    described = entry.get("tensors")
    if entry.get("kind") != "options" or not isinstance(described, list) or not isinstance(entry.get("key"), (list, type(None))):
        problems.append(f"  {path}: expected step options, found {entry.get('kind')!r}")
        return ref
    out = []
    for i, d in enumerate(described):
        t = tensors.get(f"{path}/{i}")
        if t is None or not isinstance(d, dict) or _dtype_name(t.dtype) != d.get("dtype") or list(t.shape) != d.get("shape"):
            problems.append(f"  {path}/{i}: missing from the checkpoint or not the tensor meta.json describes")
            return ref
        out.append(_place(t, None, map_location))
    key = entry["key"]
    return OptionsState(tuple(key) if key is not None else None, tuple(out))


def rebuild(
    like: Any,
    entries: list[dict[str, Any]],
    tensors: dict[str, torch.Tensor],
    where: str,
    *,
    map_location: Any = None,
    stored_tree: str = "",
) -> Any:
    """A tree shaped like ``like`` with the stored leaves; raises listing every mismatch.

    Tensors go to ``map_location`` if given, else to the device of the matching leaf of
    ``like`` (CPU for a leaf on the meta device).

    Example:
        >>> import torch
        >>> t, e, _ = split({"w": torch.ones(2)}, "x")
        >>> rebuild({"w": torch.zeros(2)}, e, t, "x")["w"]
        tensor([1., 1.])
    """
    paths, leaves, spec = tree_flatten_with_path(like)
    stored = {e["path"]: e for e in entries}
    problems: list[str] = []
    out: list[Any] = []
    for path, ref in zip(paths, leaves):
        entry = stored.get(path)
        if isinstance(ref, OptionsState):
            out.append(_options(path, entry, tensors, ref, map_location, problems))
            continue
        if entry is None:
            problems.append(f"  {path}: missing from the checkpoint (expected {_show_leaf(ref)})")
            continue
        if isinstance(ref, torch.Tensor):
            want = f"tensor {_dtype_name(ref.dtype)}{list(ref.shape)}"
            if entry["kind"] != "tensor" or _show(entry) != want:
                problems.append(f"  {path}: expected {want}, found {_show(entry)}")
                continue
            out.append(_place(tensors[path], ref, map_location))
            continue
        value = decode_value(entry["value"], entry["type"]) if entry["kind"] == "value" else None
        try:
            want_type = encode_value(ref)[1]
        except TypeError:
            want_type = type(ref).__name__
        numeric = want_type == "float" and entry.get("type") == "int"  # never a float into an int leaf
        if entry["kind"] != "value" or not (entry["type"] == want_type or numeric):
            problems.append(f"  {path}: expected {_show_leaf(ref)}, found {_show(entry)}")
            continue
        out.append(value)
    known = set(paths)
    extra = [p for p in stored if p not in known]
    problems += [f"  {p}: in the checkpoint but not in `like` ({_show(stored[p])})" for p in extra]
    if problems:
        lines = [f"{where}: the checkpoint does not match `like` ({len(problems)} problem(s)):", *problems]
        if stored_tree:
            lines += [f"  checkpoint tree: {stored_tree}", f"  `like` tree:     {describe(spec)}"]
        lines.append(
            "Build `like` the way the saved state was built (same model, optimizer, callbacks), "
            "or load the weights alone with restore_weights()."
        )
        raise CheckpointError("\n".join(lines))
    return spec.unflatten(out)
