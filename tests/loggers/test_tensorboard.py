"""TensorBoardLogger: event files read back with TensorBoard's own reader."""

from __future__ import annotations

import math
import os
import struct

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fnloop.errors import ConfigError
from fnloop.loggers import TensorBoardLogger
from fnloop.loggers.hparams import read_hparams_file
from fnloop.loggers.rank import RANK_ENV_VARS

# (step, metrics) in the order a training run logs them: val/loss only at some steps.
SCENARIO = [
    (0, {"train/loss": 2.5, "lr": 0.1}),
    (50, {"train/loss": 1.25, "lr": 0.1}),
    (100, {"train/loss": 0.625, "lr": 0.05, "val/loss": 0.75}),
    (150, {"train/loss": 0.5, "lr": 0.05}),
    (200, {"train/loss": 0.25, "lr": 0.025, "val/loss": 0.5}),
]


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    for var in RANK_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def read_events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def series(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def f32(value: float) -> float:
    """TensorBoard stores scalars as float32."""
    return struct.unpack("f", struct.pack("f", value))[0]


def expected(tag: str) -> list[tuple[int, float]]:
    return [(step, f32(m[tag])) for step, m in SCENARIO if tag in m]


def test_scalars_round_trip_through_tensorboard_reader(tmp_path):
    sink = TensorBoardLogger(tmp_path, "exp")
    for step, metrics in SCENARIO:
        sink.log_metrics(metrics, step)
    sink.finalize("finished")

    assert sink.log_dir == os.path.join(tmp_path, "exp", "version_0")
    acc = read_events(sink.log_dir)
    assert sorted(acc.Tags()["scalars"]) == ["lr", "train/loss", "val/loss"]
    for tag in ("train/loss", "val/loss", "lr"):
        assert series(acc, tag) == expected(tag)


def test_tensor_values_and_non_finite_values(tmp_path):
    import torch

    sink = TensorBoardLogger(log_dir=tmp_path)
    sink.log_metrics({"loss": torch.tensor(0.5), "bad": float("nan")}, 1)
    sink.log_metrics({"loss": torch.tensor([0.25]), "bad": float("inf")}, 2)
    sink.log_metrics({"bad": float("-inf")}, 3)
    sink.finalize("failed")

    acc = read_events(str(tmp_path))
    assert series(acc, "loss") == [(1, 0.5), (2, 0.25)]
    bad = [v for _, v in series(acc, "bad")]
    assert math.isnan(bad[0]) and bad[1] == math.inf and bad[2] == -math.inf


def test_logging_after_finalize_keeps_earlier_events(tmp_path):
    # fit, then test with the same sink: the second writer must not overwrite the first file
    sink = TensorBoardLogger(log_dir=tmp_path)
    for step in range(3):
        sink.log_metrics({"train/loss": float(step)}, step)
    sink.finalize("finished")
    sink.finalize("finished")  # idempotent
    sink.log_metrics({"test/loss": 7.0}, 3)
    sink.finalize("finished")

    files = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
    assert len(files) == 2
    acc = read_events(str(tmp_path))
    assert series(acc, "train/loss") == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert series(acc, "test/loss") == [(3, 7.0)]


def hparams_plugin(acc: EventAccumulator) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    content = acc.PluginTagToContent("hparams")
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}


def test_hparams_are_readable_by_the_hparams_plugin(tmp_path):
    sink = TensorBoardLogger(log_dir=tmp_path)
    params = {
        "optim": {"lr": 0.1, "betas": (0.9, 0.99)},
        "layers": 3,
        "act": "relu",
        "amp": False,
        "ckpt": None,
    }
    sink.log_metrics({"val/loss": 0.9}, 10)
    sink.log_hparams(params, {"val/loss": 0.5})
    sink.finalize("finished")

    plugin = hparams_plugin(read_events(str(tmp_path)))
    hp = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert hp["optim.lr"].number_value == 0.1  # hparams are float64
    assert hp["optim.betas"].string_value == "[0.9, 0.99]"
    assert hp["layers"].number_value == 3
    assert hp["act"].string_value == "relu"
    assert hp["amp"].bool_value is False
    assert hp["ckpt"].string_value == "None"
    experiment = plugin["_hparams_/experiment"].experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/loss"]
    end = plugin["_hparams_/session_end_info"].session_end_info
    assert end.status == 1  # STATUS_SUCCESS
    # the hparams metrics land on the last step logged
    assert series(read_events(str(tmp_path)), "val/loss") == [(10, f32(0.9)), (10, 0.5)]
    # and the same params are in hparams.yaml
    stored = read_hparams_file(os.path.join(tmp_path, "hparams.yaml"))
    assert stored == {**params, "optim": {"lr": 0.1, "betas": [0.9, 0.99]}}


@pytest.mark.parametrize(("status", "code"), [("failed", 2), ("interrupted", 0)])
def test_session_end_status(tmp_path, status, code):
    sink = TensorBoardLogger(log_dir=tmp_path)
    sink.log_hparams({"lr": 0.1})
    sink.finalize(status)
    plugin = hparams_plugin(read_events(str(tmp_path)))
    assert plugin["_hparams_/session_end_info"].session_end_info.status == code


def test_nothing_is_created_before_the_first_write(tmp_path):
    sink = TensorBoardLogger(tmp_path, "exp")
    sink.finalize("finished")
    assert os.listdir(tmp_path) == []


def test_rank_one_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    sink = TensorBoardLogger(tmp_path, "exp")
    sink.log_metrics({"loss": 1.0}, 0)
    sink.log_hparams({"lr": 0.1}, {"loss": 1.0})
    sink.finalize("finished")
    assert sink.log_dir is None and sink.writer is None
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs", [{"flush_secs": 0}, {"max_queue": 0}, {"version": -1}])
def test_bad_options_name_the_flag(tmp_path, kwargs):
    flag = next(iter(kwargs))
    with pytest.raises(ConfigError, match=flag):
        TensorBoardLogger(tmp_path, **kwargs)


def test_writer_adds_what_the_sink_does_not_wrap_beside_its_scalars(tmp_path):
    sink = TensorBoardLogger(log_dir=tmp_path)
    sink.log_metrics({"train/loss": 1.5}, 4)
    sink.writer.add_scalar("extra/grad_norm", 2.0, 4)
    sink.writer.add_text("notes", "hello", 4)
    sink.flush()
    sink.finalize("finished")
    acc = read_events(str(tmp_path))
    assert series(acc, "train/loss") == [(4, 1.5)]
    assert series(acc, "extra/grad_norm") == [(4, 2.0)]
    assert sink._writer is None and sink._events is None  # both files closed
