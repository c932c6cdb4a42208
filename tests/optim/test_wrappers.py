"""Wrappers: ``multi_steps`` against one step on the whole batch, ``apply_if_finite`` against
the inner optimizer run on the finite gradients only (and without host reads), ``ema`` against a
hand-written moving average; bad input; purity."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import ConfigError
from fnloop.optim.base import fused_apply


import optim_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sc.make_mlp(seed).named_parameters()}


def _grads(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}


# --- multi_steps -------------------------------------------------------------------------------

ACCUMULATE = {
    "sgd-k2": (lambda: flo.sgd(lr=0.1), 2),
    "sgd-momentum-nesterov-k4": (lambda: flo.sgd(lr=0.1, momentum=0.9, nesterov=True), 4),
    "adam-k3": (lambda: flo.adam(lr=1e-2), 3),
    "adamw-step_lr-k4": (lambda: flo.adamw(lr=flo.step_lr(1e-2, 2, gamma=0.5), weight_decay=0.1), 4),
}
MICRO = 4  # micro-batch size
CYCLES = 6  # accumulation cycles (optimizer steps)


@pytest.mark.parametrize(("make", "k"), list(ACCUMULATE.values()), ids=list(ACCUMULATE))
def test_multi_steps_equals_one_step_on_the_whole_batch(make: Any, k: int) -> None:
    module = sc.make_mlp(0)
    big = sc.make_batches(n=3, size=k * MICRO)
    step = fl.train_step(sc.mse)
    whole = fl.TrainState.create(module, make())
    accumulated = fl.TrainState.create(module, flo.multi_steps(make(), k))
    assert float(flo.learning_rate(accumulated.opt_state)) == float(flo.learning_rate(whole.opt_state))
    for cycle in range(CYCLES):
        x, y = big[cycle % len(big)]
        for i in range(k):
            before = accumulated.params
            accumulated, _ = step(accumulated, (x[i * MICRO : (i + 1) * MICRO], y[i * MICRO : (i + 1) * MICRO]))
            if i < k - 1:
                sc.assert_dicts_equal(accumulated.params, before)
                assert int(accumulated.opt_state.mini_step) == i + 1
        whole, _ = step(whole, (x, y))
        sc.assert_dicts_close(accumulated.params, whole.params, rtol=1e-6, atol=1e-6)
        assert not any(torch.equal(accumulated.params[n], before[n]) for n in before), "the last micro-batch is a step"
        assert int(accumulated.opt_state.mini_step) == 0
        assert int(accumulated.opt_state.gradient_step) == cycle + 1
        assert int(accumulated.step) == (cycle + 1) * k
        assert float(flo.learning_rate(accumulated.opt_state)) == float(flo.learning_rate(whole.opt_state))


def test_multi_steps_learning_rate_follows_the_inner_schedule() -> None:
    tx = flo.multi_steps(flo.sgd(lr=flo.step_lr(0.1, 1, gamma=0.5)), 3)
    params = _params()
    state = tx.init(params)
    seen = []
    for i in range(9):
        params, state = fused_apply(tx)(_grads(params, i), state, params)
        seen.append(float(flo.learning_rate(state)))
    assert seen == [0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.0125]


def test_multi_steps_update_is_zero_between_emissions() -> None:
    inner = flo.adam(lr=1e-2)
    tx = flo.multi_steps(inner, 3)
    params = _params()
    state, inner_state = tx.init(params), inner.init(params)
    grads = [_grads(params, i) for i in range(3)]
    for g in grads[:2]:
        updates, state = tx.update(g, state, params)
        assert all(not u.any() for u in updates.values())
    updates, state = tx.update(grads[2], state, params)
    mean = {n: (grads[0][n] + grads[1][n] + grads[2][n]) / 3 for n in params}
    want, _ = inner.update(mean, inner_state, params)
    sc.assert_dicts_close(updates, want)


def test_multi_steps_every_1_is_the_inner_transform() -> None:
    inner = flo.rmsprop(lr=1e-2, momentum=0.9)
    tx = flo.multi_steps(inner, 1)
    p1 = p2 = _params()
    s1, s2 = tx.init(p1), inner.init(p2)
    for i in range(5):
        g = _grads(p1, i)
        p1, s1 = fused_apply(tx)(g, s1, p1)
        p2, s2 = fused_apply(inner)(g, s2, p2)
    sc.assert_dicts_equal(p1, p2)
    assert int(s1.gradient_step) == 5


# --- apply_if_finite -----------------------------------------------------------------------------


def _poison(g: dict[str, torch.Tensor], name: str, value: float) -> dict[str, torch.Tensor]:
    out = dict(g)
    bad = out[name].clone()
    bad.view(-1)[0] = value
    out[name] = bad
    return out


FINITE_INNER = {
    "adam": lambda: flo.adam(lr=1e-2),
    "sgd-momentum-dampening": lambda: flo.sgd(lr=0.1, momentum=0.9, dampening=0.5),
    "chain-clip-adamw": lambda: flo.chain(flo.clip_by_global_norm(1.0), flo.adamw(lr=1e-2)),
    "rmsprop-centered": lambda: flo.rmsprop(lr=1e-2, centered=True),
}


@pytest.mark.parametrize("path", ["fused", "update"])
@pytest.mark.parametrize("make", list(FINITE_INNER.values()), ids=list(FINITE_INNER))
def test_apply_if_finite_skips_non_finite_updates(make: Any, path: str) -> None:
    inner = make()
    tx = flo.apply_if_finite(inner)
    params = ref_params = _params()
    state, ref_state = tx.init(params), inner.init(params)
    grads = [_grads(params, i) for i in range(4)]
    # (gradients, finite?, expected notfinite_count, expected total_notfinite)
    sequence = [
        (grads[0], True, 0, 0),
        (_poison(grads[1], "2.weight", float("nan")), False, 1, 1),
        (_poison(grads[1], "4.bias", float("inf")), False, 2, 2),
        (_poison(grads[1], "0.weight", float("-inf")), False, 3, 3),
        (grads[2], True, 0, 3),
        (_poison(grads[3], "0.bias", float("nan")), False, 1, 4),
        (grads[3], True, 0, 4),
    ]
    for k, (g, finite, count, total) in enumerate(sequence):
        old_params, old_inner = params, state.inner_state
        if path == "fused":
            params, state = fused_apply(tx)(g, state, params)
        else:
            updates, state = tx.update(g, state, params)
            params = flo.apply_updates(params, updates)
        assert int(state.notfinite_count) == count, f"call {k}"
        assert int(state.total_notfinite) == total, f"call {k}"
        assert bool(state.last_finite) == finite, f"call {k}"
        if finite:
            ref_params, ref_state = fused_apply(inner)(g, ref_state, ref_params)
            sc.assert_dicts_close(params, ref_params)
        else:
            sc.assert_dicts_equal(params, old_params)
            for a, b in zip(sc.tensor_leaves(state.inner_state), sc.tensor_leaves(old_inner)):
                assert torch.equal(a, b), f"call {k}: the inner state changed on a skipped update"
        assert all(torch.isfinite(p).all() for p in params.values())
    if path == "fused":
        sc.assert_dicts_equal(params, ref_params)
    for a, b in zip(sc.tensor_leaves(state.inner_state), sc.tensor_leaves(ref_state)):
        assert torch.equal(a, b)
    assert float(flo.learning_rate(state)) == float(flo.learning_rate(ref_state))


def test_apply_if_finite_through_train_step_skips_a_nan_batch() -> None:
    module, batches = sc.make_mlp(0), sc.make_batches()
    nan_x = batches[1][0].clone()
    nan_x[3, 2] = float("nan")
    poisoned = [batches[0], (nan_x, batches[1][1]), batches[2], batches[3]]
    tx = flo.apply_if_finite(flo.adamw(lr=1e-2, weight_decay=0.05))
    step = fl.train_step(sc.mse)
    state = fl.TrainState.create(module, tx)
    for k in range(12):
        state, metrics = step(state, poisoned[k % 4])
        assert torch.isnan(metrics["loss"]) == (k % 4 == 1)
    finite_only = [b for k in range(12) for b in [poisoned[k % 4]] if k % 4 != 1]
    ref = sc.fnloop_run(module, flo.adamw(lr=1e-2, weight_decay=0.05), finite_only, len(finite_only))
    sc.assert_dicts_equal(state.params, ref["params"])
    assert int(state.opt_state.total_notfinite) == 3
    assert int(state.opt_state.inner_state[0].count) == 9


@pytest.mark.parametrize("path", ["fused", "update"])
@pytest.mark.parametrize("make", list(FINITE_INNER.values()), ids=list(FINITE_INNER))
def test_apply_if_finite_reads_nothing_back_to_the_host(make: Any, path: str) -> None:
    """Only integer 0-d CPU counters and the state's own host-side learning rate may be read."""
    tx = flo.apply_if_finite(make())
    params = _params()
    state = tx.init(params)
    for k, g in enumerate([_grads(params, 0), _poison(_grads(params, 1), "2.bias", float("nan")), _grads(params, 2)]):
        with sc.no_host_reads(allowed=sc.lr_tensors(state)) as reads:
            if path == "fused":
                params, state = fused_apply(tx)(g, state, params)
            else:
                updates, state = tx.update(g, state, params)
                params = flo.apply_updates(params, updates)
        assert reads, "the optimizer reads its learning rate and counter: the guard saw no read at all"
        assert bool(state.last_finite) == (k != 1)


