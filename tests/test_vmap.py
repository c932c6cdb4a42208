"""``torch.func.vmap`` over whole train steps: 4 stacked states (different weights, keys and
optimizer states, one shared module and optimizer) stepped at once equal 4 separate steps."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_trees_close, assert_trees_equal


import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

N = 4
TXS = {
    "sgd-momentum": lambda: flo.sgd(lr=0.1, momentum=0.9),
    "sgd-nesterov-wd": lambda: flo.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda: flo.adam(lr=1e-2),
    "adamw": lambda: flo.adamw(lr=1e-2, weight_decay=0.1),
}


def _states(tx: flo.GradientTransformation, step: Any, batch: Any) -> list[fl.TrainState]:
    """N states sharing module and tx, with different params and keys, one step in (so the
    optimizer state is not all zeros)."""
    base = fl.TrainState.create(sc.make_mlp(), tx, seed=0)
    out = []
    for i in range(N):
        g = torch.Generator().manual_seed(100 + i)
        params = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.params.items()}
        state = base.replace(params=params, rng=torch.tensor(i, dtype=torch.int64))
        out.append(step(state, batch)[0])
    return out


def _vmapped(step: Any, stacked: Any, batch: Any) -> Any:
    dims = sc.in_dims(stacked)
    return torch.func.vmap(lambda s: step(s, batch), in_dims=(dims,), out_dims=(dims, 0))(stacked)


@pytest.mark.parametrize("name", sorted(TXS))
def test_vmapped_step_equals_each_slice(name):
    step = fl.train_step(sc.loss_fn)
    batches = sc.make_batches(3)
    states = _states(TXS[name](), step, batches[0])
    stacked = sc.stack(states)
    for batch in batches[1:]:  # two vmapped steps in a row
        stacked, metrics = _vmapped(step, stacked, batch)
        expected = [step(s, batch) for s in states]
        states = [e[0] for e in expected]
        assert metrics["loss"].shape == (N,) and metrics["acc"].shape == (N,)
        for i, (state, m) in enumerate(expected):
            assert_trees_close(sc.unstack(stacked, i), state, rtol=1e-6, atol=1e-6, msg=f"{name}: slice {i}")
            assert_trees_close(sc.unstack(metrics, i), m, rtol=1e-6, atol=1e-6, msg=f"{name}: metrics of slice {i}")
    assert stacked.step.tolist() == [3] * N
    assert stacked.loop == states[0].loop  # Python leaves pass through


def test_slices_differ():
    """The stacked states really are different models: the vmapped step does not broadcast one."""
    step = fl.train_step(sc.loss_fn)
    batch = sc.make_batch()
    stacked, metrics = _vmapped(step, sc.stack(_states(TXS["sgd-momentum"](), step, batch)), batch)
    assert len(set(metrics["loss"].tolist())) == N
    w = stacked.params["0.weight"]
    assert all(not torch.equal(w[0], w[i]) for i in range(1, N))


def test_vmapped_predict_step():
    step = fl.train_step(sc.loss_fn)
    batch = sc.make_batch()
    states = _states(TXS["sgd-momentum"](), step, batch)
    predict = fl.predict_step(sc.predict_fn)
    stacked = sc.stack(states)
    out = torch.func.vmap(lambda s: predict(s, batch), in_dims=(sc.in_dims(stacked),))(stacked)
    assert out.shape == (N, batch[0].shape[0], sc.N_CLASSES)
    for i, s in enumerate(states):
        assert_trees_close(out[i], predict(s, batch), rtol=1e-6, atol=1e-6)
    assert_trees_equal(sc.unstack(stacked, 0).params, states[0].params)  # inputs untouched
