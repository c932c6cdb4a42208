"""The kit's hypothesis strategies generate what they promise: every dtype, 0-d and empty shapes,
finite values, nested containers, classification batches and fresh train states."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import ConfigError
from fnloop.testing import strategies as fst

FEW = settings(max_examples=50, deadline=None)


@pytest.mark.parametrize("dtype", fst.DTYPES, ids=str)
def test_dtypes_reach_every_dtype(dtype):
    assert find(fst.dtypes(), lambda d: d == dtype) == dtype
    assert find(fst.tensors(), lambda t: t.dtype == dtype).dtype == dtype


def test_dtypes_are_the_promised_ones():
    assert set(fst.DTYPES) == {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool}


def test_shapes_include_0d_and_empty():
    assert find(fst.shapes(), lambda s: s == ()) == ()
    assert 0 in find(fst.shapes(), lambda s: 0 in s)
    assert find(fst.tensors(), lambda t: t.ndim == 0).shape == ()
    assert find(fst.tensors(), lambda t: t.numel() == 0 and t.ndim > 0).numel() == 0


@FEW
@given(fst.shapes(1, 2, 4, min_side=2))
def test_shapes_respect_bounds(shape):
    assert isinstance(shape, tuple) and 1 <= len(shape) <= 2
    assert all(2 <= side <= 4 for side in shape)


@FEW
@given(fst.tensors())
def test_tensors_default(t):
    assert isinstance(t, torch.Tensor) and t.dtype in fst.DTYPES and t.device.type == "cpu"
    assert t.ndim <= 3 and all(side <= 5 for side in t.shape)
    if t.is_floating_point():
        assert bool(torch.isfinite(t).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_default_floats_are_finite(dtype):
    @settings(max_examples=30, deadline=None)
    @given(fst.tensors(dtype, (4, 4)))
    def check(t: torch.Tensor) -> None:
        assert t.dtype == dtype and t.shape == (4, 4)
        assert bool(torch.isfinite(t).all())

    check()


@FEW
@given(fst.tensors(torch.int64, st.sampled_from([(2,), (1, 3)]), elements=st.integers(-3, 3)))
def test_tensors_with_given_dtype_shape_and_elements(t):
    assert t.dtype == torch.int64 and t.shape in {(2,), (1, 3)}
    assert int(t.abs().max()) <= 3


def _depth(tree: Any) -> int:
    if isinstance(tree, dict):
        return 1 + max((_depth(v) for v in tree.values()), default=0)
    if isinstance(tree, (list, tuple)):
        return 1 + max((_depth(v) for v in tree), default=0)
    return 0


def _keys(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return list(tree) + [k for v in tree.values() for k in _keys(v)]
    if isinstance(tree, (list, tuple)):
        return [k for v in tree for k in _keys(v)]
    return []


@FEW
@given(fst.pytrees(max_depth=2))
def test_pytrees_respect_depth_and_hold_tensors(tree):
    assert _depth(tree) <= 2
    assert all(isinstance(x, torch.Tensor) for x in fl.tree_leaves(tree))
    assert all(isinstance(k, str) and k and "/" not in k and "." not in k for k in _keys(tree))


def test_pytrees_reach_each_container_kind():
    assert isinstance(find(fst.pytrees(), lambda t: isinstance(t, dict) and len(t) > 1), dict)
    assert isinstance(find(fst.pytrees(), lambda t: isinstance(t, list) and len(t) > 1), list)
    assert isinstance(find(fst.pytrees(), lambda t: isinstance(t, tuple) and len(t) > 1), tuple)
    assert _depth(find(fst.pytrees(max_depth=2), lambda t: _depth(t) == 2)) == 2
    assert isinstance(find(fst.pytrees(), lambda t: isinstance(t, torch.Tensor)), torch.Tensor)


@FEW
@given(fst.pytrees(st.integers(), max_depth=1))
def test_pytrees_with_other_leaves(tree):
    assert _depth(tree) <= 1
    assert all(isinstance(x, int) for x in fl.tree_leaves(tree))


@FEW
@given(fst.batches(5, 3, min_size=2, max_size=6))
def test_batches(batch):
    x, y = batch
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.ndim == 2 and x.shape[1] == 5 and 2 <= x.shape[0] <= 6
    assert y.shape == (x.shape[0],)
    assert int(y.min()) >= 0 and int(y.max()) < 3
    assert bool(torch.isfinite(x).all())


def _linear() -> torch.nn.Module:
    return torch.nn.Linear(3, 2)


@FEW
@given(st.data())
def test_train_states(data):
    rng_before = torch.get_rng_state()
    txs = st.sampled_from([flo.sgd(lr=0.1), flo.adam(lr=1e-3)])
    state = data.draw(fst.train_states(_linear, txs, steps=st.integers(0, 9)))
    assert torch.equal(torch.get_rng_state(), rng_before)  # drawing a state leaves the global RNG alone
    assert isinstance(state, fl.TrainState)
    assert sorted(state.params) == ["bias", "weight"]
    assert 0 <= int(state.step) <= 9 and state.step.dtype == torch.int64
    fl.check_same_structure(state.tx.init(state.params), state.opt_state)


def test_train_states_weights_follow_the_seed():
    a = find(fst.train_states(_linear, flo.sgd(lr=0.1), seeds=st.just(3)), lambda s: True)
    b = find(fst.train_states(_linear, flo.sgd(lr=0.1), seeds=st.just(3)), lambda s: True)
    c = find(fst.train_states(_linear, flo.sgd(lr=0.1), seeds=st.just(4)), lambda s: True)
    assert int(a.rng) == 3 and int(c.rng) == 4
    assert torch.equal(a.params["weight"], b.params["weight"])
    assert not torch.equal(a.params["weight"], c.params["weight"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: fst.shapes(min_dims=3, max_dims=1),
        lambda: fst.shapes(max_side=-1),
        lambda: fst.pytrees(max_depth=-1),
        lambda: fst.batches(0, 3),
        lambda: fst.batches(2, 3, min_size=5, max_size=4),
        lambda: fst.tensors(shape=3),
    ],
    ids=["dims", "side", "depth", "features", "sizes", "shape-type"],
)
def test_bad_arguments(make):
    with pytest.raises(ConfigError):
        make()
