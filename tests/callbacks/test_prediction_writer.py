"""PredictionWriter: predictions streamed to safetensors per batch or per loader, read back equal
to what ``predict`` returns, with nothing kept in memory when ``return_predictions=False``."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
from fnloop.callbacks import read_predictions
from fnloop.errors import ConfigError

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

X, Y = sc.samples(10)


def _loaders():
    return [DataLoader(TensorDataset(X, Y), batch_size=4), DataLoader(TensorDataset(X[:3], Y[:3]), batch_size=2)]


STEPS = {
    "tensor": lambda m, b: m(b[0]),
    "dict": lambda m, b: {"y": m(b[0]), "parts": (b[0].sum(1), b[1])},
}


@pytest.mark.parametrize("interval", ["batch", "epoch"])
@pytest.mark.parametrize("kind", sorted(STEPS))
def test_files_hold_what_predict_returns(tmp_path, interval, kind):
    state = sc.linear_state()
    step = fl.predict_step(STEPS[kind])
    expected = sc.quiet_trainer().predict(state, step, _loaders())
    writer = fl.PredictionWriter(tmp_path, write_interval=interval)
    assert sc.quiet_trainer(callbacks=[writer]).predict(state, step, _loaders(), return_predictions=False) is None
    names = sorted(os.listdir(tmp_path))
    if interval == "batch":
        assert names == [f"predictions_0_{i}.safetensors" for i in range(3)] + [f"predictions_1_{i}.safetensors" for i in range(2)]
    else:
        assert names == ["predictions_0.safetensors", "predictions_1.safetensors"]
    for idx in range(2):
        got = read_predictions(tmp_path, idx)
        assert len(got) == len(expected[idx])
        for g, e in zip(got, expected[idx]):
            if kind == "tensor":
                torch.testing.assert_close(g, e, rtol=0, atol=0)
            else:
                torch.testing.assert_close(g, {"y": e["y"], "parts.0": e["parts"][0], "parts.1": e["parts"][1]}, rtol=0, atol=0)


def test_non_tensor_outputs_and_bad_intervals_are_named():
    with pytest.raises(ConfigError, match="write_interval"):
        fl.PredictionWriter("x", write_interval="step")
    with pytest.raises(ConfigError, match="'label'"):
        sc.quiet_trainer(callbacks=[fl.PredictionWriter("unused")]).predict(
            sc.linear_state(), fl.predict_step(lambda m, b: {"label": "cat"}), sc.batches(1)
        )