def test_apply_if_finite_keeps_the_learning_rate_readable() -> None:
    tx = flo.apply_if_finite(flo.sgd(lr=flo.step_lr(0.1, 1, gamma=0.5)))
    params = _params()
    state = tx.init(params)
    for g in [_grads(params, 0), _poison(_grads(params, 1), "0.bias", float("nan")), _grads(params, 2)]:
        params, state = fused_apply(tx)(g, state, params)
    assert float(flo.learning_rate(state)) == 0.025  # two finite updates


# --- ema ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("debias", [True, False], ids=["debias", "no-debias"])
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999])
def test_ema_matches_hand_written_moving_average(decay: float, debias: bool) -> None:
    params = _params()
    tx = flo.ema(decay, debias=debias)
    state = tx.init(params)
    avg = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for t in range(1, 13):
        u = _grads(params, t)
        out, state = tx.update(u, state, params)
        avg = {n: decay * avg[n] + (1 - decay) * u[n].double() for n in params}
        want = {n: (a / (1 - decay**t) if debias else a).float() for n, a in avg.items()}
        sc.assert_dicts_close(out, want, rtol=1e-5, atol=1e-6)
        assert int(state.count) == t
    if decay == 0.0:
        sc.assert_dicts_equal(out, u)


def test_ema_in_a_chain_averages_the_gradients() -> None:
    params = _params()
    tx = flo.chain(flo.ema(0.9), flo.sgd(lr=0.5))
    state = tx.init(params)
    avg = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in range(1, 6):
        g = _grads(params, t)
        new_params, state = fused_apply(tx)(g, state, params)
        avg = {n: 0.9 * avg[n] + 0.1 * g[n] for n in params}
        sc.assert_dicts_close(new_params, {n: params[n] - 0.5 * avg[n] / (1 - 0.9**t) for n in params})
        params = new_params


