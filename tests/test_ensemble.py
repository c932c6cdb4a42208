"""``fl.vmap``: member i of a stacked state computes what state i computes alone, drawing its
randomness from its own key and step (eager: the random values bitwise; compiled: replayed)."""

from __future__ import annotations

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_trees_close, assert_trees_equal

import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

N = 3
TXS = {
    "sgd-momentum": lambda: flo.sgd(lr=0.1, momentum=0.9),
    "sgd": lambda: flo.sgd(lr=0.1),  # a None leaf in the optimizer state
    "adamw": lambda: flo.adamw(lr=1e-2, weight_decay=0.1),
}


def _dropout_bn(seed: int) -> torch.nn.Module:
    """fc1's bias is frozen: BatchNorm cancels its gradient, which Adam would scale from rounding noise up to lr."""
    model = sc.make_dropout_bn_mlp(seed)
    model.fc1.bias.requires_grad_(False)
    return model


MODELS = {"mlp": sc.make_mlp, "dropout-bn": _dropout_bn}


class Noisy(torch.nn.Module):
    """Elementwise only (a scale, dropout, added noise): vectorized results are bitwise."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, sc.N_FEATURES))
        self.drop = torch.nn.Dropout(0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x * self.scale) + 0.1 * torch.randn_like(x) + torch.rand(x.shape[-1])


def noisy_loss(model, batch):
    out = model(batch[0])
    return out.square().mean(), {"out": out}


def _states(model: str, tx: str) -> list[fl.TrainState]:
    """Built by separate create calls, with different weights and keys."""
    return [fl.TrainState.create(MODELS[model](i), TXS[tx](), seed=10 + i) for i in range(N)]


def _check_members(stacked, metrics, expected, *, rtol, msg=""):
    for i, (member, (state, m)) in enumerate(zip(fl.unstack(stacked), expected)):
        carried, want = member.loop.options, state.loop.options
        assert carried.key == want.key
        assert_trees_close(list(carried.tensors), list(want.tensors), rtol=rtol, atol=rtol, msg=f"{msg} carried of member {i}")
        member = member.replace(module=state.module, tx=state.tx, loop=state.loop)
        assert_trees_close(member, state, rtol=rtol, atol=rtol, msg=f"{msg} member {i}")
        assert_trees_close(fl.tree_map(lambda x, i=i: x[i], metrics), {k: v.detach() for k, v in m.items()}, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("tx", sorted(TXS))
def test_eager_members_equal_their_own_runs(model, tx):
    states = _states(model, tx)
    step = fl.train_step(sc.loss_fn)
    stacked, batched = fl.stack(states), fl.vmap(step)
    before = torch.get_rng_state()
    for batch in sc.make_batches(3):
        stacked, metrics = batched(stacked, batch)
        expected = [step(s, batch) for s in states]
        states = [e[0] for e in expected]
        _check_members(stacked, metrics, expected, rtol=1e-5, msg=f"{model}/{tx}")
    assert torch.equal(before, torch.get_rng_state())  # the caller's stream is left as it was
    assert stacked.step.tolist() == [3] * N


def test_random_values_are_bitwise_each_members_own():
    states = [fl.TrainState.create(Noisy(), flo.sgd(lr=0.1), seed=s) for s in (3, 4, 5)]
    states[1] = fl.train_step(noisy_loss)(states[1], sc.make_batch())[0]  # members at different steps
    step = fl.train_step(noisy_loss)
    stacked, metrics = fl.vmap(step)(fl.stack([s.replace(loop=states[0].loop) for s in states]), sc.make_batch(seed=1))
    for i, state in enumerate(states):
        alone, m = step(state, sc.make_batch(seed=1))
        assert_trees_equal(metrics["out"][i], m["out"].detach(), msg=f"member {i}")
        # the gradient sums over the batch: vectorized reductions round alike only to ~1 ulp
        assert_trees_close(fl.unstack(stacked)[i].params, alone.params, rtol=1e-6, atol=1e-6)
    assert not torch.equal(metrics["out"][0], metrics["out"][2])


def test_per_member_batches():
    states = _states("dropout-bn", "adamw")
    step = fl.train_step(sc.loss_fn)
    batches = sc.make_batches(N, seed=4)
    stacked_batch = fl.stack(batches)
    stacked, metrics = fl.vmap(step, batch_dim=0)(fl.stack(states), stacked_batch)
    _check_members(stacked, metrics, [step(s, b) for s, b in zip(states, batches)], rtol=1e-5)


def test_step_options_are_carried_per_member():
    step = fl.train_step(sc.loss_fn, accumulate_grad_batches=2, gradient_clip_val=0.5)
    states = _states("mlp", "adamw")
    stacked = fl.stack(states)
    for batch in sc.make_batches(3):
        stacked, metrics = fl.vmap(step)(stacked, batch)
        expected = [step(s, batch) for s in states]
        states = [e[0] for e in expected]
    _check_members(stacked, metrics, expected, rtol=1e-5)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_eval_and_predict_steps(batch_dim):
    states = _states("dropout-bn", "sgd")
    batches = sc.make_batches(N)
    batch = fl.stack(batches) if batch_dim == 0 else batches[0]
    own = batches if batch_dim == 0 else [batches[0]] * N
    for make, fn in ((fl.eval_step, sc.eval_fn), (fl.predict_step, sc.predict_fn)):
        out = fl.vmap(make(fn), batch_dim=batch_dim)(fl.stack(states), batch)
        for i, state in enumerate(states):
            assert_trees_close(fl.tree_map(lambda x, i=i: x[i], out), make(fn)(state, own[i]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order", ["compile(vmap)", "vmap(compile)"])
def test_compiled_members_equal_their_own_eager_runs(order):
    """The first call records the draws eagerly; later calls replay each member's own draws
    into the compiled graph, so dropout matches the eager run of each state alone."""
    states = [fl.TrainState.create(sc.make_dropout_bn_mlp(i), flo.sgd(lr=0.1, momentum=0.9), seed=i) for i in range(N)]
    step = fl.train_step(sc.loss_fn)
    if order == "compile(vmap)":
        batched = fl.compile(fl.vmap(step), backend="aot_eager")
    else:
        batched = fl.vmap(fl.compile(step, backend="aot_eager"))
    stacked = fl.stack(states)
    for batch in sc.make_batches(3):
        stacked, metrics = batched(stacked, batch)
        expected = [step(s, batch) for s in states]
        states = [e[0] for e in expected]
        _check_members(stacked, metrics, expected, rtol=1e-5, msg=order)


def test_errors_name_what_to_do():
    state = fl.TrainState.create(sc.make_mlp(), flo.sgd(lr=0.1))
    step = fl.train_step(sc.loss_fn)
    with pytest.raises(fl.TreeMismatchError, match="pass a stacked state"):
        fl.vmap(step)(state, sc.make_batch())
    with pytest.raises(fl.StepError, match="expected a step"):
        fl.vmap(lambda s, b: (s, {}))
    bernoulli = fl.train_step(lambda m, b: (m(b[0]) * torch.bernoulli(torch.sigmoid(m(b[0])))).mean())
    with pytest.raises(fl.StepError, match="depend on tensor inputs"):
        fl.vmap(bernoulli)(fl.stack([state, state]), sc.make_batch())
