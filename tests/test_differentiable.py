"""Steps are differentiable with respect to the state and the batch, with ``torch.func`` and with
plain autograd: a MAML meta-gradient through an inner ``train_step`` and an outer ``eval_step``
equals a hand-written second-order reference (float64), and differs from the first-order answer.
A donated (in-place) step refuses params that require grad; a compiled step either gives the
right gradients or says to use the uncompiled step, never silently wrong ones. When nothing
requires grad, a step builds no graph."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import fnloop as fl
import fnloop.optim as flo

LR = 0.1
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _model() -> torch.nn.Module:
    """``3-5-1`` tanh MLP in float64: curvature, so the second-order term matters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()


def _batch(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)


SUPPORT = _batch(1)
QUERY = _batch(2)
PLAIN = _model()  # the reference module, called functionally (built outside any transform)


def mse_loss(model: Any, batch: Any) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


INNER = fl.train_step(mse_loss)
OUTER = fl.eval_step(mse_loss)


def _state(tx: Any = None) -> fl.TrainState:
    return fl.TrainState.create(_model(), tx if tx is not None else flo.sgd(lr=LR), seed=1)


def _maml_loss(state: fl.TrainState, support: Any = SUPPORT, query: Any = QUERY) -> torch.Tensor:
    inner_state, _ = INNER(state, support)
    return OUTER(inner_state, query)["loss"]


def _functional_outer(params: dict[str, torch.Tensor], query: Any = QUERY) -> torch.Tensor:
    """The outer loss without fnloop: the plain module called functionally."""
    return F.mse_loss(torch.func.functional_call(PLAIN, params, (query[0],)), query[1])


def _reference(support: Any = SUPPORT, *, second_order: bool = True, wrt_batch: bool = False) -> list[torch.Tensor]:
    """Meta-gradient by hand: inner SGD step with ``create_graph`` (or detached, first order)."""
    model = PLAIN
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    x, y = support
    if wrt_batch:
        x = x.detach().clone().requires_grad_(True)
    inner = F.mse_loss(torch.func.functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=second_order)
    if not second_order:
        grads = [g.detach() for g in grads]
    adapted = {k: p - LR * g for (k, p), g in zip(params.items(), grads)}
    outer = _functional_outer(adapted)
    return list(torch.autograd.grad(outer, [x] if wrt_batch else list(params.values())))


def _close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOL)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_reference_tells_second_order_from_first_order():
    assert _max_diff(_reference(), _reference(second_order=False)) > 1e-4


# --- MAML meta-gradients w.r.t. the params ----------------------------------------------------


def _grad_torch_func(loss: Callable[[fl.TrainState], torch.Tensor], state: fl.TrainState) -> list[torch.Tensor]:
    grads = torch.func.grad(lambda p: loss(state.replace(params=p)))(dict(state.params))
    return [grads[k] for k in state.params]


def _grad_autograd(loss: Callable[[fl.TrainState], torch.Tensor], state: fl.TrainState) -> list[torch.Tensor]:
    params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    out = loss(state.replace(params=params))
    return list(torch.autograd.grad(out, list(params.values())))


GRADIENTS = {"torch.func.grad": _grad_torch_func, "autograd": _grad_autograd}
# the outer loss through fl.eval_step, and through a plain functional call (the train step alone)
OUTER_LOSSES: dict[str, Callable[[fl.TrainState], torch.Tensor]] = {
    "eval_step": _maml_loss,
    "functional": lambda s: _functional_outer(INNER(s, SUPPORT)[0].params),
}


@pytest.mark.parametrize("outer", sorted(OUTER_LOSSES))
@pytest.mark.parametrize("how", sorted(GRADIENTS))
def test_maml_meta_gradient_is_second_order(how, outer):
    got = GRADIENTS[how](OUTER_LOSSES[outer], _state())
    _close(got, _reference())
    assert _max_diff(got, _reference(second_order=False)) > 1e-4, "first-order answer: the inner gradient was detached"


