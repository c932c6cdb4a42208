"""JSONLLogger: one JSON object per line, appended and flushed."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from fnloop.errors import ConfigError
from fnloop.loggers import JSONLLogger, read_hparams_file
from fnloop.loggers.rank import RANK_ENV_VARS


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    for var in RANK_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def read_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_lines_hold_step_metrics_and_time(tmp_path):
    sink = JSONLLogger(tmp_path, "exp")
    before = time.time()
    sink.log_metrics({"train/loss": 1.0 / 3.0, "lr": 0.1}, 0)
    # visible on disk right away, before finalize
    assert read_lines(sink.metrics_path)[0]["metrics"] == {"train/loss": 1.0 / 3.0, "lr": 0.1}
    sink.log_metrics({"val/loss": torch.tensor(0.5), "epoch": 1}, 50)
    sink.finalize("finished")

    assert sink.metrics_path == os.path.join(tmp_path, "exp", "version_0", "metrics.jsonl")
    lines = read_lines(sink.metrics_path)
    assert [(line["step"], line["metrics"]) for line in lines] == [
        (0, {"train/loss": 1.0 / 3.0, "lr": 0.1}),
        (50, {"val/loss": 0.5, "epoch": 1}),
    ]
    assert all(set(line) == {"step", "metrics", "time"} for line in lines)
    assert before <= lines[0]["time"] <= lines[1]["time"] <= time.time()
    assert isinstance(lines[1]["metrics"]["epoch"], int)


def test_non_finite_values_round_trip(tmp_path):
    sink = JSONLLogger(log_dir=tmp_path)
    sink.log_metrics({"a": math.nan, "b": math.inf, "c": -math.inf}, 1)
    sink.finalize("failed")
    metrics = read_lines(sink.metrics_path)[0]["metrics"]
    assert math.isnan(metrics["a"]) and metrics["b"] == math.inf and metrics["c"] == -math.inf


def test_finalize_is_idempotent_and_reopens_for_appending(tmp_path):
    sink = JSONLLogger(log_dir=tmp_path)
    sink.log_metrics({"a": 1.0}, 1)
    sink.finalize("finished")
    sink.finalize("finished")
    sink.log_metrics({"a": 2.0}, 2)
    sink.finalize("finished")
    other = JSONLLogger(log_dir=tmp_path)  # a resumed run appends too
    other.log_metrics({"a": 3.0}, 3)
    other.finalize("finished")
    assert [line["step"] for line in read_lines(sink.metrics_path)] == [1, 2, 3]


def test_hparams_go_to_yaml_and_metrics_to_a_line(tmp_path):
    sink = JSONLLogger(log_dir=tmp_path)
    sink.log_metrics({"a": 1.0}, 4)
    sink.log_hparams({"optim": {"name": "adamw", "betas": (0.9, 0.95)}}, {"hp/score": 0.5})
    sink.finalize("finished")
    stored = read_hparams_file(os.path.join(tmp_path, "hparams.yaml"))
    assert stored == {"optim": {"name": "adamw", "betas": [0.9, 0.95]}}
    assert read_lines(sink.metrics_path)[-1]["step"] == 4
    assert read_lines(sink.metrics_path)[-1]["metrics"] == {"hp/score": 0.5}


def test_non_numbers_are_rejected_with_the_key(tmp_path):
    sink = JSONLLogger(log_dir=tmp_path)
    with pytest.raises(ConfigError, match="'name'"):
        sink.log_metrics({"name": "resnet"}, 1)
    with pytest.raises(ConfigError, match="'vec'"):
        sink.log_metrics({"vec": torch.ones(3)}, 1)


def test_rank_one_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    sink = JSONLLogger(tmp_path)
    sink.log_metrics({"a": 1.0}, 1)
    sink.log_hparams({"lr": 0.1})
    sink.finalize("finished")
    assert sink.metrics_path is None
    assert os.listdir(tmp_path) == []
