"""Frozen parameters (``requires_grad=False``) get no gradient and no update, as in torch.optim:
weight decay and momentum leave them bitwise unchanged, and the trainable parameters end bitwise
where ``torch.optim`` (which skips parameters without ``.grad``) puts them on the same batches."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_trees_equal

N_STEPS = 10
FROZEN = ("0.weight", "0.bias")

# name -> (fnloop optimizer, torch.optim optimizer over params); same hyperparameters
OPTIMIZERS: dict[str, tuple[Callable[[], Any], Callable[[Any], torch.optim.Optimizer]]] = {
    "adamw": (
        lambda: flo.adamw(lr=1e-2, weight_decay=0.1),
        lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True),
    ),
    "sgd-momentum-wd": (
        lambda: flo.sgd(lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=True),
    ),
}


def _model() -> torch.nn.Module:
    """``4-8-2`` MLP (no dropout: no randomness) whose first layer is frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    return model


def _batches(n: int = N_STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)) for _ in range(n)]


def _mse(model: Any, batch: Any) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def _torch_reference(
    module: torch.nn.Module, make_opt: Callable[[Any], torch.optim.Optimizer]
) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(module)
    opt = make_opt(ref.parameters())
    for batch in _batches():
        opt.zero_grad(set_to_none=True)
        _mse(ref, batch).backward()
        opt.step()
    assert ref[0].weight.grad is None  # torch skipped the frozen layer
    return {k: v.detach() for k, v in ref.named_parameters()}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_frozen_params_unchanged_and_trainable_match_torch(name):
    make_tx, make_opt = OPTIMIZERS[name]
    module = _model()
    initial = {k: v.detach().clone() for k, v in module.named_parameters()}
    state = fl.TrainState.create(module, make_tx())
    step = fl.train_step(_mse)
    for batch in _batches():
        state, _ = step(state, batch)
    assert int(state.step) == N_STEPS
    for k in FROZEN:  # weight decay included: no update at all
        assert_trees_equal(state.params[k], initial[k], msg=f"frozen {k}")
    expected = _torch_reference(module, make_opt)
    for k in ("2.weight", "2.bias"):
        assert not torch.equal(state.params[k], initial[k]), k  # it did train
        assert_trees_equal(state.params[k], expected[k], msg=f"trainable {k} vs torch.optim")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_frozen_params_unchanged_by_donated_steps(name):
    make_tx, _ = OPTIMIZERS[name]
    module = _model()
    state = fl.TrainState.create(module, make_tx())
    frozen = {k: state.params[k].clone() for k in FROZEN}
    step = fl.train_step(_mse)
    for batch in _batches(3):
        state, _ = step.donated(state, batch)
    for k in FROZEN:
        assert_trees_equal(state.params[k], frozen[k], msg=f"frozen {k}")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_frozen_params_unchanged_through_fit(name):
    make_tx, _ = OPTIMIZERS[name]
    module = _model()
    state = fl.TrainState.create(module, make_tx())
    frozen = {k: state.params[k].clone() for k in FROZEN}
    trainable = state.params["2.weight"].clone()
    trainer = fl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False)
    out = trainer.fit(state, fl.train_step(_mse), _batches())
    assert out.loop.global_step == N_STEPS
    for k in FROZEN:
        assert_trees_equal(out.params[k], frozen[k], msg=f"frozen {k}")
    assert not torch.equal(out.params["2.weight"], trainable)
