"""ConsoleLogger lines and the end-of-evaluation table."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fnloop.errors import ConfigError
from fnloop.loggers import ConsoleLogger, format_metrics_table, format_value
from fnloop.loggers.rank import RANK_ENV_VARS


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    for var in RANK_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def test_one_compact_line_per_call():
    out = io.StringIO()
    sink = ConsoleLogger(stream=out)
    sink.log_metrics({"train/loss": 0.123456, "lr": 1e-5, "epoch": 2}, 50)
    sink.log_metrics({"train/loss": torch.tensor(math.nan)}, 100)
    sink.finalize("finished")
    assert out.getvalue().splitlines() == [
        "step 50  train/loss=0.1235  lr=1e-05  epoch=2",
        "step 100  train/loss=nan",
    ]


def test_every_prints_one_call_out_of_n():
    out = io.StringIO()
    sink = ConsoleLogger(every=3, stream=out)
    for step in range(7):
        sink.log_metrics({"a": 1.0}, step)
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["0", "3", "6"]


def test_default_stream_is_stdout_at_print_time(capsys):
    sink = ConsoleLogger()
    sink.log_metrics({"a": 0.5}, 1)
    assert capsys.readouterr().out == "step 1  a=0.5\n"


def test_hparams_print_nothing_and_log_dir_is_none():
    out = io.StringIO()
    sink = ConsoleLogger(stream=out)
    sink.log_hparams({"lr": 0.1}, {"a": 1.0})
    assert out.getvalue() == "" and sink.log_dir is None


def test_rank_one_prints_nothing(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    out = io.StringIO()
    ConsoleLogger(stream=out).log_metrics({"a": 1.0}, 1)
    assert out.getvalue() == ""


def test_bad_every_names_the_flag():
    with pytest.raises(ConfigError, match="every"):
        ConsoleLogger(every=0)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.5, "0.5"), (3, "3"), (1234567.0, "1.235e+06"), (math.nan, "nan"), (-math.inf, "-inf")],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_table_columns_are_aligned():
    table = format_metrics_table(
        {"test/loss": 0.25, "test/accuracy": 0.9876543, "test/inf": math.inf, "n": 10},
        "Test",
    )
    lines = table.splitlines()
    assert lines[1].split("|")[1].strip() == "Test"
    assert len({len(line) for line in lines}) == 1  # every line as wide as the others
    bars = {tuple(i for i, c in enumerate(line) if c in "|+") for line in lines}
    assert len(bars) == 1  # column separators line up
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines[3:-1]}
    assert rows == {"test/loss": "0.25", "test/accuracy": "0.987654", "test/inf": "inf", "n": "10"}
    assert list(rows) == ["test/loss", "test/accuracy", "test/inf", "n"]  # order kept
    assert not table.endswith("\n")


def test_table_with_no_metrics_has_only_the_header():
    assert len(format_metrics_table({}, "Validate").splitlines()) == 4
