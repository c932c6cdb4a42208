"""Values handed to sinks: metric scalars, hyperparameters made plain and flat, ranks."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnloop.errors import ConfigError
from fnloop.loggers import (
    flatten_hparams,
    global_rank,
    read_hparams_file,
    scalar_metrics,
    to_plain,
    to_scalar,
    write_hparams_file,
)
from fnloop.loggers.rank import RANK_ENV_VARS


@pytest.fixture(autouse=True)
def no_rank(monkeypatch):
    for var in RANK_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(
    ("value", "expected", "kind"),
    [
        (0.5, 0.5, float),
        (3, 3, int),
        (True, 1, int),
        (torch.tensor(0.25), 0.25, float),
        (torch.tensor([2.0]), 2.0, float),
        (torch.tensor(7), 7.0, float),
        (np.float32(0.5), 0.5, float),
        (np.int64(4), 4, int),
    ],
)
def test_to_scalar(value, expected, kind):
    out = to_scalar(value)
    assert out == expected and type(out) is kind


@pytest.mark.parametrize("value", ["text", None, torch.ones(2), [1.0]])
def test_to_scalar_rejects_non_numbers_naming_the_key(value):
    with pytest.raises(ConfigError, match="'my/key'"):
        scalar_metrics({"my/key": value})


def test_scalar_metrics_keeps_non_finite_values():
    out = scalar_metrics({"a": torch.tensor(float("nan")), "b": -math.inf})
    assert math.isnan(out["a"]) and out["b"] == -math.inf


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class OptimConfig:
    lr: float = 0.1
    betas: tuple = (0.9, 0.99)


def test_to_plain_makes_yaml_safe_values():
    plain = to_plain(
        {
            "optim": OptimConfig(),
            "ns": argparse.Namespace(depth=3),
            "color": Color.RED,
            "path": Path("/data"),
            "fn": math.sqrt,
            "cls": OptimConfig,
            "t": torch.tensor([1, 2]),
            "tags": {"b", "a"},
            1: "int key",
            "obj": object,
        }
    )
    assert plain == {
        "optim": {"lr": 0.1, "betas": [0.9, 0.99]},
        "ns": {"depth": 3},
        "color": "red",
        "path": "/data",
        "fn": "sqrt",
        "cls": "OptimConfig",
        "t": [1, 2],
        "tags": ["a", "b"],
        "1": "int key",
        "obj": "object",
    }


def test_flatten_hparams_for_tensorboard():
    flat = flatten_hparams(
        {"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None, "f": math.inf, "g": True, "h": "x"}
    )
    assert flat == {"a.b.c": 1, "a.d": "[1, 2]", "e": "None", "f": "inf", "g": True, "h": "x"}
    assert flatten_hparams({"a": {"b": 1}}, sep="/") == {"a/b": 1}


plain_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(), plain_values, max_size=4))
def test_hparams_file_round_trip(tmp_path_factory, params):
    path = tmp_path_factory.mktemp("hp") / "hparams.yaml"
    write_hparams_file(path, params)
    assert read_hparams_file(path) == params
    assert os.listdir(path.parent) == ["hparams.yaml"]


def test_hparams_file_keeps_non_finite_floats(tmp_path):
    write_hparams_file(tmp_path / "h.yaml", {"a": math.nan, "b": -math.inf})
    back = read_hparams_file(tmp_path / "h.yaml")
    assert math.isnan(back["a"]) and back["b"] == -math.inf


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"RANK": "2", "SLURM_PROCID": "5", "LOCAL_RANK": "1"}, 2),
        ({"SLURM_PROCID": "5", "LOCAL_RANK": "1"}, 5),
        ({"LOCAL_RANK": "1"}, 1),
        ({"RANK": "", "LOCAL_RANK": "3"}, 3),
    ],
)
def test_global_rank_reads_the_launcher_env(monkeypatch, env, rank):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert global_rank() == rank


@pytest.mark.parametrize("value", ["abc", "-1"])
def test_bad_rank_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("RANK", value)
    with pytest.raises(ConfigError, match="RANK="):
        global_rank()
