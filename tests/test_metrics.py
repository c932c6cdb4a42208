"""Tests for fnloop.metrics: metric accumulators and the Accumulator used by the driver."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnloop.errors import ConfigError
from fnloop.metrics import Accumulator, Accuracy, Max, Mean, Metric, Min, Sum

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
steps = st.lists(st.tuples(finite, st.integers(1, 64)), min_size=1, max_size=20)


def _fold(metric, pairs, like=None):
    acc = metric.init(like)
    for value, weight in pairs:
        acc = metric.update(acc, torch.tensor(value), weight)
    return acc


# --- single metrics ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [Mean(), Sum(), Max(), Min(), Accuracy()])
def test_metrics_satisfy_protocol(metric):
    assert isinstance(metric, Metric)


@settings(max_examples=40, deadline=None)
@given(steps)
def test_mean_is_batch_weighted_mean(pairs):
    got = Mean().compute(_fold(Mean(), pairs))
    expected = sum(float(torch.tensor(v)) * w for v, w in pairs) / sum(w for _, w in pairs)
    assert got.dtype == torch.float64
    assert math.isclose(got.item(), expected, rel_tol=1e-12, abs_tol=1e-9)


@pytest.mark.parametrize(
    "metric, values, weights, expected",
    [
        (Mean(), [1.0, 2.0, 4.0], [1, 1, 2], (1 + 2 + 8) / 4),
        (Mean(), [3.0], [torch.tensor(5)], 3.0),
        (Sum(), [1.0, 2.0, 4.0], [1, 1, 1], 7.0),
        (Sum(), [1.0, 2.0], [3, torch.tensor(2.0)], 7.0),
        (Max(), [1.0, -2.0, 4.0, 3.0], [1, 100, 1, 1], 4.0),
        (Min(), [1.0, -2.0, 4.0, 3.0], [1, 1, 100, 1], -2.0),
    ],
)
def test_metric_table(metric, values, weights, expected):
    acc = metric.init()
    for v, w in zip(values, weights):
        acc = metric.update(acc, torch.tensor(v), w)
    assert metric.compute(acc).item() == pytest.approx(expected)


@pytest.mark.parametrize("metric", [Mean(), Sum(), Max(), Min()])
def test_elementwise_over_vector_values(metric):
    rows = torch.tensor([[1.0, 5.0], [3.0, -1.0], [2.0, 2.0]])
    acc = metric.init(like=rows)
    for row in rows:
        acc = metric.update(acc, row, 1)
    reference = {Mean: rows.mean(0), Sum: rows.sum(0), Max: rows.amax(0), Min: rows.amin(0)}[type(metric)]
    torch.testing.assert_close(metric.compute(acc), reference.double())


@settings(max_examples=40, deadline=None)
@given(steps, st.data())
@pytest.mark.parametrize("metric", [Mean(), Sum(), Max(), Min()])
def test_merge_equals_single_accumulation(metric, pairs, data):
    cut = data.draw(st.integers(0, len(pairs)))
    merged = metric.merge(_fold(metric, pairs[:cut]), _fold(metric, pairs[cut:]))
    whole = _fold(metric, pairs)
    torch.testing.assert_close(metric.compute(merged), metric.compute(whole), rtol=1e-12, atol=1e-9)


def test_accumulates_in_float64():
    m = Mean()
    acc = m.init()
    small = torch.tensor(1e-4, dtype=torch.float32)
    for _ in range(1000):
        acc = m.update(acc, small, 1)
    assert acc.total.dtype == torch.float64
    assert m.compute(acc).item() == pytest.approx(small.double().item(), rel=1e-12)


def test_update_detaches_and_does_not_mutate():
    m = Mean()
    acc0 = m.init()
    x = torch.tensor(2.0, requires_grad=True)
    acc1 = m.update(acc0, x * 3, 4)
    assert acc1.total.grad_fn is None and not acc1.total.requires_grad
    assert acc0.total.item() == 0.0 and acc0.weight.item() == 0.0


def test_empty_mean_is_nan():
    assert torch.isnan(Mean().compute(Mean().init()))


# --- accuracy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preds, targets, expected",
    [
        (torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]), 2 / 3),
        (torch.tensor([1, 0, 2, 2]), torch.tensor([1, 1, 2, 0]), 0.5),
        (torch.randn(2, 3, 5).softmax(-1), None, None),
        (torch.tensor([[True, False]]), torch.tensor([[True, True]]), 0.5),
    ],
)
def test_accuracy_from_logits_and_preds(preds, targets, expected):
    if targets is None:  # sequence logits: targets (2, 3), logits (2, 3, 5)
        targets = torch.randint(0, 5, (2, 3))
        expected = (preds.argmax(-1) == targets).double().mean().item()
    a = Accuracy()
    acc = a.update(a.init(), preds, targets)
    assert acc.total.dtype == torch.int64 and acc.total.item() == targets.numel()
    assert a.compute(acc).item() == pytest.approx(expected)


def test_accuracy_accumulates_and_merges():
    a = Accuracy()
    logits = torch.randn(30, 4)
    targets = torch.randint(0, 4, (30,))
    parts = [a.update(a.init(), logits[i : i + 7], targets[i : i + 7]) for i in range(0, 30, 7)]
    merged = parts[0]
    for p in parts[1:]:
        merged = a.merge(merged, p)
    expected = (logits.argmax(-1) == targets).double().mean()
    torch.testing.assert_close(a.compute(merged), expected)


def test_accuracy_shape_mismatch_is_config_error():
    with pytest.raises(ConfigError, match="do not match targets"):
        Accuracy().update(Accuracy().init(), torch.zeros(3), torch.zeros(4))


# --- Accumulator ------------------------------------------------------------------------------


def _run(acc, step_metrics, batch_sizes):
    accs = acc.init()
    for metrics, bs in zip(step_metrics, batch_sizes):
        accs = acc.update(accs, metrics, bs)
    return accs


def test_accumulator_weighted_mean_and_new_keys_mid_window():
    acc = Accumulator()
    steps_ = [
        {"loss": torch.tensor(1.0)},
        {"loss": torch.tensor(2.0), "aux": torch.tensor(10.0)},
        {"loss": torch.tensor(4.0), "aux": torch.tensor(20.0)},
    ]
    out = acc.compute(_run(acc, steps_, [2, 3, 5]))
    assert out["loss"].item() == pytest.approx((2 * 1 + 3 * 2 + 5 * 4) / 10)
    assert out["aux"].item() == pytest.approx((3 * 10 + 5 * 20) / 8)


@pytest.mark.parametrize(
    "reductions, name, expected_type",
    [
        (None, "loss", Mean),
        (None, "grad_norm_max", Max),
        (None, "act_min", Min),
        (None, "tokens_sum", Sum),
        ({"lr": Max()}, "lr", Max),
        ({"val_*": Sum()}, "val_loss", Sum),
        ({"*_max": Mean()}, "grad_norm_max", Mean),
        ({"val_*": Sum(), "val_loss": Min()}, "val_loss", Min),
    ],
)
def test_accumulator_reduction_rules(reductions, name, expected_type):
    assert type(Accumulator(reductions).metric_for(name)) is expected_type


def test_accumulator_other_reductions_use_values_as_logged():
    acc = Accumulator({"lr": Max()})
    steps_ = [
        {"lr": torch.tensor(0.5), "n_sum": torch.tensor(3.0), "g_max": torch.tensor(1.0)},
        {"lr": torch.tensor(0.25), "n_sum": torch.tensor(4.0), "g_max": torch.tensor(7.0)},
    ]
    out = acc.compute(_run(acc, steps_, [10, 10]))
    assert {k: v.item() for k, v in out.items()} == {"lr": 0.5, "n_sum": 7.0, "g_max": 7.0}


def test_accumulator_tuple_values_feed_accuracy():
    acc = Accumulator({"acc": Accuracy()})
    logits = torch.randn(12, 3)
    targets = torch.randint(0, 3, (12,))
    accs = acc.update(acc.init(), {"acc": (logits[:5], targets[:5])}, 5)
    accs = acc.update(accs, {"acc": (logits[5:], targets[5:])}, 7)
    expected = (logits.argmax(-1) == targets).double().mean()
    torch.testing.assert_close(acc.compute(accs)["acc"], expected)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from(["loss", "a", "b_max", "c_sum"]), finite, min_size=1),
            st.integers(1, 9),
        ),
        min_size=1,
        max_size=12,
    ),
    st.data(),
)
def test_accumulator_merge_equals_single_window(window, data):
    acc = Accumulator()
    cut = data.draw(st.integers(0, len(window)))
    as_tensors = [({k: torch.tensor(v) for k, v in m.items()}, bs) for m, bs in window]
    run = lambda part: _run(acc, [m for m, _ in part], [bs for _, bs in part])  # noqa: E731
    merged = acc.compute(acc.merge(run(as_tensors[:cut]), run(as_tensors[cut:])))
    whole = acc.compute(run(as_tensors))
    assert merged.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(merged[k], whole[k], rtol=1e-12, atol=1e-9)


def test_accumulator_update_is_pure():
    acc = Accumulator()
    accs = acc.update(acc.init(), {"loss": torch.tensor(1.0)}, 2)
    snapshot = {k: [t.clone() for t in v] for k, v in accs.items()}
    new = acc.update(accs, {"loss": torch.tensor(5.0), "x": torch.tensor(1.0)}, 2)
    assert set(accs) == {"loss"} and set(new) == {"loss", "x"}
    for k, v in accs.items():
        for before, after in zip(snapshot[k], v):
            assert torch.equal(before, after)


def test_accumulator_accepts_python_numbers_and_tensor_batch_size():
    acc = Accumulator()
    accs = acc.update(acc.init(), {"loss": 1.0}, torch.tensor(1))
    accs = acc.update(accs, {"loss": 4}, torch.tensor(3))
    assert acc.compute(accs)["loss"].item() == pytest.approx(13 / 4)


def test_accumulator_state_dtype_and_device_follow_value():
    acc = Accumulator()
    accs = acc.update(acc.init(), {"loss": torch.tensor(1.0, dtype=torch.bfloat16)}, 2)
    accs = acc.update(accs, {"loss": torch.tensor(2.0, dtype=torch.bfloat16)}, 2)
    state = accs["loss"]
    assert state.total.dtype == torch.float64 and state.total.device.type == "cpu"
    assert acc.compute(accs)["loss"].item() == pytest.approx(1.5)


def test_accumulator_rejects_non_metric_reduction():
    with pytest.raises(ConfigError, match="'lr'.*not a metric"):
        Accumulator({"lr": "max"})


def test_accumulator_update_does_no_host_sync(monkeypatch):
    acc = Accumulator({"acc": Accuracy(), "lr": Max()})
    logits = torch.randn(8, 3)
    targets = torch.randint(0, 3, (8,))
    window = [
        ({"loss": torch.tensor(1.0), "lr": torch.tensor(0.1)}, 8),
        ({"loss": torch.tensor(2.0), "lr": torch.tensor(0.2), "g_max": torch.tensor(3.0)}, 4),
        ({"loss": torch.tensor(3.0), "acc": (logits, targets), "tok_sum": torch.tensor(2)}, torch.tensor(2)),
        ({"loss": torch.tensor(4.0), "acc": (logits, targets), "g_max": torch.tensor(1.0)}, 8),
    ]
    other = acc.update(acc.init(), {"loss": torch.tensor(5.0), "new": torch.tensor(1.0)}, 3)

    def sync(*args, **kwargs):
        raise AssertionError("host sync during Accumulator.update/merge")

    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    accs = acc.init()
    for metrics, bs in window:
        accs = acc.update(accs, metrics, bs)
    merged = acc.merge(accs, other)
    out = acc.compute(merged)
    monkeypatch.undo()
    assert out["loss"].item() == pytest.approx((8 * 1 + 4 * 2 + 2 * 3 + 8 * 4 + 3 * 5) / 25)
    assert out["g_max"].item() == 3.0 and out["tok_sum"].item() == 2.0 and out["new"].item() == 1.0
