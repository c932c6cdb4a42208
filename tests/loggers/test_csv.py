"""CSVLogger: buffered rows, widening header rewritten atomically, non-finite values."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest

from fnloop.errors import ConfigError
from fnloop.loggers import CSVLogger, read_hparams_file
from fnloop.loggers.rank import RANK_ENV_VARS


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    for var in RANK_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def read_rows(path: str) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_rows_hold_the_logged_values(tmp_path):
    sink = CSVLogger(tmp_path, "exp")
    sink.log_metrics({"train/loss": 2.5, "lr": 0.1}, 0)
    sink.log_metrics({"train/loss": 1.0 / 3.0, "lr": 0.1, "val/loss": 0.75}, 50)
    sink.log_metrics({"epoch": 1}, 60)
    sink.finalize("finished")

    path = os.path.join(tmp_path, "exp", "version_0", "metrics.csv")
    assert sink.metrics_path == path
    header, rows = read_rows(path)
    assert header == ["step", "train/loss", "lr", "val/loss", "epoch"]
    assert [int(r["step"]) for r in rows] == [0, 50, 60]
    assert float(rows[1]["train/loss"]) == 1.0 / 3.0  # every bit kept
    assert rows[0]["val/loss"] == "" and rows[1]["val/loss"] == "0.75"
    assert rows[2]["epoch"] == "1" and rows[2]["lr"] == ""


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_round_trip(tmp_path, value):
    sink = CSVLogger(log_dir=tmp_path)
    sink.log_metrics({"loss": value}, 3)
    sink.finalize("failed")
    _, rows = read_rows(sink.metrics_path)
    back = float(rows[0]["loss"])
    assert (math.isnan(back) and math.isnan(value)) or back == value


def test_rows_are_buffered_until_flush_every(tmp_path):
    sink = CSVLogger(log_dir=tmp_path, flush_every=3)
    sink.log_metrics({"a": 1.0}, 1)
    sink.log_metrics({"a": 2.0}, 2)
    assert not os.path.exists(sink.metrics_path)
    sink.log_metrics({"a": 3.0}, 3)
    assert [r["a"] for r in read_rows(sink.metrics_path)[1]] == ["1.0", "2.0", "3.0"]
    sink.log_metrics({"a": 4.0}, 4)  # appended at finalize, same header
    sink.finalize("finished")
    assert [r["step"] for r in read_rows(sink.metrics_path)[1]] == ["1", "2", "3", "4"]


def test_new_key_rewrites_the_header_and_keeps_rows(tmp_path):
    sink = CSVLogger(log_dir=tmp_path, flush_every=1)
    sink.log_metrics({"train/loss": 1.0}, 1)
    sink.log_metrics({"train/loss": 0.5}, 2)
    assert read_rows(sink.metrics_path)[0] == ["step", "train/loss"]
    sink.log_metrics({"train/loss": 0.25, "val/acc": 0.875}, 3)
    sink.finalize("finished")

    header, rows = read_rows(sink.metrics_path)
    assert header == ["step", "train/loss", "val/acc"]
    assert [(r["step"], r["train/loss"], r["val/acc"]) for r in rows] == [
        ("1", "1.0", ""),
        ("2", "0.5", ""),
        ("3", "0.25", "0.875"),
    ]
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv"]  # no temporary file left


def test_rewrite_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    sink = CSVLogger(log_dir=tmp_path, flush_every=1)
    sink.log_metrics({"a": 1.0}, 1)
    before = Path(sink.metrics_path).read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        sink.log_metrics({"a": 2.0, "b": 3.0}, 2)
    assert Path(sink.metrics_path).read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv"]


def test_existing_file_is_continued(tmp_path):
    first = CSVLogger(log_dir=tmp_path)
    first.log_metrics({"a": 1.0, "b": 2.0}, 1)
    first.finalize("interrupted")
    resumed = CSVLogger(log_dir=tmp_path)
    resumed.log_metrics({"b": 3.0}, 2)
    resumed.log_metrics({"c": 4.0}, 3)
    resumed.finalize("finished")

    header, rows = read_rows(resumed.metrics_path)
    assert header == ["step", "a", "b", "c"]
    assert [(r["step"], r["a"], r["b"], r["c"]) for r in rows] == [
        ("1", "1.0", "2.0", ""),
        ("2", "", "3.0", ""),
        ("3", "", "", "4.0"),
    ]


def test_finalize_is_idempotent_and_logging_may_continue(tmp_path):
    sink = CSVLogger(log_dir=tmp_path)
    sink.log_metrics({"a": 1.0}, 1)
    sink.finalize("finished")
    content = Path(sink.metrics_path).read_text()
    sink.finalize("finished")
    assert Path(sink.metrics_path).read_text() == content
    sink.log_metrics({"test/a": 2.0}, 2)
    sink.finalize("finished")
    assert [r["test/a"] for r in read_rows(sink.metrics_path)[1]] == ["", "2.0"]


def test_hparams_yaml_merges_calls_and_records_metrics(tmp_path):
    sink = CSVLogger(log_dir=tmp_path)
    sink.log_metrics({"val/loss": 0.9}, 7)
    sink.log_hparams({"model": {"width": 64}, "lr": 0.1})
    sink.log_hparams({"lr": 0.2, "wd": float("nan")}, {"val/loss": 0.5})
    sink.finalize("finished")

    stored = read_hparams_file(os.path.join(tmp_path, "hparams.yaml"))
    assert stored["model"] == {"width": 64} and stored["lr"] == 0.2
    assert math.isnan(stored["wd"])
    assert [(r["step"], r["val/loss"]) for r in read_rows(sink.metrics_path)[1]] == [
        ("7", "0.9"),
        ("7", "0.5"),
    ]


def test_step_is_a_reserved_key(tmp_path):
    sink = CSVLogger(log_dir=tmp_path)
    with pytest.raises(ConfigError, match="'step'"):
        sink.log_metrics({"step": 1.0}, 1)


def test_rank_one_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")
    sink = CSVLogger(tmp_path, flush_every=1)
    sink.log_metrics({"a": 1.0}, 1)
    sink.log_hparams({"lr": 0.1})
    sink.finalize("finished")
    assert sink.metrics_path is None and sink.log_dir is None
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [({"flush_every": 0}, "flush_every"), ({"filename": "a/b.csv"}, "filename")],
)
def test_bad_options_name_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        CSVLogger(tmp_path, **kwargs)
