"""LoggerCollection and the protocol every sink follows: one run folder, same values everywhere."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import struct

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fnloop.errors import ConfigError
from fnloop.loggers import (
    ConsoleLogger,
    CSVLogger,
    JSONLLogger,
    Logger,
    LoggerCollection,
    NullLogger,
    RunDir,
    TensorBoardLogger,
    read_hparams_file,
)
from fnloop.loggers.rank import RANK_ENV_VARS

SCENARIO = [
    (0, {"train/loss": 2.5, "lr": 0.1}),
    (50, {"train/loss": 1.0 / 3.0, "lr": 0.1}),
    (100, {"train/loss": 0.625, "lr": 0.05, "val/loss": 0.75}),
    (150, {"train/loss": math.nan, "lr": 0.05}),
    (200, {"train/loss": math.inf, "lr": 0.025, "val/loss": 0.5}),
]


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    for var in RANK_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def all_sinks(root, out: io.StringIO | None = None) -> list:
    return [
        TensorBoardLogger(root, "exp"),
        CSVLogger(root, "exp"),
        JSONLLogger(root, "exp"),
        ConsoleLogger(stream=out or io.StringIO()),
        NullLogger(),
    ]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def write_scenario(logs: LoggerCollection) -> None:
    logs.log_hparams({"optim": {"lr": 0.1}, "seed": 0})
    for step, metrics in SCENARIO:
        as_tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}
        logs.log_metrics(as_tensors, step)
    logs.finalize("finished")


def test_every_sink_follows_the_protocol(tmp_path):
    for sink in all_sinks(tmp_path):
        assert isinstance(sink, Logger), type(sink).__name__
    assert isinstance(LoggerCollection([]), Logger)


def test_sinks_share_one_run_folder_and_hold_the_same_values(tmp_path):
    logs = LoggerCollection(all_sinks(tmp_path))
    write_scenario(logs)

    run = os.path.join(tmp_path, "exp", "version_0")
    assert os.listdir(os.path.join(tmp_path, "exp")) == ["version_0"]
    assert logs.log_dir == run
    assert [s.log_dir for s in logs.loggers[:3]] == [run] * 3
    assert read_hparams_file(os.path.join(run, "hparams.yaml")) == {"optim": {"lr": 0.1}, "seed": 0}

    with open(os.path.join(run, "metrics.jsonl")) as f:
        jsonl = [(line["step"], line["metrics"]) for line in map(json.loads, f)]
    with open(os.path.join(run, "metrics.csv"), newline="") as f:
        csv_rows = [
            (int(r.pop("step")), {k: float(v) for k, v in r.items() if v != ""})
            for r in csv.DictReader(f)
        ]
    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()

    assert [s for s, _ in jsonl] == [s for s, _ in csv_rows] == [s for s, _ in SCENARIO]
    for (step, expected), (_, from_jsonl), (_, from_csv) in zip(SCENARIO, jsonl, csv_rows):
        assert from_jsonl.keys() == from_csv.keys() == expected.keys()
        for key, value in expected.items():
            assert same(from_jsonl[key], value) and same(from_csv[key], value), (step, key)
    for tag in ("train/loss", "val/loss", "lr"):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = [(s, f32(m[tag])) for s, m in SCENARIO if tag in m]
        assert len(got) == len(want)
        assert all(gs == ws and same(gv, wv) for (gs, gv), (ws, wv) in zip(got, want))


def test_versioning_per_run(tmp_path):
    for expected in ("version_0", "version_1", "version_2"):
        logs = LoggerCollection([CSVLogger(tmp_path, "exp"), JSONLLogger(tmp_path, "exp")])
        logs.log_metrics({"a": 1.0}, 0)
        logs.finalize("finished")
        assert os.path.basename(logs.log_dir) == expected
        assert sorted(os.listdir(logs.log_dir)) == ["metrics.csv", "metrics.jsonl"]


def test_a_given_run_dir_is_used_by_every_file_sink(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the sinks' default root_dir "runs" must stay unused
    run = RunDir(tmp_path, "shared", version=5)
    explicit = tmp_path / "elsewhere"
    logs = LoggerCollection(
        [CSVLogger(), JSONLLogger(name="ignored"), TensorBoardLogger(log_dir=explicit)], run_dir=run
    )
    logs.log_metrics({"a": 1.0}, 0)
    logs.finalize("finished")
    assert logs.loggers[0].log_dir == logs.loggers[1].log_dir == run.path
    assert run.path == os.path.join(tmp_path, "shared", "version_5")
    assert logs.loggers[2].log_dir == str(explicit)  # an explicit log_dir is kept
    assert os.listdir(cwd) == []


def test_a_path_as_run_dir(tmp_path):
    logs = LoggerCollection([CSVLogger(), JSONLLogger()], run_dir=tmp_path / "run")
    logs.log_metrics({"a": 1.0}, 0)
    logs.finalize("finished")
    assert sorted(os.listdir(tmp_path / "run")) == ["metrics.csv", "metrics.jsonl"]


def test_nested_collections_are_flattened(tmp_path):
    inner = LoggerCollection([CSVLogger(tmp_path), NullLogger()])
    outer = LoggerCollection([inner, JSONLLogger(tmp_path)])
    assert len(outer) == 3 and list(outer)[0] is inner.loggers[0]


def test_finalize_is_idempotent_everywhere(tmp_path):
    out = io.StringIO()
    logs = LoggerCollection(all_sinks(tmp_path, out))
    write_scenario(logs)
    run = logs.log_dir
    snapshot = {f: os.path.getsize(os.path.join(run, f)) for f in os.listdir(run)}
    printed = out.getvalue()
    logs.finalize("finished")
    logs.finalize("interrupted")
    assert {f: os.path.getsize(os.path.join(run, f)) for f in os.listdir(run)} == snapshot
    assert out.getvalue() == printed


def test_finalize_reaches_every_sink_when_one_fails(tmp_path):
    class Broken(NullLogger):
        def finalize(self, status: str) -> None:
            raise RuntimeError("sink broke")

    jsonl = JSONLLogger(log_dir=tmp_path)
    logs = LoggerCollection([Broken(), jsonl])
    logs.log_metrics({"a": 1.0}, 0)
    with pytest.raises(RuntimeError, match="sink broke"):
        logs.finalize("failed")
    assert jsonl._file is None  # closed despite the first failure


@pytest.mark.parametrize("status", ["success", "done", ""])
def test_unknown_status_names_the_argument(tmp_path, status):
    for sink in [*all_sinks(tmp_path), LoggerCollection([])]:
        with pytest.raises(ConfigError, match="status"):
            sink.finalize(status)


def test_rank_one_writes_nothing_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    out = io.StringIO()
    logs = LoggerCollection(all_sinks(tmp_path, out))
    write_scenario(logs)
    assert logs.log_dir is None
    assert os.listdir(tmp_path) == [] and out.getvalue() == ""
