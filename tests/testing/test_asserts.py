"""The kit's assertions: tree comparisons name the differing key paths; ``assert_pure`` catches
in-place writes, version bumps, global RNG use, aliasing and non-determinism."""

from __future__ import annotations

import itertools
import sys
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import ConfigError
from fnloop.testing import assert_pure, assert_trees_close, assert_trees_equal
from fnloop.testing import strategies as fst


import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


def _tree() -> dict[str, Any]:
    return {
        "params": {"0.weight": torch.arange(6.0).reshape(2, 3), "0.bias": torch.tensor([1.0, float("nan")])},
        "opt_state": (torch.tensor(3), [torch.tensor([True, False]), torch.zeros((), dtype=torch.bfloat16)]),
        "empty": torch.zeros(0, 4),
        "name": "run",
        "n": 7,
    }


def _copy(tree: Any) -> Any:
    return fl.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _flip(t: torch.Tensor, index: int) -> torch.Tensor:
    """A copy of ``t`` with one element changed."""
    out = t.clone().reshape(-1)
    old = out[index]
    if t.dtype == torch.bool:
        out[index] = ~old
    elif not t.is_floating_point():
        out[index] = old ^ 1
    else:
        out[index] = torch.where(old == 0, torch.ones_like(old), old * 2)
    return out.reshape(t.shape)


# --- assert_trees_equal / assert_trees_close ------------------------------------------------------


def test_equal_trees_pass():
    assert_trees_equal(_tree(), _copy(_tree()))  # NaN in the same place, 0-d, empty, bool, int, str
    assert_trees_close(_tree(), _copy(_tree()))


def test_every_differing_path_is_listed_with_its_max_abs_diff():
    got = _copy(_tree())
    got["params"]["0.weight"] = got["params"]["0.weight"] + torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.25, 0.0]])
    got["opt_state"] = (torch.tensor(5), got["opt_state"][1])
    got["n"] = 8
    with pytest.raises(AssertionError) as info:
        assert_trees_equal(got, _tree(), msg="after step 3")
    text = str(info.value)
    assert text.startswith("after step 3: ")
    assert "at 3 key path(s)" in text
    assert "params/0.weight: 1 of 6 elements differ, max abs diff 0.25 at index (1, 1)" in text
    assert "opt_state/0: 1 of 1 elements differ, max abs diff 2" in text
    assert "n: actual 8 != expected 7" in text
    assert "0.bias" not in text and "empty" not in text


def test_nan_against_a_number_differs():
    with pytest.raises(AssertionError, match=r"params/0\.bias.*nan"):
        assert_trees_equal(
            {"params": {"0.bias": torch.tensor([1.0, 2.0])}}, {"params": {"0.bias": torch.tensor([1.0, float("nan")])}}
        )
    with pytest.raises(AssertionError, match="NaN"):
        assert_trees_close(torch.tensor([float("nan")]), torch.tensor([0.0]))


@pytest.mark.parametrize(
    "actual, expected, words",
    [
        (torch.zeros(2, dtype=torch.float64), torch.zeros(2), ("dtype", "float64", "float32")),
        (torch.zeros(2, 1), torch.zeros(2), ("shape", "(2, 1)", "(2,)")),
        (torch.zeros(2, device="meta"), torch.zeros(2), ("device", "meta", "cpu")),
        (1.0, torch.zeros(()), ("float", "Tensor")),
    ],
    ids=["dtype", "shape", "device", "type"],
)
def test_metadata_differences(actual, expected, words):
    for check in (assert_trees_equal, assert_trees_close):
        with pytest.raises(AssertionError) as info:
            check({"w": actual}, {"w": expected})
        assert all(w in str(info.value) for w in ("w:",) + words), str(info.value)


def test_structure_difference_lists_key_paths():
    with pytest.raises(AssertionError) as info:
        assert_trees_equal({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1), "c": torch.zeros(1)})
    assert "missing key paths: c" in str(info.value) and "unexpected key paths: b" in str(info.value)


