"""lr_find: the sweep equals a hand-written loop of torch SGD at the same LRs, the caller's state
is unchanged, the suggestion is the steepest descent, the plot is a PNG."""

from __future__ import annotations

import math

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import ConfigError
from fnloop.testing import assert_trees_equal
from fnloop.tools import lr_find

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


def _reference(lrs, data, beta=0.98):
    module = sc.make_linear()
    opt = torch.optim.SGD(module.parameters(), lr=lrs[0])
    out, avg = [], 0.0
    for i, lr in enumerate(lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = data[i % len(data)]
        loss = sc.mse(module, (x, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        avg = beta * avg + (1 - beta) * float(loss.detach())
        out.append(avg / (1 - beta ** (i + 1)))
    return out


@pytest.mark.parametrize("mode", ["exponential", "linear"])
def test_the_sweep_equals_a_hand_written_loop_and_leaves_the_state_alone(mode):
    data = sc.batches(3)
    state = sc.linear_state()
    before = fl.tree_map(lambda t: t.clone(), state.params)
    result = lr_find(state, sc.mse, data, optimizer=lambda lr: flo.sgd(lr=lr), min_lr=1e-4, max_lr=0.5,
                     num_training=15, mode=mode, early_stop_threshold=None)
    n = 15
    if mode == "exponential":
        expected_lrs = [1e-4 * (0.5 / 1e-4) ** (i / (n - 1)) for i in range(n)]
    else:
        expected_lrs = [1e-4 + (0.5 - 1e-4) * i / (n - 1) for i in range(n)]
    assert result.lrs == pytest.approx(expected_lrs, rel=1e-9)
    assert result.losses == pytest.approx(_reference(result.lrs, data), rel=1e-5)
    assert_trees_equal(state.params, before)
    assert int(state.step) == 0


def test_the_suggestion_is_the_steepest_descent_after_skip_begin():
    result = lr_find(sc.linear_state(), sc.mse, sc.batches(4), optimizer=lambda lr: flo.sgd(lr=lr),
                     min_lr=1e-3, max_lr=1.0, num_training=30, early_stop_threshold=None)
    kept = result.losses[10:-1]
    grads = [kept[1] - kept[0]] + [(kept[i + 1] - kept[i - 1]) / 2 for i in range(1, len(kept) - 1)] + [kept[-1] - kept[-2]]
    assert result.suggestion == result.lrs[10 + grads.index(min(grads))]


def test_a_diverging_loss_stops_the_sweep_early():
    result = lr_find(sc.linear_state(), sc.mse, sc.batches(4), optimizer=lambda lr: flo.sgd(lr=lr),
                     min_lr=1e-2, max_lr=1e4, num_training=60)
    assert len(result.lrs) < 60
    assert not math.isfinite(result.losses[-1]) or result.losses[-1] > 4 * min(result.losses)


def test_the_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = lr_find(sc.linear_state(), sc.mse, sc.batches(4), optimizer=lambda lr: flo.sgd(lr=lr), num_training=20)
    path = result.plot(str(tmp_path / "lr.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("kw", "word"), [(dict(mode="cosine"), "mode"), (dict(min_lr=1.0, max_lr=0.1), "min_lr"), (dict(num_training=1), "num_training")])
def test_bad_arguments_are_named(kw, word):
    with pytest.raises(ConfigError, match=word):
        lr_find(sc.linear_state(), sc.mse, sc.batches(1), optimizer=lambda lr: flo.sgd(lr=lr), **kw)