# --- bad input ----------------------------------------------------------------------------------

BAD = {
    "multi_steps-every_k-0": (lambda: flo.multi_steps(flo.sgd(lr=0.1), 0), "every_k"),
    "multi_steps-every_k-negative": (lambda: flo.multi_steps(flo.sgd(lr=0.1), -2), "every_k"),
    "multi_steps-every_k-float": (lambda: flo.multi_steps(flo.sgd(lr=0.1), 2.0), "every_k"),
    "multi_steps-every_k-bool": (lambda: flo.multi_steps(flo.sgd(lr=0.1), True), "every_k"),
    "ema-decay-above-one": (lambda: flo.ema(1.5), "decay"),
    "ema-decay-negative": (lambda: flo.ema(-0.1), "decay"),
}


@pytest.mark.parametrize(("make", "argument"), list(BAD.values()), ids=list(BAD))
def test_bad_input_raises_config_error_naming_the_argument(make: Any, argument: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert argument in str(info.value)


# --- purity --------------------------------------------------------------------------------------

PURITY = {
    "multi_steps-adam": lambda: flo.multi_steps(flo.adam(lr=1e-2), 2),
    "multi_steps-apply_if_finite-adamw": lambda: flo.multi_steps(flo.apply_if_finite(flo.adamw(lr=1e-2)), 2),
    "apply_if_finite-sgd-momentum": lambda: flo.apply_if_finite(flo.sgd(lr=0.1, momentum=0.9)),
    "ema": lambda: flo.ema(0.9),
    "chain-ema-rmsprop": lambda: flo.chain(flo.ema(0.5), flo.rmsprop(lr=1e-2, momentum=0.5)),
}

shapes_st = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


@pytest.mark.parametrize("make", list(PURITY.values()), ids=list(PURITY))
@settings(max_examples=8, deadline=None)
@given(shapes=shapes_st, seed=st.integers(0, 2**16), nan_at=st.integers(0, 3))
def test_wrappers_never_mutate_inputs(make: Any, shapes: list[tuple[int, ...]], seed: int, nan_at: int) -> None:
    tx = make()
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    state = tx.init(params)
    for k in range(4):
        g = {n: torch.randn(v.shape, generator=gen) for n, v in params.items()}
        if k == nan_at:
            g = _poison(g, "p0", float("nan"))
        snap = sc.snapshot(g, params, state)
        updates, _ = tx.update(g, state, params)
        sc.assert_unchanged(snap)
        new_params, state = fused_apply(tx)(g, state, params)
        sc.assert_unchanged(snap)
        sc.assert_dicts_close(flo.apply_updates(params, updates), new_params, equal_nan=True)
        params = new_params


# --- consumed gradients ------------------------------------------------------------------------

CONSUMERS = {  # name: (transform, whether the caller's dict itself ends up emptied)
    "adamw": (lambda: flo.adamw(lr=1e-2, weight_decay=0.1), True),
    "adam-amsgrad": (lambda: flo.adam(lr=1e-2, amsgrad=True), True),
    "chain-clip-adamw": (lambda: flo.chain(flo.clip_by_global_norm(0.5), flo.adamw(lr=1e-2)), False),  # clip's new dict is
    "apply_if_finite-sgd": (lambda: flo.apply_if_finite(flo.sgd(lr=0.1, momentum=0.9)), True),
    "multi_steps-1-adam": (lambda: flo.multi_steps(flo.adam(lr=1e-2), every_k=1), True),
}


@pytest.mark.parametrize("make, emptied", CONSUMERS.values(), ids=CONSUMERS.keys())
def test_consumed_gradients_give_the_same_update_and_plain_calls_leave_them_alone(make, emptied):
    """``consume=True`` (a train step giving up its own gradient dict) lets the optimizer empty
    that dict; the update is bitwise the same, and a call without it never touches the caller's
    gradients."""
    tx = make()
    params = _params()
    state = tx.init(params)
    grads = _grads(params, 1)
    kept = {k: v.clone() for k, v in grads.items()}
    plain = fused_apply(tx)(grads, state, params)
    assert grads.keys() == kept.keys() and all(torch.equal(grads[k], kept[k]) for k in kept)
    given = {k: v.clone() for k, v in grads.items()}
    consumed = fused_apply(tx)(given, state, params, consume=True)
    fl.testing.assert_trees_equal(consumed, plain)
    assert (given == {}) == emptied
