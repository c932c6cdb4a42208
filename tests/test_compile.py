"""``fl.compile``: a train step with gradient accumulation, clipping and AdamW on a warmup-cosine
schedule compiles once (no graph break, no recompilation over 100 steps while the learning rate
changes) and agrees with the eager step.

One compilation serves every test of this module (a module-scoped fixture): compiling takes
most of the time.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_trees_close, assert_trees_equal


import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

STEPS = 100
EVERY_K = 2


def _tx() -> flo.GradientTransformation:
    schedule = flo.warmup_cosine(1e-3, warmup_steps=10, decay_steps=100)
    inner = flo.chain(flo.clip_by_global_norm(1.0), flo.adamw(schedule, weight_decay=0.01))
    return flo.multi_steps(inner, every_k=EVERY_K)


@pytest.fixture(scope="module")
def run() -> Any:
    """100 compiled steps; at every step the eager step runs on the same input state too."""
    torch._dynamo.reset()
    counters.clear()
    state = fl.TrainState.create(sc.make_mlp(), _tx(), seed=0)  # no dropout: eager and compiled agree
    eager = fl.train_step(sc.loss_fn)
    fast = fl.compile(eager)
    batches = sc.make_batches(10, size=16)
    records = []
    for k in range(STEPS):
        batch = batches[k % len(batches)]
        # after the first call any recompilation raises (torch.compile's own recompile check)
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            compiled_out = fast(state, batch)
        eager_out = eager(state, batch)
        records.append((state, compiled_out, eager_out))
        state = compiled_out[0]
    seen = {
        "graph_break": dict(counters["graph_break"]),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "recompiles": dict(counters["recompiles"]),
    }
    yield records, seen
    torch._dynamo.reset()
    counters.clear()


def test_no_graph_break(run):
    _, seen = run
    assert seen["graph_break"] == {}


def test_compiles_once_over_100_steps(run):
    records, seen = run
    assert len(records) == STEPS  # the fixture ran every step with error_on_recompile after the first
    assert seen["unique_graphs"] == 1
    assert seen["recompiles"] == {}


def test_agrees_with_eager_step(run):
    records, _ = run
    for k, (_, (c_state, c_metrics), (e_state, e_metrics)) in enumerate(records):
        assert_trees_close(c_metrics, e_metrics, rtol=1e-4, atol=1e-5, msg=f"metrics of step {k}")
        assert_trees_close(c_state, e_state, rtol=1e-4, atol=1e-5, msg=f"state after step {k}")


def test_counters_and_accumulation(run):
    records, _ = run
    for k, (before, (c_state, _), _) in enumerate(records):
        assert int(c_state.step) == k + 1
        opt = c_state.opt_state
        assert int(opt.mini_step) == (k + 1) % EVERY_K
        assert int(opt.gradient_step) == (k + 1) // EVERY_K
        if (k + 1) % EVERY_K:  # an accumulating call leaves the params as they were
            assert_trees_equal(c_state.params, before.params)


def test_learning_rate_changes_every_optimizer_step(run):
    records, _ = run
    lrs = [float(flo.learning_rate(c_state.opt_state)) for _, (c_state, _), _ in records]
    eager_lrs = [float(flo.learning_rate(e_state.opt_state)) for _, _, (e_state, _) in records]
    assert lrs == eager_lrs
    schedule = flo.warmup_cosine(1e-3, warmup_steps=10, decay_steps=100)
    # after call k, (k + 1) // EVERY_K optimizer steps are done: the next one uses schedule(that)
    assert lrs == pytest.approx([float(schedule((k + 1) // EVERY_K)) for k in range(STEPS)], rel=1e-12)
    per_update = lrs[EVERY_K - 1 :: EVERY_K]
    assert len(set(per_update)) == STEPS // EVERY_K  # a new value after every optimizer step
    assert max(per_update) == pytest.approx(1e-3) and per_update[-1] < per_update[10]


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_compiled_step_keeps_the_rng_contract_with_and_without_randomness(dropout):
    """A graph that draws no randomness skips seeding after it is checked; one that draws it is
    seeded from the state every call. Either way the global RNG is untouched and calls repeat."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(dropout), torch.nn.Linear(8, 2))
    state = fl.TrainState.create(model, flo.sgd(lr=0.1), seed=3)
    fast = fl.compile(fl.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])), backend="eager")
    batch = (torch.randn(5, 4), torch.randn(5, 2))
    before = torch.get_rng_state()
    outs = [fast(state, batch) for _ in range(4)]  # compile, check, then the fast path
    assert torch.equal(torch.get_rng_state(), before)
    for new_state, metrics in outs[1:]:
        assert torch.equal(metrics["loss"], outs[0][1]["loss"])
        for k in state.params:
            assert torch.equal(new_state.params[k], outs[0][0].params[k])
    (core,) = [c for _, c in fast._run._pure.cores.values()]
    assert bool(core.rng_free) == (dropout == 0.0)
    if dropout:  # the dropout mask follows the state's step
        other, _ = fast(state.replace(step=state.step + 1), batch)
        assert not all(torch.equal(other.params[k], outs[0][0].params[k]) for k in state.params)


