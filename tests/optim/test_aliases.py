"""The optimizer aliases against ``torch.optim`` (foreach): parameters, optimizer state and
learning rate over 200 steps of a small MLP through ``fl.train_step``; the optax-style path
against the fused one; bad hyperparameters; purity."""

from __future__ import annotations

import functools
import sys
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as L

import fnloop.optim as flo
from fnloop.errors import ConfigError
from fnloop.optim.base import fused_apply


import optim_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)
O = torch.optim
STEPS = 200


class Case(NamedTuple):
    tx: Any  # () -> GradientTransformation
    torch_opt: Any  # params -> torch.optim.Optimizer
    scheduler: Any = None  # optimizer -> torch scheduler (stepped once per optimizer step)


WARMUP_COSINE = flo.warmup_cosine(1e-2, warmup_steps=20, decay_steps=STEPS, init_lr=1e-4)


def _wc_torch(o: O.Optimizer) -> Any:
    """``WARMUP_COSINE`` as torch schedulers."""
    warmup = L.LinearLR(o, start_factor=0.01, end_factor=1.0, total_iters=20)
    return L.SequentialLR(o, [warmup, L.CosineAnnealingLR(o, T_max=STEPS - 20)], milestones=[20])


TORCH = {flo.sgd: O.SGD, flo.adam: O.Adam, flo.adamw: O.AdamW, flo.rmsprop: O.RMSprop, flo.adagrad: O.Adagrad}


def same(alias: Any, **hyper: Any) -> Case:
    """An alias and its torch.optim counterpart with the same hyperparameters."""
    return Case(lambda: alias(**hyper), lambda p: TORCH[alias](p, foreach=True, **hyper))


