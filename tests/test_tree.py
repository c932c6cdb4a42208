"""``fl.dataclass`` registration (optree namespace "fnloop" and torch.utils._pytree), ``replace``,
frozenness, key path strings and ``check_same_structure``."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from hypothesis import given, settings

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import FnloopError, TreeMismatchError
from fnloop.testing import assert_trees_equal
from fnloop.testing import strategies as fst


import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


@fl.dataclass
class Record:
    b: torch.Tensor
    name: str = fl.field(static=True, default="r")
    a: Any = None
    tag: int = fl.field(static=True, default=7)


def _record() -> Record:
    return Record(torch.ones(2), name="x", a={"k": torch.zeros(3), "j": [torch.full((1,), 2.0)]}, tag=3)


def test_optree_sees_fields_in_order_without_static_ones():
    r = _record()
    leaves = optree.tree_leaves(r, namespace="fnloop")
    assert [x.tolist() for x in leaves] == [[1.0, 1.0], [2.0], [0.0, 0.0, 0.0]]  # b, then a's dict sorted by key
    assert optree.tree_leaves(r) == [r]  # registered in the fnloop namespace only
    assert fl.tree_leaves(r) == leaves


def test_torch_pytree_sees_the_same_leaves():
    r = _record()
    torch_leaves, spec = torch_pytree.tree_flatten(r)
    fl_leaves = fl.tree_leaves(r)
    assert len(torch_leaves) == len(fl_leaves)
    assert torch_leaves[0] is r.b  # field order: b first, then a
    # optree walks dict keys sorted, torch in insertion order: the same leaves, possibly reordered
    assert {id(x) for x in torch_leaves} == {id(x) for x in fl_leaves}
    ordered = Record(torch.ones(1), a={"j": torch.zeros(1), "k": torch.ones(2)})
    assert all(x is y for x, y in zip(torch_pytree.tree_leaves(ordered), fl.tree_leaves(ordered), strict=True))
    back = torch_pytree.tree_unflatten([x + 1 for x in torch_leaves], spec)
    assert isinstance(back, Record)
    assert (back.name, back.tag) == ("x", 3)
    assert_trees_equal(back.b, torch.full((2,), 2.0))


def test_torch_pytree_key_paths_name_fields():
    paths = [torch_pytree.keystr(p) for p, _ in torch_pytree.tree_flatten_with_path(_record())[0]]
    assert paths[0] == ".b"
    assert all(p.startswith(".a") for p in paths[1:])


def test_unflatten_keeps_static_fields():
    r = _record()
    leaves, spec = fl.tree_flatten(r)
    back = fl.tree_unflatten(spec, [x * 2 for x in leaves])
    assert type(back) is Record
    assert (back.name, back.tag) == ("x", 3)
    assert_trees_equal(back.a["k"], torch.zeros(3))
    mapped = fl.tree_map(lambda x: x + 1, r)
    assert (mapped.name, mapped.tag) == ("x", 3)


def test_static_fields_are_part_of_the_structure():
    r = _record()
    assert fl.tree_structure(r) != fl.tree_structure(r.replace(tag=4))
    assert fl.tree_structure(r) == fl.tree_structure(r.replace(b=torch.zeros(2)))


def test_replace_returns_a_new_object():
    r = _record()
    r2 = r.replace(b=torch.zeros(2), tag=9)
    assert r2 is not r
    assert (r.tag, r2.tag) == (3, 9)
    assert_trees_equal(r.b, torch.ones(2))
    assert r2.a is r.a  # unchanged fields are shared, not copied


def test_replace_rejects_unknown_fields():
    with pytest.raises(fl.ConfigError, match="nope") as info:
        _record().replace(nope=1)
    assert isinstance(info.value, TypeError)  # as dataclasses.replace raises


@pytest.mark.parametrize("field", ["b", "name", "a", "tag"])
def test_frozen(field):
    r = _record()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(r, field, 1)


def _state(tx: Any) -> fl.TrainState:
    return fl.TrainState.create(sc.make_mlp(), tx, seed=0)


@pytest.mark.parametrize(
    "tx, expected",
    [
        (flo.sgd(lr=0.1), ["params/0.weight", "params/2.bias", "opt_state/0/count", "opt_state/0/lr"]),
        (flo.sgd(lr=0.1, momentum=0.9), ["opt_state/0/trace/0.weight"]),
        (flo.adam(lr=1e-3), ["opt_state/0/mu/0.weight", "opt_state/0/nu/2.bias"]),
        (flo.chain(flo.clip_by_global_norm(1.0), flo.adam(lr=1e-3)), ["opt_state/1/0/mu/0.weight"]),
    ],
)
def test_key_path_strings(tx, expected):
    paths = fl.tree_paths(_state(tx))
    for p in expected:
        assert p in paths
    assert paths[0] == "step"
    assert {"rng", "loop/epoch", "loop/status"} <= set(paths)
    assert not any(p.startswith(("module", "tx")) for p in paths)  # static fields hold no leaves


def test_tree_flatten_with_path_matches_leaves():
    state = _state(flo.adam(lr=1e-3))
    paths, leaves, spec = fl.tree_flatten_with_path(state)
    assert len(paths) == len(leaves) == spec.num_leaves
    by_path = dict(zip(paths, leaves))
    assert by_path["params/0.weight"] is state.params["0.weight"]
    assert by_path["opt_state/0/mu/0.weight"] is state.opt_state[0].mu["0.weight"]


def test_check_same_structure_lists_missing_and_extra_paths():
    want = {"params": {"a": torch.zeros(1), "b": torch.zeros(1)}, "c": torch.zeros(1)}
    got = {"params": {"a": torch.zeros(1), "z": torch.zeros(1)}, "c": torch.zeros(1)}
    with pytest.raises(TreeMismatchError) as info:
        fl.check_same_structure(want, got, what="thing")
    text = str(info.value)
    assert "thing" in text
    assert "missing key paths: params/b" in text
    assert "unexpected key paths: params/z" in text
    assert isinstance(info.value, FnloopError)


def test_check_same_structure_same_paths_different_containers():
    with pytest.raises(TreeMismatchError, match="structures differ"):
        fl.check_same_structure([torch.zeros(1)], (torch.zeros(1),))


@settings(max_examples=50, deadline=None)
@given(fst.pytrees(max_depth=3))
def test_flatten_unflatten_round_trip(tree):
    paths, leaves, spec = fl.tree_flatten_with_path(tree)
    assert len(set(paths)) == len(paths)  # key paths identify leaves
    back = fl.tree_unflatten(spec, leaves)
    assert_trees_equal(back, tree)
    fl.check_same_structure(tree, back)
