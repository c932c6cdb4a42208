"""The gradient reduction inside the step: buckets, the fast path against the meaning, and the
compiled step (functional collectives traced), on a one-rank gloo group in this process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fnloop as fl
import fnloop.optim as flo
from fnloop.connectors.strategy import DDPStrategy, GradReducer, _buckets, resolve_strategy
from fnloop.options import StepOptions
from fnloop.step import apply_train_step
from fnloop.testing import assert_trees_equal

import kernel_scenarios as sc  # noqa: E402


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_buckets_run_backwards_by_dtype_and_cap():
    grads = [torch.zeros(10), torch.zeros(10), torch.zeros(4, dtype=torch.float64), torch.zeros(30), torch.zeros(1)]
    assert _buckets(grads, cap_bytes=100) == [[4], [3], [2], [1, 0]]
    assert _buckets(grads, cap_bytes=1e9) == [[4, 3], [2], [1, 0]]
    assert _buckets(grads, cap_bytes=1e9, first_cap_bytes=8) == [[4], [3], [2], [1, 0]]  # a small first bucket


@pytest.mark.parametrize("value, message", [("dp", "accepted values"), (DDPStrategy(), None), (fl.FSDPStrategy(), None)])
def test_strategy_values(value, message):
    if message is None:
        assert resolve_strategy(value) == value
        assert fl.Trainer(strategy=value).strategy == value
    else:
        with pytest.raises(fl.ConfigError, match=message):
            fl.Trainer(strategy=value)


def test_reduced_fast_path_equals_the_meaning(one_rank_group):
    options = StepOptions(accumulate_grad_batches=2, gradient_clip_val=0.5, grad_reduce=GradReducer(0, 1, bucket_cap_mb=1e-4))
    state = fl.TrainState.create(sc.make_dropout_bn_mlp(0), flo.adamw(lr=1e-2))
    step = fl.train_step(sc.loss_fn).with_options(options)
    fast, pure = state, state
    for b in sc.make_batches(4):
        fast, m1 = step(fast, b)
        pure, m2 = apply_train_step(sc.loss_fn, pure, b, options)
        assert_trees_equal(m1, {k: v.detach() for k, v in m2.items()})
    assert_trees_equal(fast.params, pure.params)
    # the rank folds into the seed: a reducer of another rank draws other dropout masks
    other = StepOptions(grad_reduce=GradReducer(1, 1))
    a, _ = apply_train_step(sc.loss_fn, state, sc.make_batch(), StepOptions(grad_reduce=GradReducer(0, 1)))
    b, _ = apply_train_step(sc.loss_fn, state, sc.make_batch(), other)
    assert not torch.equal(a.params["fc1.weight"], b.params["fc1.weight"])


def test_reduced_step_compiles(one_rank_group):
    options = StepOptions(grad_reduce=GradReducer(0, 1))
    state = fl.TrainState.create(torch.nn.Linear(3, 2), flo.sgd(lr=0.1))
    loss = lambda m, b: m(b).square().mean()  # noqa: E731
    step = fl.train_step(loss).with_options(options)
    compiled = fl.compile(step, backend="aot_eager")
    x = torch.randn(4, 3)
    eager, _ = step(state, x)
    fast, _ = compiled(state, x)
    torch.testing.assert_close(fast.params, eager.params, rtol=1e-6, atol=1e-7)


def test_bucket_buffers_are_reused_and_no_state_aliases_them(one_rank_group):
    reducer = GradReducer(0, 1, bucket_cap_mb=1e-4)
    layout = [(5, torch.float32, torch.device("cpu"))]
    assert reducer.flats(layout)[0] is reducer.flats(layout)[0]  # allocated once, as DDP keeps its buckets
    step = fl.train_step(sc.loss_fn).with_options(StepOptions(grad_reduce=reducer))
    first, _ = step(fl.TrainState.create(sc.make_dropout_bn_mlp(0), flo.adamw(lr=1e-2)), sc.make_batch())
    kept = {k: v.clone() for k, v in first.params.items()}
    opt_kept = [t.clone() for t in fl.tree.tree_leaves(first.opt_state)]
    later = first
    for b in sc.make_batches(3):  # each step writes its gradients into the same buffers
        later, _ = step(later, b)
    assert_trees_equal(first.params, kept)
    assert_trees_equal(fl.tree.tree_leaves(first.opt_state), opt_kept)
