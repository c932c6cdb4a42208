"""Injected hyperparameters (``flo.inject_hyperparams``): one member against ``torch.optim`` and
against the plain alias (bitwise in eager mode), structure at zero values, the optax-style update
path, compiled steps (float64 tensors: to float32 rounding), ``set_hyperparams`` and errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import ConfigError, TreeMismatchError

import optim_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

O = torch.optim
STEPS = 60
TORCH = {flo.sgd: O.SGD, flo.adam: O.Adam, flo.adamw: O.AdamW, flo.rmsprop: O.RMSprop, flo.adagrad: O.Adagrad}

# alias, its arguments (all injected where numeric)
CASES = {
    "adamw": (flo.adamw, {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.85, 0.99), "eps": 1e-6}),
    "adamw-amsgrad": (flo.adamw, {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}),
    "adam-maximize": (flo.adam, {"lr": 1e-2, "weight_decay": 0.05, "maximize": True}),
    "sgd-momentum": (flo.sgd, {"lr": 0.05, "momentum": 0.9}),
    "sgd-nesterov-weight_decay": (flo.sgd, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "sgd-dampening": (flo.sgd, {"lr": 0.05, "momentum": 0.8, "dampening": 0.3}),
    "rmsprop-centered-momentum": (flo.rmsprop, {"lr": 1e-3, "alpha": 0.9, "momentum": 0.5, "centered": True, "weight_decay": 1e-2}),
    "adagrad-lr_decay": (flo.adagrad, {"lr": 5e-2, "lr_decay": 1e-2, "weight_decay": 1e-2, "eps": 1e-6}),
}


def _run(tx: flo.GradientTransformation, steps: int = STEPS, step: Any = None) -> fl.TrainState:
    state = fl.TrainState.create(sc.make_mlp(0), tx, seed=0)
    step = step or fl.train_step(sc.mse)
    for k, batch in zip(range(steps), sc.make_batches() * steps):
        state, _ = step(state, batch)
    return state


@pytest.mark.parametrize("case", CASES)
def test_one_member_is_torch_optim_bitwise(case):
    alias, kwargs = CASES[case]
    ref = sc.torch_run(sc.make_mlp(0), lambda p: TORCH[alias](p, foreach=True, **kwargs), sc.make_batches(), STEPS)
    got = _run(flo.inject_hyperparams(alias)(**kwargs))
    sc.assert_dicts_equal(got.params, ref["params"])
    assert set(flo.hyperparams(got.opt_state)) >= {"lr"}


@pytest.mark.parametrize(
    "schedule",
    [
        flo.warmup_cosine(1e-2, warmup_steps=10, decay_steps=STEPS, init_lr=1e-4),
        flo.step_lr(0.05, 20, gamma=0.5),
        flo.exponential(1e-2, 0.97),
        flo.linear(1e-2, 1e-3, 30),
        flo.one_cycle(1e-2, STEPS),
    ],
    ids=repr,
)
def test_injected_schedule_is_the_plain_schedule_bitwise(schedule):
    plain = _run(flo.adamw(lr=schedule, weight_decay=0.05))
    injected = _run(flo.inject_hyperparams(flo.adamw)(lr=schedule, weight_decay=0.05))
    sc.assert_dicts_equal(injected.params, plain.params)
    assert float(flo.learning_rate(injected.opt_state)) == float(flo.learning_rate(plain.opt_state))
    assert all(k.startswith("lr.") or k == "weight_decay" for k in flo.hyperparams(injected.opt_state))


@pytest.mark.parametrize(
    "alias, name, exact",
    [(flo.sgd, "momentum", True), (flo.sgd, "weight_decay", True), (flo.adamw, "weight_decay", True), (flo.rmsprop, "momentum", False)],
)
def test_zero_value_keeps_its_part_and_its_plain_numbers(alias, name, exact):
    """An injected 0.0 keeps the part it switches (so it stacks with 0.9) and computes what the
    plain optimizer without that part computes (RMSprop's momentum buffer at 0 divides before it
    scales by the learning rate: equal to rounding)."""
    zero = flo.inject_hyperparams(alias)(lr=1e-3, **{name: 0.0})
    nonzero = flo.inject_hyperparams(alias)(lr=1e-3, **{name: 0.9})
    params = dict(sc.make_mlp(0).named_parameters())
    assert fl.tree_structure(zero.init(params)) == fl.tree_structure(nonzero.init(params))
    got, want = _run(zero, 20).params, _run(alias(lr=1e-3, **{name: 0.0}), 20).params
    if exact:
        sc.assert_dicts_equal(got, want)
    else:
        sc.assert_dicts_close(got, want, rtol=1e-5, atol=1e-6)


def test_update_path_matches_the_fused_path():
    tx = flo.inject_hyperparams(flo.adamw)(lr=1e-2, weight_decay=0.1)
    params = {k: v.detach() for k, v in sc.make_mlp(0).named_parameters()}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = tx.init(params)
    updates, s1 = tx.update(grads, state, params)
    new, s2 = flo.fused_apply(tx)(grads, state, params)
    sc.assert_dicts_close(flo.apply_updates(params, updates), new, rtol=0, atol=1e-7)
    fl.testing.assert_trees_equal(s1, s2)


def test_pure_and_no_rebuild_of_the_caller_state():
    tx = flo.inject_hyperparams(flo.sgd)(lr=0.1, momentum=0.9)
    state = fl.TrainState.create(sc.make_mlp(0), tx)
    snap = sc.snapshot(state.params, state.opt_state)
    fl.train_step(sc.mse)(state, sc.make_batches()[0])
    sc.assert_unchanged(snap)


def test_set_hyperparams_takes_effect_at_the_next_update():
    batches = sc.make_batches()
    step = fl.train_step(sc.mse)
    injected = fl.TrainState.create(sc.make_mlp(0), flo.inject_hyperparams(flo.sgd)(lr=0.1, momentum=0.9))
    injected = injected.replace(opt_state=flo.set_hyperparams(injected.opt_state, lr=0.02, momentum=0.5))
    plain = fl.TrainState.create(sc.make_mlp(0), flo.sgd(lr=0.02, momentum=0.5))
    for batch in batches:
        injected, _ = step(injected, batch)
        plain, _ = step(plain, batch)
    sc.assert_dicts_equal(injected.params, plain.params)
    assert float(flo.learning_rate(injected.opt_state)) == 0.02


def test_compiled_member_matches_eager_and_compiles_once():
    torch._dynamo.reset()
    counters.clear()
    tx = flo.inject_hyperparams(flo.adamw)(lr=flo.warmup_cosine(1e-2, warmup_steps=3, decay_steps=20), weight_decay=0.1, betas=(0.8, 0.99))
    eager_step = fl.train_step(sc.mse)
    fast = fl.compile(eager_step)
    eager = compiled = fl.TrainState.create(sc.make_mlp(0), tx)
    for k, batch in enumerate(sc.make_batches(6)):
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            compiled, _ = fast(compiled, batch)
        eager, _ = eager_step(eager, batch)
    assert counters["stats"]["unique_graphs"] == 1
    assert dict(counters["graph_break"]) == {}
    # float64 tensor hyperparameters vs Python numbers: float32 rounding
    sc.assert_dicts_close(compiled.params, eager.params, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def test_stack_of_plain_optimizers_names_the_hyperparameter_and_suggests_injection():
    module = torch.nn.Linear(2, 1)
    a = fl.TrainState.create(module, flo.sgd(lr=0.1, momentum=0.9))
    b = fl.TrainState.create(module, flo.sgd(lr=0.1, momentum=0.5))
    with pytest.raises(TreeMismatchError, match=r"hyperparameter 'momentum'.*inject_hyperparams"):
        fl.stack([a, b])
    c = fl.TrainState.create(module, flo.adamw(lr=1e-3, betas=(0.9, 0.99)))
    d = fl.TrainState.create(module, flo.adamw(lr=1e-3))
    with pytest.raises(TreeMismatchError, match=r"hyperparameter 'b2'.*inject_hyperparams"):
        fl.stack([c, d])


def test_stack_of_injected_optimizers_with_other_static_arguments_fails():
    module = torch.nn.Linear(2, 1)
    make = flo.inject_hyperparams(flo.adamw)
    with pytest.raises(TreeMismatchError, match=r"structure\.static\.amsgrad.*True vs False"):
        fl.stack([fl.TrainState.create(module, make(lr=0.1, amsgrad=True)), fl.TrainState.create(module, make(lr=0.1, amsgrad=False))])
    with pytest.raises(TreeMismatchError, match=r"structure\.injected"):
        fl.stack([fl.TrainState.create(module, make(lr=0.1, eps=1e-6)), fl.TrainState.create(module, make(lr=0.1))])
    ok = fl.stack([fl.TrainState.create(module, make(lr=lr, eps=eps)) for lr, eps in [(0.1, 1e-6), (0.2, 1e-8)]])
    assert flo.hyperparams(ok.opt_state)["eps"].tolist() == [1e-6, 1e-8]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": 0.1, "momentum": float("inf")}, "momentum"),
        ({"lr": 0.1, "nesterov": True}, "nesterov"),
    ],
)
def test_bad_values_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        flo.inject_hyperparams(flo.sgd)(**kwargs)


def test_set_hyperparams_rejects_unknown_names():
    state = flo.inject_hyperparams(flo.sgd)(lr=0.1).init({"w": torch.ones(1)})
    with pytest.raises(ConfigError, match="'momentum' is not injected"):
        flo.set_hyperparams(state, momentum=0.9)
    with pytest.raises(ConfigError, match="no injected"):
        flo.hyperparams(flo.sgd(lr=0.1).init({"w": torch.ones(1)}))


def test_static_args_stay_static():
    tx = flo.inject_hyperparams(flo.adamw, static_args=("eps",))(lr=1e-3, eps=1e-6)
    assert sorted(flo.hyperparams(tx.init({"w": torch.ones(1)}))) == ["lr"]
