"""Sweeps from the command line: a list where the optimizer (or its schedule) takes a number is
one member per value, trained in one fit as a stacked state; fit reports every member and the
best one. In-process checks of the config helpers, and the real console script on digits."""

from __future__ import annotations

import pathlib
import re
import sys

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.cli.sweep import MemberRecord, build_sweep, initial_state, monitored, report, swept
from fnloop.errors import ConfigError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_cli import ROOT, fnloop  # noqa: E402

SWEEP = str(ROOT / "examples" / "sweep_digits.yaml")
MEMBER = re.compile(r"^sweep member (\d): lr=(\S+)  best val/loss (\d\.\d{4})  test accuracy (\d\.\d{4})$", re.M)


@pytest.mark.parametrize(
    ("fn", "kwargs", "expected"),
    [
        (flo.adamw, {"lr": [0.1, 0.2], "weight_decay": 0.1}, ["lr"]),
        (flo.adamw, {"lr": 0.1, "betas": [0.9, 0.99]}, []),  # one value of a sequence argument
        (flo.adamw, {"betas": [[0.9, 0.99], [0.8, 0.9]]}, ["betas"]),
        (flo.multistep, {"lr": 0.1, "milestones": [10, 20], "gamma": [0.1, 0.5]}, ["gamma"]),
    ],
)
def test_swept_keys(fn, kwargs, expected):
    assert list(swept(fn, kwargs)) == expected


def test_each_member_is_the_injected_optimizer_of_its_values():
    txs, members = build_sweep(
        {"name": "adamw", "lr": [1e-3, 1e-2], "betas": [[0.9, 0.99], [0.8, 0.9]], "weight_decay": 0.01},
        "warmup_cosine",
        {"warmup_steps": 4, "decay_steps": 10, "end_lr": [0.0, 1e-4]},
    )
    assert members[1] == {"optimizer.lr": 1e-2, "optimizer.betas": [0.8, 0.9], "schedule.init_args.end_lr": 1e-4}
    state = initial_state(torch.nn.Linear(3, 2), txs, seed=0)
    values = fl.sweep_values(state)
    assert values[1] == {"lr.peak_lr": 1e-2, "lr.end_lr": 1e-4, "lr.init_lr": 0.0, "betas.0": 0.8, "betas.1": 0.9, "weight_decay": 0.01}
    assert values[0]["lr.peak_lr"] == 1e-3 and values[0]["betas.1"] == 0.99
    assert build_sweep({"name": "adamw", "lr": 1e-3}) is None


@pytest.mark.parametrize(
    ("optimizer", "schedule", "words"),
    [
        ({"name": "adamw", "lr": [1e-3, 1e-2], "amsgrad": [True, False]}, None, ["optimizer.amsgrad", "cannot be swept"]),
        ({"name": "adamw", "lr": [1e-3, 1e-2]}, ("warmup_cosine", {"warmup_steps": [1, 2], "decay_steps": 9}), ["schedule.init_args.warmup_steps", "cannot be swept"]),
        ({"name": "sgd", "lr": [0.1, 0.2], "momentum": [0.9]}, None, ["optimizer.momentum lists 1 values", "one length"]),
        ({"name": "sgd", "lr": []}, None, ["optimizer.lr=[]"]),
        ({"name": "sgd", "lr": [0.1, -0.2]}, None, ["sweep member 1", "lr=-0.2", "non-negative"]),
    ],
)
def test_sweep_config_errors_name_the_key(optimizer, schedule, words):
    name, args = schedule or (None, None)
    with pytest.raises(ConfigError) as err:
        build_sweep(optimizer, name, args)
    for word in words:
        assert word in str(err.value)


def test_report_ranks_by_the_monitored_metric_else_test_accuracy(capsys):
    members = [{"optimizer.lr": 0.1}, {"optimizer.lr": 0.01}, {"optimizer.lr": 0.001}]
    record = MemberRecord(*monitored({"monitor": "val/acc", "mode": "max"}, []))
    for values in ([0.5, 0.7, 0.6], [0.4, 0.65, 0.8]):
        record.on_validation_end(None, {f"val/acc/member_{i}": v for i, v in enumerate(values)} | {"val/acc": 0.6})
    assert record.best == {0: 0.5, 1: 0.7, 2: 0.8}
    assert report(members, record, None) == 2
    by_test = MemberRecord("val/loss", "min")
    assert report(members, by_test, {f"test/acc/member_{i}": a for i, a in enumerate([0.8, 0.95, 0.9])}) == 1
    out = capsys.readouterr().out
    assert "best member: 2 (lr=0.001) by val/acc 0.8000" in out
    assert "best member: 1 (lr=0.01) by test accuracy 0.9500" in out
    assert monitored(None, [fl.EarlyStopping("val/acc", mode="max")]) == ("val/acc", "max")


def test_fit_sweeps_8_learning_rates_in_one_run(tmp_path):
    proc = fnloop(["fit", "--config", SWEEP, "--trainer.max_epochs", "2"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "a sweep of 8 members trained as one stacked state" in out
    rows = MEMBER.findall(out)
    assert [int(r[0]) for r in rows] == list(range(8))
    assert [float(r[1]) for r in rows] == [1e-4, 3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 3e-2]
    losses = [float(r[2]) for r in rows]
    best = min(range(8), key=lambda i: losses[i])
    assert f"best member: {best} (lr={rows[best][1]}) by val/loss {losses[best]:.4f}" in out
    assert max(float(r[3]) for r in rows) > 0.8  # two epochs are enough for the good learning rates
    assert losses[0] > losses[best]  # 1e-4 is too small to get far in two epochs
    run = tmp_path / "runs" / "sweep_digits" / "version_0"
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val/loss/member_7" in header


def test_a_config_without_lists_builds_one_plain_state():
    state = initial_state(torch.nn.Linear(3, 2), flo.sgd(lr=0.1), seed=0)  # a transform is a (named) tuple
    assert state.params["weight"].shape == (2, 3)
    assert state.step.ndim == 0
