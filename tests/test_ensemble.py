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


def _add_noise(scale: float) -> flo.GradientTransformation:
    """A transform that draws: Gaussian noise added to each update (as optax.add_noise)."""

    def update(updates, state, params=None):
        return {k: u + scale * torch.randn(u.shape) for k, u in updates.items()}, state

    return flo.GradientTransformation(lambda params: flo.EmptyState(), update)


def test_an_optimizer_that_draws_draws_each_members_own_values():
    """The eager batched step runs the optimizer without the per-member random mode until it
    draws; from then on each member's noise comes from its own stream, as alone."""
    tx = flo.chain(_add_noise(0.1), flo.sgd(lr=0.1))
    states = [fl.TrainState.create(sc.make_mlp(i), tx, seed=20 + i) for i in range(N)]
    step, batched = fl.train_step(sc.loss_fn), fl.vmap(fl.train_step(sc.loss_fn))
    stacked = fl.stack(states)
    for batch in sc.make_batches(2):
        stacked, metrics = batched(stacked, batch)
        expected = [step(s, batch) for s in states]
        states = [e[0] for e in expected]
        _check_members(stacked, metrics, expected, rtol=1e-5)


@pytest.mark.parametrize("tx", sorted(TXS))
def test_fast_eager_path_equals_the_vmapped_core(tx):
    """The eager batched train step (losses under vmap, one backward of their sum, the optimizer
    under vmap) against the step's meaning, ``train_core`` under vmap with a grad transform (the
    path differentiating callers take)."""
    states = _states("dropout-bn", tx)
    step = fl.vmap(fl.train_step(sc.loss_fn))
    fast, fast_metrics = step(fl.stack(states), sc.make_batch())
    graph_batch = tuple(x.float().requires_grad_(True) if x.is_floating_point() else x for x in sc.make_batch())
    pure, pure_metrics = step(fl.stack(states), graph_batch)  # an input that requires grad: the pure path
    assert pure_metrics["loss"].requires_grad and not fast_metrics["loss"].requires_grad
    assert_trees_close(fast.params, {k: v.detach() for k, v in pure.params.items()}, rtol=1e-6, atol=1e-6)
    assert_trees_close(fast_metrics["loss"], pure_metrics["loss"].detach(), rtol=1e-6, atol=1e-6)


def test_flat_vmap_matches_torch_func_vmap():
    from fnloop import execution

    w = {"a": torch.randn(3, 4), "none": None, "n": 2}
    x = torch.randn(5, 4)
    out = execution.vmap(lambda p, b: {"y": p["a"] @ b.T * p["n"], "k": "kept"}, (w, x), (0, None), "error")
    assert out["k"] == "kept"
    assert_trees_equal(out["y"], torch.func.vmap(lambda a: a @ x.T * 2)(w["a"]))
    with pytest.raises(ValueError, match="sizes \\[3, 5\\]"):
        execution.vmap(lambda p, b: p["a"], (w, x), (0, 0), "error")
    with pytest.raises(ValueError, match="dimension 0 of a tensor of shape \\(\\)"):
        execution.vmap(lambda s: s, (torch.tensor(1.0),), (0,), "error")


class _TorchOnlyBatch:
    """A batch type registered with torch's pytree only (optree sees one leaf)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x


torch.utils._pytree.register_pytree_node(_TorchOnlyBatch, lambda b: ([b.x], None), lambda xs, _: _TorchOnlyBatch(xs[0]))


def test_flat_vmap_splits_a_batch_type_only_torch_knows():
    from fnloop import execution

    batch = _TorchOnlyBatch(torch.arange(6.0).view(3, 2))
    out = execution.vmap(lambda b: b.x.sum(), (batch,), (0,), "error")
    assert out.tolist() == [1.0, 5.0, 9.0]
