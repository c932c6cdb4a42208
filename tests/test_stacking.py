"""``fl.stack`` / ``fl.unstack``: states built separately stack (static parts compared by
structure), the round trip is bitwise, and a difference is reported at its key path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_trees_equal

import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

TXS = {
    "sgd": lambda: flo.sgd(lr=0.1),
    "sgd-momentum": lambda: flo.sgd(lr=0.1, momentum=0.9),
    "adamw": lambda: flo.adamw(lr=1e-3, weight_decay=0.1),
    "clipped-adam": lambda: flo.chain(flo.clip_by_global_norm(1.0), flo.adam(lr=flo.warmup_cosine(1e-3, warmup_steps=2, decay_steps=9))),
}


def _trained(tx: str, seed: int, steps: int, **options) -> fl.TrainState:
    """A state built by its own ``TrainState.create`` call, ``steps`` steps in."""
    state = fl.TrainState.create(sc.make_dropout_bn_mlp(seed), TXS[tx](), seed=seed)
    step = fl.train_step(sc.loss_fn, **options)
    for batch in sc.make_batches(steps, seed=seed):
        state, _ = step(state, batch)
    return state


def _same_statics(state: fl.TrainState, like: fl.TrainState) -> fl.TrainState:
    return state.replace(module=like.module, tx=like.tx)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(sorted(TXS)), st.integers(1, 4), st.lists(st.integers(0, 3), min_size=1, max_size=4))
def test_round_trip_is_bitwise(tx, n, steps):
    states = [_trained(tx, seed, steps[seed % len(steps)]) for seed in range(n)]
    states = [s.replace(loop=states[0].loop) for s in states]  # members at different steps, one loop
    stacked = fl.stack(states)
    assert stacked.module is states[0].module and stacked.tx is states[0].tx
    assert stacked.step.tolist() == [int(s.step) for s in states]
    for leaf in fl.tree_leaves(stacked):
        if isinstance(leaf, torch.Tensor):
            assert leaf.shape[0] == n
    members = fl.unstack(stacked)
    assert len(members) == n
    for member, state in zip(members, states):
        assert_trees_equal(member, _same_statics(state, members[0]))


def test_options_carried_tensors_stack_per_member():
    states = [_trained("adamw", seed, 1, accumulate_grad_batches=3) for seed in range(3)]
    stacked = fl.stack(states)
    assert stacked.loop.options.key == states[0].loop.options.key
    assert all(t.shape[0] == 3 for t in stacked.loop.options.tensors)
    for member, state in zip(fl.unstack(stacked), states):
        assert member.loop.options == state.loop.options


def test_members_own_their_memory():
    stacked = fl.stack([_trained("sgd", seed, 0) for seed in range(2)])
    member = fl.unstack(stacked)[1]
    member.params["fc1.weight"].add_(1.0)
    assert not torch.equal(member.params["fc1.weight"], stacked.params["fc1.weight"][1])


def _variant(change: str) -> fl.TrainState:
    base = dict(make=lambda: sc.make_dropout_bn_mlp(0), tx=TXS["adamw"])
    if change == "module class":
        base["make"] = sc.make_mlp
    elif change == "dropout p":
        base["make"] = lambda: sc.make_dropout_bn_mlp(0, p=0.3)
    elif change == "weight decay":
        base["tx"] = lambda: flo.adamw(lr=1e-3, weight_decay=0.2)
    elif change == "learning rate":
        base["tx"] = lambda: flo.adamw(lr=1e-2, weight_decay=0.1)
    elif change == "optimizer":
        base["tx"] = lambda: flo.adam(lr=1e-3, weight_decay=0.1)
    return fl.TrainState.create(base["make"](), base["tx"]())


@pytest.mark.parametrize(
    ("change", "where", "what"),
    [
        ("module class", "at module ", "DropoutBNMLP vs Sequential"),
        ("dropout p", "at module.drop.p ", "0.5 vs 0.3"),
        ("weight decay", "weight_decay ", "0.1 vs 0.2"),
        ("learning rate", ".schedule", "0.001 vs 0.01"),
        # adam's coupled decay is a transform of its own, first in its chain; adamw starts with scale_by_adam
        ("optimizer", "tx.init.transforms.0", "scale_by_adam.<locals>.init vs add_decayed_weights"),
    ],
)
def test_a_static_difference_names_the_attribute_or_hyperparameter(change, where, what):
    with pytest.raises(fl.TreeMismatchError, match="state 1 differs from state 0") as info:
        fl.stack([_variant("none"), _variant(change)])
    assert where in str(info.value) and what in str(info.value)


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda s: s.replace(loop=s.loop.replace(epoch=2)), "loop/epoch"),
        (lambda s: s.replace(params={**s.params, "fc2.bias": s.params["fc2.bias"].double()}), "params/fc2.bias (state 0 vs state 2): dtype"),
        (lambda s: s.replace(params={**s.params, "fc2.bias": s.params["fc2.bias"][:2]}), "params/fc2.bias (state 0 vs state 2): shape"),
        (lambda s: s.replace(buffers={k: v for k, v in s.buffers.items() if k != "bn.running_var"}), "buffers"),
    ],
)
def test_a_leaf_difference_names_its_key_path(edit, where):
    state = _variant("none")
    with pytest.raises(fl.TreeMismatchError, match="state 2 differs") as info:
        fl.stack([state, state, edit(state)])
    assert where in str(info.value)


def test_unstack_refuses_a_state_that_is_not_stacked():
    with pytest.raises(fl.TreeMismatchError, match="not a stacked state"):
        fl.unstack(_variant("none"))
    with pytest.raises(fl.TreeMismatchError, match="no states"):
        fl.stack([])
