"""Sweeps as tensors: ``fl.sweep`` builds the stacked state of injected optimizers; ``fl.vmap``
steps it (member i equals state i stepped alone, eager and compiled: one graph for 16 members)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import ConfigError


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))


def _loss(model, batch):
    x, y = batch
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)) for _ in range(n)]


SWEEPS = {
    "adamw-lr": (flo.adamw, {"lr": [1e-3, 3e-3, 1e-2, 3e-2], "weight_decay": 0.01}),
    "adamw-lr-wd-betas-eps": (
        flo.adamw,
        {"lr": [1e-3, 1e-2], "weight_decay": [0.0, 0.1], "betas": [(0.9, 0.999), (0.8, 0.99)], "eps": [1e-8, 1e-6]},
    ),
    "sgd-lr-momentum": (flo.sgd, {"lr": [0.01, 0.1, 0.3], "momentum": [0.0, 0.5, 0.9], "nesterov": False}),
    "adamw-warmup_cosine": (
        flo.adamw,
        {"lr": [flo.warmup_cosine(p, warmup_steps=2, decay_steps=8, end_lr=e) for p, e in [(1e-2, 0.0), (3e-3, 1e-4)]]},
    ),
    "rmsprop-alpha": (flo.rmsprop, {"lr": [1e-3, 1e-2], "alpha": [0.9, 0.99]}),
    "adagrad-lr_decay": (flo.adagrad, {"lr": [1e-2, 5e-2], "lr_decay": [0.0, 1e-2]}),
}


@pytest.mark.parametrize("case", SWEEPS)
def test_vmapped_sweep_member_equals_its_own_run(case):
    alias, values = SWEEPS[case]
    stacked = fl.sweep(_model(), alias, seed=[0, 1, 2, 3][: len(fl.sweep_members(**values))], **values)
    members = fl.unstack(stacked)
    step = fl.train_step(_loss)
    vstep = fl.vmap(step)
    for batch in _batches():
        stacked, metrics = vstep(stacked, batch)
        members = [step(m, batch)[0] for m in members]
    assert metrics["loss"].shape == (len(members),)
    for i, (got, alone) in enumerate(zip(fl.unstack(stacked), members)):
        fl.testing.assert_trees_close(got.params, alone.params, rtol=1e-6, atol=1e-6, msg=f"member {i}")
        fl.testing.assert_trees_close(got.opt_state, alone.opt_state, rtol=1e-6, atol=1e-6, msg=f"member {i}")


def test_sweep_members_and_values():
    state = fl.sweep(_model(), flo.inject_hyperparams(flo.adamw), lr=[1e-3, 1e-2], betas=(0.9, 0.99))
    assert fl.sweep_values(state) == [
        {"lr": 1e-3, "betas.0": 0.9, "betas.1": 0.99},
        {"lr": 1e-2, "betas.0": 0.9, "betas.1": 0.99},
    ]
    assert state.params["0.weight"].shape == (2, 16, 6)
    fl.testing.assert_trees_equal(state.params["0.weight"][0], state.params["0.weight"][1])  # one seed: same init
    grid = fl.sweep(_model(), flo.sgd, grid=True, lr=[0.1, 0.2], momentum=[0.0, 0.9, 0.99])
    assert [(v["lr"], v["momentum"]) for v in fl.sweep_values(grid)] == [
        (0.1, 0.0), (0.1, 0.9), (0.1, 0.99), (0.2, 0.0), (0.2, 0.9), (0.2, 0.99)
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": [0.1, 0.2], "momentum": [0.9]}, "different lengths"),
        ({"lr": []}, r"lr=\[\] has no value"),
        ({"lr": [0.1, 0.2], "seed": [0, 1, 2]}, "seed has 3 values for 2 members"),
        ({"lr": [0.1, -0.2]}, "lr"),
    ],
)
def test_sweep_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        fl.sweep(_model(), flo.sgd, **kwargs)


def test_compiled_sweep_of_16_is_one_graph_and_matches_members():
    torch._dynamo.reset()
    counters.clear()
    lrs = [10 ** (-3 + 2 * i / 15) for i in range(16)]
    stacked = fl.sweep(_model(), flo.adamw, lr=lrs, weight_decay=0.01, seed=list(range(16)))
    members = fl.unstack(stacked)
    step = fl.train_step(_loss)
    fast = fl.compile(fl.vmap(step))
    for k, batch in enumerate(_batches(3)):
        # the first call records the random draws eagerly, the second compiles; none after
        with torch._dynamo.config.patch(error_on_recompile=k > 1):
            stacked, _ = fast(stacked, batch)
        members = [step(m, batch)[0] for m in members]
    assert counters["stats"]["unique_graphs"] == 1
    assert dict(counters["recompiles"]) == {}
    assert dict(counters["graph_break"]) == {}
    for i, (got, alone) in enumerate(zip(fl.unstack(stacked), members)):
        fl.testing.assert_trees_close(got.params, alone.params, rtol=1e-6, atol=1e-6, msg=f"member {i}")
    torch._dynamo.reset()