# Constant learning rates: the arithmetic is the same op for op, so parameters are bitwise equal.
CONSTANT = {
    "sgd-plain": same(flo.sgd, lr=0.05),
    "sgd-weight_decay": same(flo.sgd, lr=0.05, weight_decay=1e-2),
    "sgd-momentum": same(flo.sgd, lr=0.05, momentum=0.9),
    "sgd-momentum-dampening": same(flo.sgd, lr=0.05, momentum=0.8, dampening=0.3),
    "sgd-nesterov-weight_decay": same(flo.sgd, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam-lr1e-2": same(flo.adam, lr=1e-2),
    "adam-betas-eps": same(flo.adam, lr=1e-2, betas=(0.8, 0.95), eps=1e-6),
    "adam-weight_decay": same(flo.adam, lr=1e-2, weight_decay=0.05),
    "adam-amsgrad": same(flo.adam, lr=1e-2, amsgrad=True),
    "adamw-lr1e-2": same(flo.adamw, lr=1e-2),
    "adamw-weight_decay0.1-amsgrad-betas": same(flo.adamw, lr=1e-2, weight_decay=0.1, amsgrad=True, betas=(0.85, 0.99)),
    "rmsprop-lr1e-3": same(flo.rmsprop, lr=1e-3),
    "rmsprop-alpha-eps-weight_decay": same(flo.rmsprop, lr=1e-3, alpha=0.9, eps=1e-5, weight_decay=1e-2),
    "rmsprop-momentum": same(flo.rmsprop, lr=1e-3, momentum=0.9),
    "rmsprop-centered": same(flo.rmsprop, lr=1e-3, centered=True),
    "rmsprop-centered-momentum": same(flo.rmsprop, lr=1e-3, centered=True, momentum=0.5),
    "adagrad-lr5e-2": same(flo.adagrad, lr=5e-2),
    "adagrad-lr_decay": same(flo.adagrad, lr=5e-2, lr_decay=1e-2),
    "adagrad-initial_accumulator-weight_decay-eps": same(
        flo.adagrad, lr=5e-2, initial_accumulator_value=0.1, weight_decay=1e-2, eps=1e-6
    ),
    "sgd-maximize-momentum-weight_decay": same(flo.sgd, lr=2e-3, momentum=0.9, weight_decay=1e-2, maximize=True),
    "sgd-maximize-dampening": same(flo.sgd, lr=2e-3, momentum=0.8, dampening=0.3, maximize=True),
    "sgd-tensor_lr-nesterov": same(flo.sgd, lr=torch.tensor(0.05), momentum=0.9, nesterov=True),
    "adam-maximize-weight_decay-amsgrad": same(flo.adam, lr=1e-2, weight_decay=0.05, amsgrad=True, maximize=True),
    "adamw-maximize-weight_decay": same(flo.adamw, lr=1e-2, weight_decay=0.1, maximize=True),
    # torch's foreach Adam takes a tensor lr only with capturable=True (CUDA): same value as a float
    "adam-tensor_lr": Case(lambda: flo.adam(lr=torch.tensor(1e-2)), lambda p: O.Adam(p, lr=torch.tensor(1e-2).item(), foreach=True)),
    "adamw-tensor_lr": Case(lambda: flo.adamw(lr=torch.tensor(1e-2)), lambda p: O.AdamW(p, lr=torch.tensor(1e-2).item(), foreach=True)),
    "rmsprop-maximize-centered-momentum-weight_decay": same(
        flo.rmsprop, lr=1e-3, centered=True, momentum=0.5, weight_decay=1e-2, maximize=True
    ),
    "rmsprop-tensor_lr-momentum": same(flo.rmsprop, lr=torch.tensor(1e-3), momentum=0.5),
    "adagrad-maximize-lr_decay": same(flo.adagrad, lr=5e-2, lr_decay=1e-2, maximize=True),
    "adagrad-tensor_lr-lr_decay-weight_decay": same(flo.adagrad, lr=torch.tensor(5e-2), lr_decay=1e-2, weight_decay=1e-2),
}

# Schedules against torch's schedulers stepped after every optimizer step. torch's chainable
# schedulers compute the LR recursively, fnloop's in closed form: the LRs agree to ~1e-15.
SCHEDULED = {
    "sgd-momentum-step_lr": Case(
        lambda: flo.sgd(lr=flo.step_lr(0.05, 30, gamma=0.5), momentum=0.9),
        lambda p: O.SGD(p, lr=0.05, momentum=0.9, foreach=True),
        lambda o: L.StepLR(o, 30, gamma=0.5),
    ),
    "adam-step_lr-every-step": Case(
        lambda: flo.adam(lr=flo.step_lr(1e-2, 1, gamma=0.99)),
        lambda p: O.Adam(p, lr=1e-2, foreach=True),
        lambda o: L.StepLR(o, 1, gamma=0.99),
    ),
    "adamw-warmup_cosine": Case(
        lambda: flo.adamw(lr=WARMUP_COSINE, weight_decay=0.05),
        lambda p: O.AdamW(p, lr=1e-2, weight_decay=0.05, foreach=True),
        _wc_torch,
    ),
    "rmsprop-exponential": Case(
        lambda: flo.rmsprop(lr=flo.exponential(1e-3, 0.99), momentum=0.9),
        lambda p: O.RMSprop(p, lr=1e-3, momentum=0.9, foreach=True),
        lambda o: L.ExponentialLR(o, 0.99),
    ),
    "adagrad-multistep": Case(
        lambda: flo.adagrad(lr=flo.multistep(5e-2, [50, 120], gamma=0.3), lr_decay=1e-3),
        lambda p: O.Adagrad(p, lr=5e-2, lr_decay=1e-3, foreach=True),
        lambda o: L.MultiStepLR(o, [50, 120], gamma=0.3),
    ),
}

# Every alias with all of torch's defaults (``torch.optim.X(params, foreach=True)``).
DEFAULTS = {alias.__name__: same(alias) for alias in TORCH}

ALL = {**CONSTANT, **SCHEDULED, **{f"{k}-defaults": v for k, v in DEFAULTS.items()}}

# fnloop state type -> its fields -> torch.optim per-parameter state key.
STATE_KEYS = {
    flo.TraceState: {"trace": "momentum_buffer"},
    flo.ScaleByAdamState: {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"},
    flo.ScaleByRmsState: {"square_avg": "square_avg", "grad_avg": "grad_avg"},
    flo.ScaleByRssState: {"sum": "sum"},
}


@functools.cache
def runs(case_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(torch reference run, fnloop run)`` of a case, computed once per test session."""
    case = ALL[case_id]
    module, batches = sc.make_mlp(0), sc.make_batches()
    ref = sc.torch_run(module, case.torch_opt, batches, STEPS, make_scheduler=case.scheduler)
    got = sc.fnloop_run(module, case.tx(), batches, STEPS)
    return ref, got


@pytest.mark.parametrize("case_id", list(ALL))
def test_params_match_torch_optim(case_id: str) -> None:
    ref, got = runs(case_id)
    sc.assert_dicts_close(got["params"], ref["params"])
    start = dict(sc.make_mlp(0).named_parameters())
    assert all(not torch.equal(got["params"][k], start[k]) for k in start), "the run did not train every parameter"


@pytest.mark.parametrize("case_id", [*CONSTANT, *(f"{k}-defaults" for k in DEFAULTS)])
def test_params_bitwise_equal_torch_optim(case_id: str) -> None:
    ref, got = runs(case_id)
    sc.assert_dicts_equal(got["params"], ref["params"])


@pytest.mark.parametrize("case_id", list(ALL))
def test_optimizer_state_matches_torch_optim(case_id: str) -> None:
    ref, got = runs(case_id)
    parts = got["opt_state"]  # the chain's states, one per transform
    counts = [s.count for s in parts if "count" in s._fields and s.count is not None]
    assert counts and all(int(c) == STEPS for c in counts)
    present = [(s, field, key) for s in parts for field, key in STATE_KEYS.get(type(s), {}).items() if getattr(s, field) is not None]
    for name, torch_state in ref["state"].items():
        assert set(torch_state) - {"step"} == {key for _, _, key in present}, f"{name}: state entries differ"
        if "step" in torch_state:
            assert float(torch_state["step"]) == STEPS
        for s, field, key in present:
            mine, theirs = getattr(s, field)[name], torch_state[key]
            where = f"{name}.{field}"
            torch.testing.assert_close(mine, theirs, rtol=sc.RTOL, atol=sc.ATOL, msg=lambda m, w=where: f"{w}: {m}")


@pytest.mark.parametrize("case_id", list(SCHEDULED))
def test_learning_rate_follows_torch_scheduler(case_id: str) -> None:
    ref, got = runs(case_id)
    case = ALL[case_id]
    tx = case.tx()
    opt = case.torch_opt([torch.nn.Parameter(torch.zeros(1))])
    case.scheduler(opt)
    initial = float(flo.learning_rate(tx.init({"w": torch.zeros(1)})))
    assert initial == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert len(got["lrs"]) == len(ref["lrs"]) == STEPS
    for k, (mine, theirs) in enumerate(zip(got["lrs"], ref["lrs"])):
        assert mine == pytest.approx(theirs, rel=1e-12, abs=1e-18), f"after step {k + 1}: {mine} != {theirs}"
    assert len(set(ref["lrs"])) > 2, "the schedule never changed the learning rate"


@pytest.mark.parametrize("case_id", list(CONSTANT))
def test_learning_rate_is_constant_without_schedule(case_id: str) -> None:
    _, got = runs(case_id)
    opt = ALL[case_id].torch_opt([torch.nn.Parameter(torch.zeros(1))])
    assert set(got["lrs"]) == {float(opt.param_groups[0]["lr"])}  # a tensor lr reads as its value


def _direct(case_id: str) -> tuple[Any, list[Any], Any, Any, dict[str, torch.Tensor]]:
    """``(grads_of, batches, tx, its fused apply, start params)`` to call a case's transform directly."""
    module, batches = sc.make_mlp(0), sc.make_batches()
    tx = ALL[case_id].tx()
    start = {k: v.detach().clone() for k, v in module.named_parameters()}
    return sc.grad_fn(module), batches, tx, fused_apply(tx), start


@pytest.mark.parametrize("case_id", list(ALL))
def test_update_then_apply_updates_matches_fused(case_id: str) -> None:
    """``tx.update`` + ``flo.apply_updates`` (optax style) against ``fused_apply`` over 50 steps."""
    grads_of, batches, tx, apply, start = _direct(case_id)
    p_fused, s_fused = start, tx.init(start)
    p_optax, s_optax = start, tx.init(start)
    for k in range(50):
        batch = batches[k % len(batches)]
        p_fused, s_fused = apply(grads_of(p_fused, batch), s_fused, p_fused)
        updates, s_optax = tx.update(grads_of(p_optax, batch), s_optax, p_optax)
        p_optax = flo.apply_updates(p_optax, updates)
    sc.assert_dicts_close(p_optax, p_fused)
    # The states are driven by gradients taken at slightly different params; ratios such as
    # RMSprop's g / sqrt(square_avg) amplify that rounding, hence a looser bound on the state.
    for a, b in zip(sc.tensor_leaves(s_optax), sc.tensor_leaves(s_fused)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case_id", list(CONSTANT))
def test_donated_fused_apply_is_bitwise_the_pure_one(case_id: str) -> None:
    """In place into a donated state (gradients consumed) against out of place, over 10 steps."""
    grads_of, batches, tx, apply, p_pure = _direct(case_id)
    s_pure = tx.init(p_pure)
    p_don, s_don = {k: v.clone() for k, v in p_pure.items()}, tx.init(p_pure)
    for k in range(10):
        grads = grads_of(p_pure, batches[k % len(batches)])
        p_pure, s_pure = apply(grads, s_pure, p_pure)
        p_don, s_don = apply(dict(grads), s_don, p_don, donate=True, consume=True)
    sc.assert_dicts_equal(p_don, p_pure)
    for a, b in zip(sc.tensor_leaves(s_don), sc.tensor_leaves(s_pure)):
        assert torch.equal(a, b)


def test_update_returns_the_fused_step_as_a_difference() -> None:
    """One step from the same inputs: ``params + updates`` equals the fused new params."""
    module, batches = sc.make_mlp(0), sc.make_batches()
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    grads = sc.grad_fn(module)(params, batches[0])
    for case_id in ALL:
        tx = ALL[case_id].tx()
        state = tx.init(params)
        new_params, _ = fused_apply(tx)(grads, state, params)
        updates, _ = tx.update(grads, state, params)
        sc.assert_dicts_close(flo.apply_updates(params, updates), new_params)


# --- bad input ---------------------------------------------------------------------------------

BAD = {
    "sgd-negative-lr": (lambda: flo.sgd(lr=-0.1), "lr"),
    "adam-nan-lr": (lambda: flo.adam(lr=float("nan")), "lr"),
    "adamw-string-lr": (lambda: flo.adamw(lr="0.1"), "lr"),
    "rmsprop-inf-lr": (lambda: flo.rmsprop(lr=float("inf")), "lr"),
    "adagrad-negative-lr": (lambda: flo.adagrad(lr=-1e-2), "lr"),
    "adam-beta1-one": (lambda: flo.adam(betas=(1.0, 0.999)), "betas[0]"),
    "adam-beta1-negative": (lambda: flo.adam(betas=(-0.1, 0.999)), "betas[0]"),
    "adamw-beta2-above-one": (lambda: flo.adamw(betas=(0.9, 1.5)), "betas[1]"),
    "sgd-nesterov-without-momentum": (lambda: flo.sgd(lr=0.1, nesterov=True), "nesterov"),
    "sgd-nesterov-with-dampening": (lambda: flo.sgd(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "dampening"),
    "sgd-negative-momentum": (lambda: flo.sgd(lr=0.1, momentum=-0.9), "momentum"),
    "sgd-negative-dampening": (lambda: flo.sgd(lr=0.1, momentum=0.9, dampening=-0.1), "dampening"),
    "sgd-negative-weight_decay": (lambda: flo.sgd(lr=0.1, weight_decay=-1e-4), "weight_decay"),
    "adam-negative-weight_decay": (lambda: flo.adam(weight_decay=-1e-2), "weight_decay"),
    "adamw-negative-weight_decay": (lambda: flo.adamw(weight_decay=-1e-2), "weight_decay"),
    "adam-negative-eps": (lambda: flo.adam(eps=-1e-8), "eps"),
    "rmsprop-negative-alpha": (lambda: flo.rmsprop(alpha=-0.5), "alpha"),
    "rmsprop-negative-momentum": (lambda: flo.rmsprop(momentum=-0.5), "momentum"),
    "rmsprop-negative-weight_decay": (lambda: flo.rmsprop(weight_decay=-1.0), "weight_decay"),
    "adagrad-negative-lr_decay": (lambda: flo.adagrad(lr_decay=-1e-3), "lr_decay"),
    "adagrad-negative-initial_accumulator_value": (
        lambda: flo.adagrad(initial_accumulator_value=-0.1),
        "initial_accumulator_value",
    ),
    "adagrad-negative-weight_decay": (lambda: flo.adagrad(weight_decay=-0.1), "weight_decay"),
    "schedule-negative-count": (lambda: flo.step_lr(0.1, 10)(-1), "count"),
    "warmup_cosine-negative-count": (lambda: flo.warmup_cosine(0.1, warmup_steps=2, decay_steps=10)(-3), "count"),
    "learning_rate-without-lr": (lambda: flo.learning_rate(flo.clip(1.0).init({"w": torch.ones(1)})), "lr"),
    "learning_rate-of-chain-without-lr": (
        lambda: flo.learning_rate(flo.chain(flo.clip_by_global_norm(1.0), flo.ema(0.9)).init({"w": torch.ones(1)})),
        "lr",
    ),
}


@pytest.mark.parametrize(("make", "argument"), list(BAD.values()), ids=list(BAD))
def test_bad_input_raises_config_error_naming_the_argument(make: Any, argument: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert argument in str(info.value)


# --- purity --------------------------------------------------------------------------------------

PURITY = [
    "sgd-nesterov-weight_decay",
    "sgd-momentum-dampening",
    "adam-amsgrad",
    "adamw-weight_decay0.1-amsgrad-betas",
    "adamw-warmup_cosine",
    "rmsprop-centered-momentum",
    "adagrad-initial_accumulator-weight_decay-eps",
    "adagrad-multistep",
]


def _tree(seed: int, shapes: list[tuple[int, ...]], scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": scale * torch.randn(shape, generator=g) for i, shape in enumerate(shapes)}


shapes_st = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


@pytest.mark.parametrize("case_id", PURITY)
@settings(max_examples=8, deadline=None)
@given(shapes=shapes_st, seed=st.integers(0, 2**16))
def test_update_and_fused_apply_never_mutate_inputs(case_id: str, shapes: list[tuple[int, ...]], seed: int) -> None:
    tx = ALL[case_id].tx()
    params = _tree(seed, shapes)
    state = tx.init(params)
    for k in range(3):  # the first steps take special branches (momentum buffer copy, bias correction)
        grads = _tree(seed + 1000 + k, shapes)
        snap = sc.snapshot(grads, params, state)
        updates, _ = tx.update(grads, state, params)
        sc.assert_unchanged(snap)
        new_params, new_state = fused_apply(tx)(grads, state, params)
        sc.assert_unchanged(snap)
        sc.assert_dicts_close(flo.apply_updates(params, updates), new_params)
        params, state = new_params, new_state