def test_close_within_and_beyond_tolerance():
    expected = {"a": torch.tensor([1.0, 100.0]), "b": torch.tensor([0.0])}
    assert_trees_close({"a": torch.tensor([1.0 + 1e-6, 100.0 + 5e-4]), "b": torch.tensor([5e-7])}, expected)
    assert_trees_close({"a": torch.tensor([1.1, 100.0]), "b": torch.tensor([0.0])}, expected, rtol=0.2)
    with pytest.raises(AssertionError) as info:
        assert_trees_close({"a": torch.tensor([1.0, 100.1]), "b": torch.tensor([1.0])}, expected, msg="m")
    text = str(info.value)
    assert text.startswith("m: ") and "rtol=1e-05" in text
    assert text.index("b:") < text.index("a:")  # worst first: |1 - 0| / 1e-6 beats |0.1| / 1e-3


def test_close_requires_equal_infinities():
    assert_trees_close(torch.tensor([float("inf"), -float("inf")]), torch.tensor([float("inf"), -float("inf")]))
    with pytest.raises(AssertionError):
        assert_trees_close(torch.tensor([float("inf")]), torch.tensor([-float("inf")]))


def _with_nonempty_leaf(tree: Any) -> bool:
    return any(isinstance(x, torch.Tensor) and x.numel() for x in fl.tree_leaves(tree))


@settings(max_examples=60, deadline=None)
@given(fst.pytrees(max_depth=3).filter(_with_nonempty_leaf), st.data())
def test_a_single_flipped_element_is_found(tree, data):
    paths, leaves, spec = fl.tree_flatten_with_path(tree)
    candidates = [i for i, x in enumerate(leaves) if x.numel()]
    i = data.draw(st.sampled_from(candidates))
    index = data.draw(st.integers(0, leaves[i].numel() - 1))
    flipped = list(leaves)
    flipped[i] = _flip(leaves[i], index)
    other = fl.tree_unflatten(spec, flipped)
    assert_trees_equal(fl.tree_unflatten(spec, [x.clone() for x in leaves]), tree)
    with pytest.raises(AssertionError) as info:
        assert_trees_equal(other, tree)
    lines = str(info.value).splitlines()
    assert "at 1 key path(s)" in lines[0]
    label = paths[i] or "<root>"
    assert lines[1].startswith(f"  {label}: 1 of {leaves[i].numel()} elements differ")


_moderate = fst.tensors(
    st.sampled_from([torch.float32, torch.float64]), fst.shapes(1, 2, 3, min_side=1), st.floats(-100, 100, width=32)
)


@settings(max_examples=60, deadline=None)
@given(fst.pytrees(_moderate), st.data())
def test_close_finds_a_single_element_beyond_tolerance(tree, data):
    paths, leaves, spec = fl.tree_flatten_with_path(tree)
    if not leaves:
        return
    i = data.draw(st.integers(0, len(leaves) - 1))
    index = data.draw(st.integers(0, leaves[i].numel() - 1))
    moved = leaves[i].clone()
    moved.view(-1)[index] += 1.0
    nudged = [x * (1 + 1e-7) for x in leaves]  # well within tolerance
    assert_trees_close(fl.tree_unflatten(spec, nudged), tree)
    with pytest.raises(AssertionError) as info:
        assert_trees_close(fl.tree_unflatten(spec, [moved if j == i else x for j, x in enumerate(leaves)]), tree)
    assert (paths[i] or "<root>") + ": 1 of" in str(info.value)


# --- assert_pure ------------------------------------------------------------------------------------


def _state() -> fl.TrainState:
    return fl.TrainState.create(sc.make_dropout_bn_mlp(), flo.sgd(lr=0.1, momentum=0.9), seed=1)


STEP = fl.train_step(sc.loss_fn)


