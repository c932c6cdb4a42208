"""Differentiating through optimizer steps (MAML, hyper-gradients): ``fused_apply(tx)`` on
gradients built with ``create_graph=True`` records a correct graph. The derivative of the
params after two updates with respect to the initial params agrees between autograd,
``torch.func.grad`` and central finite differences (float64), for every alias."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import fnloop.optim as flo

ALIASES = {
    "sgd": lambda: flo.sgd(lr=0.1),
    "sgd-momentum-dampening-weight_decay": lambda: flo.sgd(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.1),
    "sgd-nesterov-maximize": lambda: flo.sgd(lr=0.05, momentum=0.9, nesterov=True, maximize=True),
    "adam": lambda: flo.adam(lr=0.05),
    "adam-weight_decay-amsgrad": lambda: flo.adam(lr=0.05, weight_decay=0.1, amsgrad=True),
    "adamw": lambda: flo.adamw(lr=0.05, weight_decay=0.1),
    "adamw-mask-maximize": lambda: flo.adamw(lr=0.05, weight_decay=0.1, mask=flo.ndim_mask(2), maximize=True),
    "rmsprop": lambda: flo.rmsprop(lr=0.01),
    "rmsprop-centered-momentum-weight_decay": lambda: flo.rmsprop(
        lr=0.01, centered=True, momentum=0.5, weight_decay=0.1
    ),
    "adagrad": lambda: flo.adagrad(lr=0.1),
    "adagrad-lr_decay-weight_decay-initial": lambda: flo.adagrad(
        lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.1
    ),
    "chain-clip-adamw": lambda: flo.chain(flo.clip_by_global_norm(10.0), flo.adamw(lr=0.05)),
}

Params = dict[str, torch.Tensor]


def _init() -> Params:
    gen = torch.Generator().manual_seed(0)
    return {
        "w1": torch.randn(4, 3, generator=gen, dtype=torch.float64),
        "b1": torch.randn(4, generator=gen, dtype=torch.float64),
        "w2": torch.randn(2, 4, generator=gen, dtype=torch.float64),
    }


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64))
        for _ in range(2)
    ]


def _loss(p: Params, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T - y) ** 2).mean()


GradOf = Callable[[Params, Any], Params]


def _autograd_grads(p: Params, batch: Any) -> Params:
    return dict(zip(p, torch.autograd.grad(_loss(p, batch), list(p.values()), create_graph=True)))


def _unrolled(tx: flo.GradientTransformation, grads_of: GradOf) -> Callable[[Params], torch.Tensor]:
    """The sum of the params after two fused updates, as a function of the initial params."""
    apply = flo.fused_apply(tx)

    def f(p: Params) -> torch.Tensor:
        state = tx.init(p)
        for batch in _batches():
            p, state = apply(grads_of(p, batch), state, p)
        return sum(v.sum() for v in p.values())  # type: ignore[return-value]

    return f


def _finite_difference(f: Callable[[Params], torch.Tensor], p: Params, h: float = 1e-6) -> Params:
    out = {}
    for name, value in p.items():
        d = torch.zeros_like(value).reshape(-1)
        for i in range(d.numel()):
            step = torch.zeros_like(d)
            step[i] = h
            up = {**p, name: value + step.reshape(value.shape)}
            down = {**p, name: value - step.reshape(value.shape)}
            d[i] = (f(up) - f(down)) / (2 * h)
        out[name] = d.reshape(value.shape)
    return out


@pytest.mark.parametrize("make", list(ALIASES.values()), ids=list(ALIASES))
def test_second_order_gradients_agree_with_torch_func_and_finite_differences(make: Any) -> None:
    tx, p0 = make(), _init()
    leaves = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    total = _unrolled(tx, _autograd_grads)(leaves)
    by_autograd = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()), create_graph=True)))
    by_func = torch.func.grad(_unrolled(tx, lambda p, b: torch.func.grad(_loss)(p, b)))(p0)
    with torch.no_grad():
        by_fd = _finite_difference(_unrolled(tx, lambda p, b: torch.func.grad(_loss)(p, b)), p0)
    for name in p0:
        torch.testing.assert_close(by_autograd[name], by_func[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(by_autograd[name], by_fd[name], rtol=1e-6, atol=1e-6)
    assert any(v.grad_fn is not None for v in by_autograd.values()), (
        "create_graph=True: the gradient is itself differentiable"
    )


@pytest.mark.parametrize("make", list(ALIASES.values()), ids=list(ALIASES))
def test_recording_a_graph_gives_the_same_values_as_the_plain_call(make: Any) -> None:
    tx, p0 = make(), _init()
    with torch.no_grad():
        plain = _unrolled(tx, lambda p, b: torch.func.grad(_loss)(p, b))(p0)
    leaves = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    recorded = _unrolled(tx, _autograd_grads)(leaves)
    assert torch.equal(recorded.detach(), plain)


def test_a_plain_call_decides_once_and_keeps_the_in_place_foreach_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from fnloop.optim import _foreach as fe

    calls, leafwise = [], []
    original_records, original_fallback = fe.records_graph, fe._fallback
    monkeypatch.setattr(fe, "records_graph", lambda *lists: calls.append(1) or original_records(*lists))
    monkeypatch.setattr(fe, "_fallback", lambda xs: leafwise.append(original_fallback(xs)) or leafwise[-1])
    tx, p = flo.adamw(lr=0.05, weight_decay=0.1), _init()
    grads = torch.func.grad(_loss)(p, _batches()[0])
    flo.fused_apply(tx)(grads, tx.init(p), p)
    assert calls == [1], "one decision per call"
    assert leafwise and not any(leafwise), "nothing requires grad: foreach kernels throughout"
