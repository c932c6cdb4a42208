"""Assertions for tests of training code: trees compared leaf by leaf, steps checked for purity.

Every failure is an ``AssertionError`` whose message names the key paths involved
(``params/0.weight``, ``opt_state/mu/0.weight``), so a failing property test says where a
tree differs, not only that it does.

Example:
    >>> import torch
    >>> from fnloop.testing import assert_trees_equal
    >>> assert_trees_equal({"w": torch.ones(2)}, {"w": torch.ones(2)})
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fnloop.errors import ConfigError, TreeMismatchError
from fnloop.tree import check_same_structure, tree_flatten_with_path, tree_map

__all__ = ["assert_trees_equal", "assert_trees_close", "assert_pure"]

_MAX_CLOSE_LISTED = 20


class _Diff(NamedTuple):
    path: str
    text: str
    score: float  # how badly the leaf differs (for ordering; inf for metadata differences)


def _label(path: str) -> str:
    return path or "<root>"


def _prefix(msg: str) -> str:
    return f"{msg}: " if msg else ""


def _same_python(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # values whose == is not a bool (arrays): fall back to identity
        return a is b


def _metadata_diff(a: Any, b: Any) -> str | None:
    """Why two leaves cannot be compared element-wise, or None when they can."""
    a_t, b_t = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
    if a_t != b_t:
        return f"actual is {type(a).__name__}, expected is {type(b).__name__}"
    if not a_t:
        return None if _same_python(a, b) else f"actual {a!r} != expected {b!r}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} != expected {b.dtype}"
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != expected {tuple(b.shape)}"
    if a.device != b.device:
        return f"device {a.device} != expected {b.device}"
    return None


def _wide(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def _index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    out = []
    for side in reversed(shape):
        out.append(flat % side)
        flat //= side
    return tuple(reversed(out))


def _value_diff(path: str, a: torch.Tensor, b: torch.Tensor, rtol: float | None, atol: float) -> _Diff | None:
    """Compare two tensors of equal dtype, shape and device (exactly when ``rtol`` is None)."""
    if a.device.type == "meta" or a.numel() == 0:
        return None
    with torch.no_grad():
        if rtol is None and a.layout == torch.strided and torch.equal(a, b):
            return None
        wa, wb = _wide(a), _wide(b)
        nan_a, nan_b = torch.isnan(wa), torch.isnan(wb)
        diff = (wa - wb).abs()
        ok = (wa == wb) | (nan_a & nan_b)
        if rtol is not None:
            ok |= (diff <= atol + rtol * wb.abs()) & torch.isfinite(wb)
        bad = ~ok
        n_bad = int(bad.sum())
        if n_bad == 0:
            return None
        bad_diff = torch.where(bad, diff, torch.zeros_like(diff)).nan_to_num(nan=math.inf).reshape(-1)
        worst = int(bad_diff.argmax())
        max_diff = float(bad_diff[worst])
        nan_involved = bool((nan_a | nan_b).reshape(-1)[worst])
        if rtol is None:
            score = max_diff
        else:
            tolerance = atol + rtol * float(wb.abs().reshape(-1)[worst])
            score = max_diff / tolerance if tolerance > 0 else math.inf
    at = _index(worst, a.shape)
    actual, expected = a.detach().reshape(-1)[worst].item(), b.detach().reshape(-1)[worst].item()
    shown = "nan (a NaN against a number)" if nan_involved else f"{max_diff:.6g}"
    text = (
        f"{n_bad} of {a.numel()} elements differ, max abs diff {shown} "
        f"at index {at} (actual {actual!r}, expected {expected!r})"
    )
    return _Diff(path, text, score)


def _diffs(actual: Any, expected: Any, rtol: float | None, atol: float) -> list[_Diff]:
    paths, got, _ = tree_flatten_with_path(actual)
    want = tree_flatten_with_path(expected)[1]
    out = []
    for path, a, b in zip(paths, got, want):
        meta = _metadata_diff(a, b)
        if meta is not None:
            out.append(_Diff(path, meta, math.inf))
        elif isinstance(a, torch.Tensor):
            diff = _value_diff(path, a, b, rtol, atol)
            if diff is not None:
                out.append(diff)
    return out


def _check_structure(actual: Any, expected: Any, msg: str) -> None:
    try:
        check_same_structure(expected, actual, what="tree")
    except TreeMismatchError as e:
        raise AssertionError(f"{_prefix(msg)}{e}") from None


def assert_trees_equal(actual: Any, expected: Any, *, msg: str = "") -> None:
    """Assert two pytrees have the same structure and bitwise equal leaves.

    Tensor leaves must have the same dtype, shape and device and equal values (as
    ``torch.equal``; NaNs in the same places count as equal); other leaves must be ``==``.

    Args:
        actual: the tree under test.
        expected: the reference tree.
        msg: a prefix for the failure message.

    Raises:
        AssertionError: listing every differing key path with its largest absolute difference.

    Example:
        >>> import torch
        >>> from fnloop.testing import assert_trees_equal
        >>> assert_trees_equal({"w": torch.tensor([1.0, float("nan")])}, {"w": torch.tensor([1.0, float("nan")])})
    """
    _check_structure(actual, expected, msg)
    diffs = _diffs(actual, expected, None, 0.0)
    if diffs:
        lines = [f"{_prefix(msg)}trees are not equal at {len(diffs)} key path(s):"]
        lines += [f"  {_label(d.path)}: {d.text}" for d in diffs]
        raise AssertionError("\n".join(lines))


def assert_trees_close(actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-6, msg: str = "") -> None:
    """Assert two pytrees have the same structure and leaves equal within tolerance.

    An element passes when ``|actual - expected| <= atol + rtol * |expected|`` (as
    ``torch.allclose``), when both are equal (infinities) or both are NaN. Dtypes, shapes and
    devices must match; non-tensor leaves must be ``==``.

    Args:
        actual: the tree under test.
        expected: the reference tree.
        rtol: relative tolerance.
        atol: absolute tolerance.
        msg: a prefix for the failure message.

    Raises:
        AssertionError: listing the differing key paths, worst first.

    Example:
        >>> import torch
        >>> from fnloop.testing import assert_trees_close
        >>> assert_trees_close({"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0 + 1e-7])})
    """
    _check_structure(actual, expected, msg)
    diffs = sorted(_diffs(actual, expected, rtol, atol), key=lambda d: -d.score)
    if diffs:
        head = f"trees are not close (rtol={rtol:g}, atol={atol:g}) at {len(diffs)} key path(s), worst first:"
        lines = [_prefix(msg) + head]
        lines += [f"  {_label(d.path)}: {d.text}" for d in diffs[:_MAX_CLOSE_LISTED]]
        if len(diffs) > _MAX_CLOSE_LISTED:
            lines.append(f"  ... and {len(diffs) - _MAX_CLOSE_LISTED} more")
        raise AssertionError("\n".join(lines))


# --- purity ----------------------------------------------------------------------------------


def _copy_leaf(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    duplicate = copy.deepcopy(x)
    return duplicate if _same_python(duplicate, x) else x  # no value equality: only identity is checked


def _snapshot(tree: Any) -> Any:
    return tree_map(_copy_leaf, tree)


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter
        return None


def _tensor_leaves(tree: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    paths, leaves, _ = tree_flatten_with_path(tree)
    return [(f"{prefix}/{p}" if p else prefix, x) for p, x in zip(paths, leaves) if isinstance(x, torch.Tensor)]


def _rng_states() -> list[tuple[str, torch.Tensor]]:
    states = [("cpu", torch.get_rng_state())]
    if torch.cuda.is_available():
        states += [(f"cuda:{i}", s) for i, s in enumerate(torch.cuda.get_rng_state_all())]
    return states


def _storage(t: torch.Tensor) -> int | None:
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return storage.data_ptr() if storage.nbytes() else None


def _owned_inputs(state: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors an output must not alias: ``state.params`` and ``state.opt_state`` when the
    state has them, else every tensor leaf of the state."""
    if hasattr(state, "params") and hasattr(state, "opt_state"):
        return _tensor_leaves(state.params, "state/params") + _tensor_leaves(state.opt_state, "state/opt_state")
    return _tensor_leaves(state, "state")


Versions = list[tuple[str, torch.Tensor, int | None]]


def _check_inputs(name: str, run: int, inputs: dict[str, Any], before: dict[str, Any], versions: Versions) -> None:
    changed = []
    for label, tree in inputs.items():
        try:
            check_same_structure(before[label], tree, what=label)
        except TreeMismatchError as e:
            changed.append(f"the structure of the {label} changed ({e})")
            continue
        for d in _diffs(tree, before[label], None, 0.0):
            changed.append(f"{label}/{d.path}: {d.text}" if d.path else f"{label}: {d.text}")
    bumped = [f"{p} (_version {v} -> {_version(t)})" for p, t, v in versions if v is not None and _version(t) != v]
    if changed or bumped:
        lines = [f"{name}: run {run} modified its inputs in place; a step must return new tensors instead."]
        if changed:
            lines.append("  values changed at: " + "; ".join(changed))
        if bumped:
            lines.append("  in-place writes (version counter bumped) at: " + ", ".join(bumped))
        raise AssertionError("\n".join(lines))


def _check_aliasing(name: str, run: int, out: Any, owned: list[tuple[str, torch.Tensor]]) -> None:
    by_storage: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for path, t in owned:
        ptr = _storage(t)
        if ptr is not None:
            by_storage.setdefault(ptr, []).append((path, t))
    aliases = []
    for path, t in _tensor_leaves(out, "output"):
        ptr = _storage(t)
        for in_path, inp in by_storage.get(ptr, []) if ptr is not None else []:
            if t is not inp:
                aliases.append(f"{path} shares storage with {in_path}")
    if aliases:
        raise AssertionError(
            f"{name}: run {run} returned tensors that share memory with the input state without being the same "
            "object (views or detached aliases of the input); return new tensors, or the input tensor itself "
            "when it is unchanged:\n  " + "\n  ".join(aliases)
        )


def assert_pure(step: Callable[[Any, Any], Any], state: Any, batch: Any, *, runs: int = 2) -> Any:
    """Call ``step(state, batch)`` ``runs`` times and assert it behaves as a pure function.

    Works for train steps (``-> (state, metrics)``), eval steps (``-> metrics``) and predict
    steps (``-> outputs``). Checks, after every run:

    * the inputs (state and batch) hold the same values as a deep copy taken before, and no
      tensor leaf's ``_version`` counter moved (no in-place write, even one that writes the
      same values);
    * the global torch RNG state (CPU, and every CUDA device when available) is as before;
    * no output tensor shares storage with a tensor of ``state.params`` or ``state.opt_state``
      unless it is that very tensor object (an unchanged leaf passed through);

    and that the outputs of all runs are bitwise equal.

    Args:
        step: the step under test.
        state: its first argument (a ``TrainState`` or any pytree).
        batch: its second argument (any pytree).
        runs: how many times to call the step, >= 1.

    Returns:
        The result of the first run.

    Raises:
        AssertionError: naming the run, the check that failed and the key paths involved.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> from fnloop.testing import assert_pure
        >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
        >>> step = fl.train_step(lambda model, batch: model(batch).square().mean())
        >>> new_state, metrics = assert_pure(step, state, torch.ones(3, 2))
        >>> int(new_state.step)
        1
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ConfigError(f"assert_pure: runs={runs!r} is not accepted; pass an int >= 1")
    name = getattr(step, "__qualname__", None) or repr(step)
    inputs = {"state": state, "batch": batch}
    before = {label: _snapshot(tree) for label, tree in inputs.items()}
    versions = [(p, t, _version(t)) for p, t in _tensor_leaves(state, "state") + _tensor_leaves(batch, "batch")]
    owned = _owned_inputs(state)
    results = []
    for run in range(1, runs + 1):
        rng_before = _rng_states()
        out = step(state, batch)
        moved = [dev for (dev, a), (_, b) in zip(rng_before, _rng_states()) if not torch.equal(a, b)]
        if moved:
            raise AssertionError(
                f"{name}: run {run} changed the global torch RNG state of {', '.join(moved)}; "
                "draw randomness from the state (state.rng) inside a seeded block instead."
            )
        _check_inputs(name, run, inputs, before, versions)
        _check_aliasing(name, run, out, owned)
        results.append(out)
    for run, out in enumerate(results[1:], start=2):
        assert_trees_equal(out, results[0], msg=f"{name}: run {run} differs from run 1 on the same inputs")
    return results[0]