@pytest.mark.parametrize(
    "step",
    [STEP, fl.eval_step(sc.eval_fn), fl.predict_step(sc.predict_fn)],
    ids=["train_step", "eval_step", "predict_step"],
)
def test_real_steps_are_pure(step):
    state, batch = _state(), sc.make_batch()
    out = assert_pure(step, state, batch, runs=3)
    assert_trees_equal(out, step(state, batch))


def test_passing_unchanged_tensors_through_is_allowed():
    def accumulate(state: Any, batch: Any) -> Any:  # like a gradient-accumulation call: params unchanged
        return state.replace(step=state.step + 1), {}

    new_state, _ = assert_pure(accumulate, _state(), sc.make_batch())
    assert int(new_state.step) == 1


def test_runs_must_be_positive():
    with pytest.raises(ConfigError, match="runs"):
        assert_pure(STEP, _state(), sc.make_batch(), runs=0)


def _mutates_params(state: Any, batch: Any) -> Any:
    state.params["fc1.weight"].mul_(0.5)
    return STEP(state, batch)


def _bumps_version(state: Any, batch: Any) -> Any:
    state.opt_state[0].trace["fc2.bias"].add_(0)  # same values, but an in-place write
    return STEP(state, batch)


def _mutates_batch(state: Any, batch: Any) -> Any:
    batch[0].clamp_(-1, 1)
    return STEP(state, batch)


def _adds_a_key(state: Any, batch: Any) -> Any:
    state.buffers["extra"] = torch.zeros(1)
    return STEP(state, batch)


def _uses_global_rng(state: Any, batch: Any) -> Any:
    noise = torch.rand(())
    new_state, metrics = STEP(state, batch)
    return new_state, {**metrics, "noise": noise}


def _returns_views(state: Any, batch: Any) -> Any:
    new_state, metrics = STEP(state, batch)
    return new_state.replace(params={**new_state.params, "fc1.bias": state.params["fc1.bias"].view(-1)}), metrics


def _returns_detached_alias(state: Any, batch: Any) -> Any:
    new_state, metrics = STEP(state, batch)
    opt = new_state.opt_state
    buf = {**opt[0].trace, "fc2.weight": state.opt_state[0].trace["fc2.weight"].detach()}
    return new_state.replace(opt_state=(opt[0]._replace(trace=buf), *opt[1:])), metrics


_calls = itertools.count()


def _not_deterministic(state: Any, batch: Any) -> Any:
    new_state, metrics = STEP(state, batch)
    return new_state, {**metrics, "call": torch.tensor(next(_calls))}


def _predict_in_train_mode(model: Any, batch: Any) -> Any:
    model.train()  # BatchNorm then writes its running stats into the state's buffers
    return model(batch[0])


IMPURE = {
    "mutates-params": (_mutates_params, ("run 1 modified its inputs", "state/params/fc1.weight", "values changed")),
    "bumps-version": (_bumps_version, ("_version 0 -> 1", "state/opt_state/0/trace/fc2.bias")),
    "mutates-batch": (_mutates_batch, ("batch/0",)),
    "adds-a-key": (_adds_a_key, ("structure of the state changed", "extra")),
    "global-rng": (_uses_global_rng, ("RNG", "cpu")),
    "returns-views": (_returns_views, ("output/0/params/fc1.bias shares storage with state/params/fc1.bias",)),
    "detached-alias": (_returns_detached_alias, ("state/opt_state/0/trace/fc2.weight",)),
    "not-deterministic": (_not_deterministic, ("run 2 differs from run 1", "1/call")),
    "predict-in-train-mode": (fl.predict_step(_predict_in_train_mode), ("state/buffers/bn.running_mean", "_version")),
}


@pytest.mark.parametrize("case", sorted(IMPURE))
def test_impure_steps_are_caught(case):
    step, words = IMPURE[case]
    with pytest.raises(AssertionError) as info:
        assert_pure(step, _state(), sc.make_batch())
    text = str(info.value)
    for word in words:
        assert word in text, f"{word!r} not in: {text}"