def test_materialize_leaves_eager_scalars_alone_and_keeps_values_when_compiled():
    from fnloop.optim import _foreach as fe

    a, b = torch.tensor(0.5, dtype=torch.float64), torch.tensor(3, dtype=torch.int64)
    leaves = [torch.ones(3)]
    assert fe.materialize(leaves, a, 2.0, b) == (a, 2.0, b)  # eager: the very same objects

    def f(count: torch.Tensor, lr: torch.Tensor) -> tuple[Any, ...]:
        c = count.to(torch.float64)
        return fe.materialize(leaves, (1 - 0.999**c) ** 0.5, 7.0, -(lr / (1 - 0.9**c)), count + 1)

    count, lr = torch.tensor(5), torch.tensor(1e-3, dtype=torch.float64)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)(count, lr)
    for got, want in zip(compiled, f(count, lr)):
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and torch.equal(got, want)
        else:
            assert got == want


def _has_pin_prim() -> bool:
    import torch._inductor.inductor_prims  # noqa: F401  (registers inductor's prims)

    return hasattr(torch.ops.prims, "inductor_force_stride_order")


@pytest.mark.skipif(not _has_pin_prim(), reason="this torch has no prim to pin a buffer")
def test_compiled_adam_computes_its_bias_corrections_once_per_call_not_per_element():
    """Inductor inlines scalar math into the kernels that use it; Adam's ``pow`` for the bias
    corrections must stay in one small kernel instead of running for every vector of params."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    state = fl.TrainState.create(sc.make_mlp(), flo.adamw(1e-3, weight_decay=0.01), seed=0)
    fast = fl.compile(fl.train_step(sc.loss_fn))
    _, codes = run_and_get_code(fast, state, sc.make_batches(1, size=16)[0])
    sources = re.findall(r"r'''(.*?)'''", "\n".join(codes), re.S)  # the C++ kernels
    assert sources
    with_pow = [k for k in sources if "std::pow" in k]
    assert len(with_pow) == 1, f"{len(with_pow)} kernels compute pow"
    assert with_pow[0].count("std::pow") == 2  # beta1 ** count and beta2 ** count, once each
    torch._dynamo.reset()


def test_more_compiled_steps_than_dynamos_recompile_limit_in_one_process():
    """Dynamo keeps at most ``recompile_limit`` graphs per code object; every compiled step has a
    code object of its own, so a process may compile more steps than that."""
    limit = torch._dynamo.config.recompile_limit
    for i in range(limit + 2):
        model = torch.nn.Linear(2 + i, 1)
        state = fl.TrainState.create(model, flo.sgd(lr=0.1))
        step = fl.compile(fl.train_step(lambda m, b: m(b).square().mean()), backend="eager")
        new, _ = step(state, torch.ones(3, 2 + i))
        assert int(new.step) == 1
