"""Hypothesis strategies for property tests of training code.

Sizes are small by default (a tensor has at most a few hundred elements) so that a property
test can draw a hundred examples in well under a second.

Example:
    >>> from hypothesis import given
    >>> from fnloop.testing import strategies as fst
    >>> @given(fst.tensors(shape=(2, 3)))
    ... def test_shape(t):
    ...     assert t.shape == (2, 3)
    >>> test_shape()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import strategies as st

from fnloop.errors import ConfigError
from fnloop.state import TrainState
from fnloop.types import GradientTransformationLike

__all__ = ["DTYPES", "dtypes", "shapes", "default_elements", "tensors", "pytrees", "batches", "train_states"]

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool)
"""The dtypes :func:`dtypes` draws from."""

_KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyz_"
_INT_BOUND = 2**31  # default int64 elements lie in [-2**31, 2**31)


def _as_strategy(value: Any, kind: type | tuple[type, ...]) -> st.SearchStrategy[Any]:
    if isinstance(value, st.SearchStrategy):
        return value
    if not isinstance(value, kind):
        raise ConfigError(f"expected a {kind} or a hypothesis strategy, got {value!r}")
    return st.just(tuple(value) if isinstance(value, list) else value)


def dtypes() -> st.SearchStrategy[torch.dtype]:
    """Draw a dtype among float32, float16, bfloat16, float64, int64 and bool.

    Example:
        >>> import torch
        >>> from hypothesis import given
        >>> from fnloop.testing import strategies as fst
        >>> @given(fst.dtypes())
        ... def test_dtype(dtype):
        ...     assert isinstance(dtype, torch.dtype)
        >>> test_dtype()
    """
    return st.sampled_from(DTYPES)


def shapes(
    min_dims: int = 0, max_dims: int = 3, max_side: int = 5, *, min_side: int = 0
) -> st.SearchStrategy[tuple[int, ...]]:
    """Draw a shape: ``min_dims`` to ``max_dims`` sides in ``[min_side, max_side]``.

    With the defaults this includes 0-d shapes ``()`` and empty shapes (a side of 0).

    Example:
        >>> from hypothesis import given
        >>> from fnloop.testing import strategies as fst
        >>> @given(fst.shapes(min_dims=1, max_dims=2))
        ... def test_rank(shape):
        ...     assert 1 <= len(shape) <= 2
        >>> test_rank()
    """
    if not 0 <= min_dims <= max_dims or not 0 <= min_side <= max_side:
        raise ConfigError(
            f"shapes: min_dims={min_dims}, max_dims={max_dims}, min_side={min_side}, max_side={max_side} "
            "are not accepted; pass 0 <= min_dims <= max_dims and 0 <= min_side <= max_side"
        )
    return st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


def _finite_floats(dtype: torch.dtype) -> st.SearchStrategy[float]:
    # explicit bounds (the dtype's largest finite value, exact in the drawn width) draw much
    # faster than allow_infinity=False, which filters
    width = {torch.float16: 16, torch.bfloat16: 32, torch.float32: 32}.get(dtype, 64)
    bound = float(torch.finfo(dtype).max)
    return st.floats(min_value=-bound, max_value=bound, width=width)


def default_elements(dtype: torch.dtype) -> st.SearchStrategy[Any]:
    """The Python values :func:`tensors` fills a ``dtype`` tensor with by default: any finite
    value of a floating dtype, ints in ``[-2**31, 2**31)`` for integer dtypes, bools for bool.

    Example:
        >>> import torch
        >>> from fnloop.testing import strategies as fst
        >>> s = fst.default_elements(torch.int64)
    """
    if dtype == torch.bool:
        return st.booleans()
    if dtype.is_floating_point:
        return _finite_floats(dtype)
    info = torch.iinfo(dtype)
    return st.integers(max(info.min, -_INT_BOUND), min(info.max, _INT_BOUND - 1))


@st.composite
def _tensors(
    draw: Any, dtype: st.SearchStrategy[torch.dtype], shape: st.SearchStrategy[tuple[int, ...]], elements: Any
) -> torch.Tensor:
    dt = draw(dtype)
    sh = tuple(draw(shape))
    n = math.prod(sh)
    values = draw(st.lists(elements if elements is not None else default_elements(dt), min_size=n, max_size=n))
    return torch.tensor(values, dtype=dt).reshape(sh)


def tensors(
    dtype: torch.dtype | st.SearchStrategy[torch.dtype] | None = None,
    shape: tuple[int, ...] | st.SearchStrategy[tuple[int, ...]] | None = None,
    elements: st.SearchStrategy[Any] | None = None,
) -> st.SearchStrategy[torch.Tensor]:
    """Draw a CPU tensor.

    Args:
        dtype: a dtype or a strategy of dtypes; default :func:`dtypes`.
        shape: a shape or a strategy of shapes; default :func:`shapes` (0-d and empty included).
        elements: a strategy of Python values to fill it with; default :func:`default_elements`
            of the drawn dtype (finite values).

    Example:
        >>> import torch
        >>> from hypothesis import given, strategies as st
        >>> from fnloop.testing import strategies as fst
        >>> @given(fst.tensors(torch.float32, (3,), elements=st.floats(-1, 1, width=32)))
        ... def test_bounded(t):
        ...     assert t.abs().max() <= 1
        >>> test_bounded()
    """
    dtype_s = dtypes() if dtype is None else _as_strategy(dtype, torch.dtype)
    shape_s = shapes() if shape is None else _as_strategy(shape, (tuple, list, torch.Size))
    return _tensors(dtype_s, shape_s, elements)


def pytrees(
    leaves: st.SearchStrategy[Any] | None = None, max_depth: int = 3, *, max_children: int = 3
) -> st.SearchStrategy[Any]:
    """Draw a pytree of nested dicts (str keys of letters and ``_``), lists and tuples.

    Args:
        leaves: a strategy of leaves; default small tensors (up to 2 dims of up to 3 sides).
        max_depth: the most containers nested on any path from the root to a leaf (0: a leaf).
        max_children: the most children of one container.

    Example:
        >>> from hypothesis import given
        >>> import fnloop as fl
        >>> from fnloop.testing import strategies as fst
        >>> @given(fst.pytrees(max_depth=2))
        ... def test_roundtrip(tree):
        ...     leaves, spec = fl.tree_flatten(tree)
        ...     assert fl.tree_structure(fl.tree_unflatten(spec, leaves)) == spec
        >>> test_roundtrip()
    """
    if max_depth < 0:
        raise ConfigError(f"pytrees: max_depth={max_depth} is not accepted; pass an int >= 0")
    leaf = leaves if leaves is not None else tensors(shape=shapes(max_dims=2, max_side=3))
    keys = st.text(_KEY_ALPHABET, min_size=1, max_size=6)
    tree = leaf
    for _ in range(max_depth):
        child = tree
        tree = st.one_of(
            leaf,
            st.dictionaries(keys, child, max_size=max_children),
            st.lists(child, max_size=max_children),
            st.lists(child, max_size=max_children).map(tuple),
        )
    return tree


@st.composite
def _batches(
    draw: Any, n_features: int, n_classes: int, min_size: int, max_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    b = draw(st.integers(min_size, max_size))
    x = draw(st.lists(st.floats(-4.0, 4.0, width=32), min_size=b * n_features, max_size=b * n_features))
    y = draw(st.lists(st.integers(0, n_classes - 1), min_size=b, max_size=b))
    return torch.tensor(x, dtype=torch.float32).reshape(b, n_features), torch.tensor(y, dtype=torch.int64)


def batches(
    n_features: int, n_classes: int, min_size: int = 1, max_size: int = 16
) -> st.SearchStrategy[tuple[torch.Tensor, torch.Tensor]]:
    """Draw a classification batch ``(x, y)``: ``x`` float32 ``[b, n_features]`` with values in
    ``[-4, 4]``, ``y`` int64 ``[b]`` in ``[0, n_classes)``, ``b`` in ``[min_size, max_size]``.

    Example:
        >>> from hypothesis import given
        >>> from fnloop.testing import strategies as fst
        >>> @given(fst.batches(4, 3, max_size=8))
        ... def test_batch(batch):
        ...     x, y = batch
        ...     assert x.shape[1] == 4 and y.shape == x.shape[:1] and int(y.max()) < 3
        >>> test_batch()
    """
    if n_features < 1 or n_classes < 1 or not 0 <= min_size <= max_size:
        raise ConfigError(
            f"batches: n_features={n_features}, n_classes={n_classes}, min_size={min_size}, "
            f"max_size={max_size} are not accepted; pass n_features >= 1, n_classes >= 1 and "
            "0 <= min_size <= max_size"
        )
    return _batches(n_features, n_classes, min_size, max_size)


@st.composite
def _train_states(
    draw: Any,
    module_factory: Callable[[], torch.nn.Module],
    tx: st.SearchStrategy[GradientTransformationLike],
    seeds: st.SearchStrategy[int],
    steps: st.SearchStrategy[int],
) -> TrainState:
    seed = draw(seeds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = module_factory()
    state = TrainState.create(module, draw(tx), seed=seed)
    step = draw(steps)
    return state if step == 0 else state.replace(step=torch.tensor(step, dtype=torch.int64))


def train_states(
    module_factory: Callable[[], torch.nn.Module],
    tx: GradientTransformationLike | st.SearchStrategy[GradientTransformationLike],
    seeds: st.SearchStrategy[int] | None = None,
    *,
    steps: st.SearchStrategy[int] | None = None,
) -> st.SearchStrategy[TrainState]:
    """Draw a fresh ``TrainState`` of ``module_factory()`` and ``tx``.

    A seed is drawn from ``seeds`` (default ``0 <= seed < 2**31``); the module is built with the
    global generator seeded with it (inside ``torch.random.fork_rng``, so the caller's RNG is
    left as it was) and the state's ``rng`` is that seed. ``steps`` (default: always 0) sets
    ``state.step``.

    Args:
        module_factory: builds the model (called once per example; keep it small).
        tx: a ``GradientTransformation`` or a strategy of them.
        seeds: a strategy of int seeds.
        steps: a strategy of step counts.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> from hypothesis import given
        >>> from fnloop.testing import strategies as fst
        >>> @given(fst.train_states(lambda: torch.nn.Linear(2, 1), flo.sgd(lr=0.1)))
        ... def test_state(state):
        ...     assert int(state.step) == 0
        >>> test_state()
    """
    tx_s = tx if isinstance(tx, st.SearchStrategy) else st.just(tx)
    seeds_s = seeds if seeds is not None else st.integers(0, 2**31 - 1)
    steps_s = steps if steps is not None else st.just(0)
    return _train_states(module_factory, tx_s, seeds_s, steps_s)
