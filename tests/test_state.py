"""``TrainState.create``: leaves, the meta-device template, the caller's module left untouched,
no aliasing, tied weights, ``params=`` and bad arguments."""

from __future__ import annotations

import copy
import sys
from typing import Any

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import FnloopError, TreeMismatchError
from fnloop.testing import assert_trees_close, assert_trees_equal


import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

MODELS = {"mlp": sc.make_mlp, "dropout_bn": sc.make_dropout_bn_mlp, "tied": sc.make_tied}


def _ptrs(tensors: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_leaves(name):
    module = MODELS[name]()
    state = fl.TrainState.create(module, flo.sgd(lr=0.1, momentum=0.9), seed=5)
    assert state.step.dtype == torch.int64 and state.step.ndim == 0 and state.step.device.type == "cpu"
    assert int(state.step) == 0
    assert state.rng.dtype == torch.int64 and state.rng.ndim == 0 and int(state.rng) == 5
    assert list(state.params) == [n for n, _ in module.named_parameters()]
    assert list(state.buffers) == [n for n, _ in module.named_buffers()]
    assert_trees_equal(state.params, {n: p.detach() for n, p in module.named_parameters()})
    assert_trees_equal(state.buffers, {n: b for n, b in module.named_buffers()})
    assert all(not p.requires_grad for p in state.params.values())
    assert isinstance(state.loop, fl.LoopState)
    assert state.loop.epoch == 0 and state.loop.status == fl.Status.INITIALIZING
    fl.check_same_structure(state.tx.init(state.params), state.opt_state)


def test_buffers_keyed_like_named_buffers():
    state = fl.TrainState.create(sc.make_dropout_bn_mlp(), flo.sgd(lr=0.1))
    assert sorted(state.buffers) == ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var"]
    assert state.buffers["bn.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("name", sorted(MODELS))
def test_template_holds_no_weight_memory(name):
    state = fl.TrainState.create(MODELS[name](), flo.adam(lr=1e-3))
    tensors = list(state.module.parameters()) + list(state.module.buffers())
    assert tensors
    assert all(t.device.type == "meta" for t in tensors)
    # and it still stays so after a step binds the state's tensors into it
    step = fl.train_step(sc.tied_loss if name == "tied" else sc.plain_loss)
    step(state, sc.make_batch())
    assert all(t.device.type == "meta" for t in list(state.module.parameters()) + list(state.module.buffers()))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_user_module_untouched(name):
    module = MODELS[name]()
    reference = copy.deepcopy(module)
    versions = [t._version for t in module.state_dict().values()]
    state = fl.TrainState.create(module, flo.sgd(lr=0.5), seed=0)
    step = fl.train_step(sc.tied_loss if name == "tied" else sc.plain_loss)
    for batch in sc.make_batches(3):
        state, _ = step(state, batch)
    assert all(t.device.type == "cpu" for t in module.state_dict().values())
    assert_trees_equal(dict(module.state_dict()), dict(reference.state_dict()))
    assert [t._version for t in module.state_dict().values()] == versions
    assert module.training == reference.training
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_does_not_alias_module(name):
    module = MODELS[name]()
    state = fl.TrainState.create(module, flo.sgd(lr=0.1))
    assert not _ptrs(list(state.params.values()) + list(state.buffers.values())) & _ptrs(module.state_dict().values())


def test_tied_weights_one_entry():
    module = sc.make_tied()
    assert module.dec.weight is module.enc.weight
    state = fl.TrainState.create(module, flo.sgd(lr=0.1))
    assert sorted(state.params) == ["dec.bias", "enc.bias", "enc.weight"]
    assert state.module.dec.weight is state.module.enc.weight


def test_tied_weights_step_updates_both_uses():
    module = sc.make_tied()
    batches = sc.make_batches(3)
    state = fl.TrainState.create(module, flo.sgd(lr=0.1))
    step = fl.train_step(sc.tied_loss)
    for batch in batches:
        state, _ = step(state, batch)
    # torch reference: the shared weight gets the sum of the gradients of both uses
    ref = copy.deepcopy(module)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for batch in batches:
        opt.zero_grad()
        sc.tied_loss(ref, batch).backward()
        opt.step()
    assert ref.dec.weight is ref.enc.weight
    assert_trees_close(state.params, {n: p.detach() for n, p in ref.named_parameters()}, rtol=1e-6, atol=1e-7)
    # a bound module uses the one updated tensor in both places
    with fl.bind(state.module, state.params, state.buffers) as model:
        assert model.dec.weight is state.params["enc.weight"]
        assert model.enc.weight is state.params["enc.weight"]


def test_params_argument():
    module = sc.make_mlp()
    new = {n: torch.full_like(p, 0.25) for n, p in module.named_parameters()}
    state = fl.TrainState.create(module, flo.sgd(lr=0.1), params=new)
    assert_trees_equal(state.params, new)
    assert not _ptrs(state.params.values()) & _ptrs(new.values())  # copied, not shared
    new["0.weight"].add_(1.0)
    assert float(state.params["0.weight"][0, 0]) == 0.25


def test_params_argument_with_wrong_keys():
    module = sc.make_mlp()
    bad = {n: p.detach() for n, p in module.named_parameters() if n != "2.bias"}
    bad["extra"] = torch.zeros(1)
    with pytest.raises(TreeMismatchError) as info:
        fl.TrainState.create(module, flo.sgd(lr=0.1), params=bad)
    assert "2.bias" in str(info.value) and "extra" in str(info.value)


@pytest.mark.parametrize("not_a_module", ["model", None, {"weight": torch.zeros(1)}, torch.zeros(2)])
def test_non_module_raises(not_a_module):
    with pytest.raises(FnloopError, match="torch.nn.Module") as info:
        fl.TrainState.create(not_a_module, flo.sgd(lr=0.1))
    assert isinstance(info.value, TypeError)  # still what Python code expects for a wrong type


def test_seed_sets_rng_and_replace_keeps_statics():
    a = fl.TrainState.create(sc.make_mlp(), flo.sgd(lr=0.1), seed=1)
    b = a.replace(rng=torch.tensor(2))
    assert int(a.rng) == 1 and int(b.rng) == 2
    assert b.module is a.module and b.tx is a.tx
