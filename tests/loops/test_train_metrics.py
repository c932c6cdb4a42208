"""Train metrics: every name reduced by its rule (mean by batch size, ``*_sum``, ``*_max``,
``*_min``) per logging window and per epoch, compared with the values computed by hand from the
step's own metrics; windows stop at the epoch's end."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnloop as fl

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


def _loss(model, batch):
    x, y = batch
    err = (model(x) - y).square()
    return err.mean(), {"g_max": err.max(), "g_min": err.min(), "n_sum": torch.tensor(1.0)}


class StepValues(fl.Callback):
    """The step metrics of every batch, with the batch size and epoch."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, state, metrics):
        self.rows.append((state.loop.epoch, {k: float(v) for k, v in metrics.items()}))


def _reduce(rows, sizes):
    out = {
        "loss": sum(r["loss"] * s for r, s in zip(rows, sizes)) / sum(sizes),
        "g_max": max(r["g_max"] for r in rows),
        "g_min": min(r["g_min"] for r in rows),
        "n_sum": sum(r["n_sum"] for r in rows),
    }
    return out


@settings(max_examples=8, deadline=None)
@given(n_batches=st.integers(1, 7), every=st.integers(1, 4), epochs=st.integers(1, 2), last=st.integers(1, 4))
def test_windows_and_epochs_reduce_each_metric_by_its_rule(n_batches, every, epochs, last):
    sizes = [4] * (n_batches - 1) + [last]
    data = [b for i, s in enumerate(sizes) for b in sc.batches(1, batch_size=s, seed=i)]
    rec, sink = StepValues(), sc.RecordingLogger()
    trainer = sc.quiet_trainer(max_epochs=epochs, log_every_n_steps=every, logger=sink, callbacks=[rec])
    trainer.fit(sc.linear_state(), fl.train_step(_loss), data)
    # expected: windows of `every` steps that never span an epoch; one value per epoch
    expected_windows, expected_epochs = [], []
    for e in range(epochs):
        rows = [r for ep, r in rec.rows if ep == e]
        start = 0
        for b in range(n_batches):
            step = e * n_batches + b + 1
            if step % every == 0 or b == n_batches - 1:
                expected_windows.append((step, _reduce(rows[start : b + 1], sizes[start : b + 1])))
                start = b + 1
        expected_epochs.append(((e + 1) * n_batches, _reduce(rows, sizes)))
    windows = [(s, m) for s, m in sink.metrics if "train/loss" in m]
    assert [s for s, _ in windows] == [s for s, _ in expected_windows]
    for (_, got), (_, want) in zip(windows, expected_windows):
        for k, v in want.items():
            assert got[f"train/{k}"] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    epochs_logged = [(s, m) for s, m in sink.metrics if "train/loss_epoch" in m]
    assert [s for s, _ in epochs_logged] == [s for s, _ in expected_epochs]
    for (_, got), (_, want) in zip(epochs_logged, expected_epochs):
        for k, v in want.items():
            assert got[f"train/{k}_epoch"] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_the_max_is_the_true_max_and_the_sum_counts_every_step():
    rec, sink = StepValues(), sc.RecordingLogger()
    trainer = sc.quiet_trainer(max_epochs=1, log_every_n_steps=8, logger=sink, callbacks=[rec])
    trainer.fit(sc.linear_state(), fl.train_step(_loss), sc.batches(8))
    true_max = max(r["g_max"] for _, r in rec.rows)
    mean_of_max = sum(r["g_max"] for _, r in rec.rows) / 8
    assert true_max > mean_of_max  # the mean would be a different number
    assert sink.values("train/g_max") == [(8, pytest.approx(true_max, rel=1e-6))]
    assert sink.values("train/g_max_epoch") == [(8, pytest.approx(true_max, rel=1e-6))]
    assert sink.values("train/n_sum") == [(8, 8.0)]
    assert sink.values("train/n_sum_epoch") == [(8, 8.0)]