@pytest.mark.parametrize("outer", ["eval_step", "functional"])
def test_maml_gradient_wrt_support_inputs(outer):
    state = _state()
    x = SUPPORT[0].detach().clone().requires_grad_(True)
    support = (x, SUPPORT[1])
    if outer == "eval_step":
        loss = _maml_loss(state, support)
    else:
        loss = _functional_outer(INNER(state, support)[0].params)
    (got,) = torch.autograd.grad(loss, [x])
    _close([got], _reference(wrt_batch=True))
    assert float(got.abs().max()) > 1e-6


def test_state_params_are_not_touched_by_differentiation():
    state = _state()
    before = {k: v.clone() for k, v in state.params.items()}
    _grad_autograd(OUTER_LOSSES["functional"], state)
    _grad_torch_func(OUTER_LOSSES["functional"], state)
    fl.testing.assert_trees_equal(state.params, before)


# --- eval_step alone is differentiable ----------------------------------------------------------


@pytest.mark.parametrize("how", sorted(GRADIENTS))
def test_eval_step_gives_the_true_gradient(how):
    state = _state()
    got = GRADIENTS[how](lambda s: OUTER(s, QUERY)["loss"], state)
    params = {k: v.detach().clone().requires_grad_() for k, v in state.params.items()}
    expected = list(torch.autograd.grad(_functional_outer(params), list(params.values())))
    _close(got, expected)
    assert all(float(g.abs().max()) > 0 for g in got), "zero gradient: eval_step cut the graph"


# --- Adam inner optimizer: autograd and torch.func agree --------------------------------------


@pytest.mark.parametrize("outer", sorted(OUTER_LOSSES))
def test_adam_inner_step_autograd_matches_torch_func(outer):
    state = _state(flo.adam(lr=1e-2))
    by_func = _grad_torch_func(OUTER_LOSSES[outer], state)
    by_autograd = _grad_autograd(OUTER_LOSSES[outer], state)
    _close(by_autograd, by_func)
    assert all(torch.isfinite(g).all() for g in by_func)
    assert _max_diff(by_func, [torch.zeros_like(g) for g in by_func]) > 0


# --- the in-place and compiled paths ------------------------------------------------------------


def test_donated_step_refuses_params_that_require_grad():
    state = _state()
    params = {k: v.detach().clone().requires_grad_() for k, v in state.params.items()}
    with pytest.raises(fl.StepError) as info:
        INNER.donated(state.replace(params=params), SUPPORT)
    assert "step(state, batch)" in str(info.value), str(info.value)


def test_compiled_step_gives_right_gradients_or_refuses():
    """Either the compiled step is differentiable (the meta-gradient equals the reference), or it
    raises a StepError pointing at the uncompiled step; never silently wrong gradients."""
    fast = fl.compile(INNER, backend="aot_eager")  # the same graph capture as inductor, without codegen (fast)
    state = _state()
    params = {k: v.detach().clone().requires_grad_() for k, v in state.params.items()}
    try:
        inner_state, _ = fast(state.replace(params=params), SUPPORT)
    except fl.StepError as e:
        msg = str(e)
        assert "uncompiled" in msg.lower() or "fl.train_step" in msg, msg
        return
    got = list(torch.autograd.grad(_functional_outer(inner_state.params), list(params.values())))
    _close(got, _reference())


# --- no graph when nothing requires grad -------------------------------------------------------


@pytest.mark.parametrize("tx", ["sgd", "adam"])
def test_no_graph_when_nothing_requires_grad(tx):
    state = _state(flo.sgd(lr=LR, momentum=0.9) if tx == "sgd" else flo.adam(lr=1e-2))
    assert torch.is_grad_enabled()
    new_state, metrics = INNER(state, SUPPORT)
    for k, p in new_state.params.items():
        assert not p.requires_grad and p.grad_fn is None, k
    for leaf in fl.tree_leaves(new_state.opt_state):
        if isinstance(leaf, torch.Tensor):
            assert not leaf.requires_grad and leaf.grad_fn is None
    assert all(not m.requires_grad for m in metrics.values())
