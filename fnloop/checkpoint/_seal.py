"""The checksum of ``meta.json`` itself, and the description of a state's optimizer.

``meta.json`` of format 3 records ``"meta_checksum": "xxh3_128:<hex>"``, the checksum of its
own content in a canonical form (keys sorted, no spaces, without ``meta_checksum``), so a flipped
bit in a non-tensor leaf (``global_step``, an epoch, callback states) is caught like one in the
tensor file. ``"optimizer"`` records what built the state's optimizer state: the name of each
transform and its numeric hyperparameters, read from the closures of ``tx.init``/``tx.update``;
a restore compares it with the optimizer of ``like``, so an Adam checkpoint does not restore
silently into an AdamW state.

Example:
    >>> meta = {"format": "x", "step": 3}
    >>> seal(meta); check_seal(meta, "meta.json")
    >>> meta["step"] = 2; check_seal(meta, "meta.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fnloop.errors.CheckpointError: meta.json: checksum mismatch of meta.json ...
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import types
from typing import Any

from fnloop.checkpoint._checksum import ALGORITHM, Checksum, split_digest
from fnloop.errors import CheckpointError

__all__ = ["SEAL_KEY", "seal", "check_seal", "describe_optimizer", "compare_optimizer"]

SEAL_KEY = "meta_checksum"
_DEPTH = 12


def _digest(meta: dict[str, Any], algorithm: str = ALGORITHM) -> str:
    body = {k: v for k, v in meta.items() if k != SEAL_KEY}
    checksum = Checksum(algorithm)
    checksum.update(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return checksum.digest()


def seal(meta: dict[str, Any]) -> None:
    """Record the checksum of ``meta`` in ``meta[SEAL_KEY]`` (in place)."""
    meta[SEAL_KEY] = _digest(meta)


def check_seal(meta: dict[str, Any], where: str) -> None:
    """Raise :class:`CheckpointError` unless ``meta[SEAL_KEY]`` is the checksum of ``meta``."""
    recorded = meta.get(SEAL_KEY)
    parsed = split_digest(recorded)
    if parsed is None:
        raise CheckpointError(f"{where}: malformed, {SEAL_KEY!r} must be '<algorithm>:<hex digest>'; the checkpoint is damaged")
    found = _digest(meta, parsed[0])
    if found != recorded:
        raise CheckpointError(
            f"{where}: checksum mismatch of meta.json ({found[:24]}..., it records {str(recorded)[:24]}...); "
            "the file is corrupt or was edited, restore another checkpoint"
        )


def _name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", type(fn).__name__)
    return name.split(".<locals>")[0]


def _value(x: Any, depth: int, seen: set[int]) -> Any:
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return repr(float(x))
    if isinstance(x, (types.FunctionType, types.MethodType)) or (
        isinstance(x, tuple) and hasattr(x, "_fields") and hasattr(x, "update") and hasattr(x, "init")
    ):
        return _transform(x, depth, seen)
    if dataclasses.is_dataclass(x) and not isinstance(x, type) and depth < _DEPTH:
        fields = {f.name: _value(getattr(x, f.name), depth + 1, seen) for f in dataclasses.fields(x)}
        return {type(x).__name__: fields}
    if isinstance(x, (tuple, list)) and depth < _DEPTH:
        return [_value(v, depth + 1, seen) for v in x]
    if isinstance(x, dict) and depth < _DEPTH and all(isinstance(k, str) for k in x):
        return {k: _value(x[k], depth + 1, seen) for k in sorted(x)}
    return type(x).__name__


def _transform(x: Any, depth: int, seen: set[int]) -> Any:
    """``{name: {captured variable: value}}`` of a function (or of a transform's init and update)."""
    if depth >= _DEPTH or id(x) in seen:
        return _name(x)
    seen = seen | {id(x)}
    fns = [x.init, x.update] if isinstance(x, tuple) else [x]
    out: dict[str, Any] = {}
    for fn in fns:
        fn = getattr(fn, "__func__", fn)
        names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
        cells = getattr(fn, "__closure__", None) or ()
        captured = {}
        for var, cell in zip(names, cells):
            try:
                captured[var] = _value(cell.cell_contents, depth + 1, seen)
            except ValueError:  # an empty cell
                continue
        out.setdefault(_name(fn), {}).update(captured)
    return out


def describe_optimizer(tx: Any) -> Any:
    """A JSON description of the transform ``tx``: the functions it is made of and the numbers they hold.

    Example:
        >>> import fnloop.optim as flo
        >>> describe_optimizer(flo.adam(lr=0.1)) == describe_optimizer(flo.adamw(lr=0.1))
        False
    """
    return _value(tx, 0, set())


def compare_optimizer(recorded: Any, tx: Any, where: str) -> None:
    """Raise :class:`CheckpointError` when the optimizer recorded in a checkpoint is not ``tx``'s."""
    if recorded is None or tx is None:
        return
    found = describe_optimizer(tx)
    if found != recorded:
        raise CheckpointError(
            f"{where}: the checkpoint was saved with another optimizer (kind or hyperparameters differ):\n"
            f"  checkpoint: {json.dumps(recorded, sort_keys=True)[:600]}\n"
            f"  `like`:     {json.dumps(found, sort_keys=True)[:600]}\n"
            "Build the optimizer of `like` as the saved state's was built, or load the weights alone with "
            "restore_weights()."
        )
