"""``fnloop <stage> --help``: short enough to read, no torch internals listed, every Trainer flag
described from the Trainer docstring; errors name the key the user typed."""

from __future__ import annotations

import dataclasses
import pytest

import fnloop as fl
from fnloop.cli.optimizer import build_optimizer
from fnloop.cli.parser import build_parser
from fnloop.errors import ConfigError


@pytest.fixture(scope="module")
def fit_help():
    return build_parser().stage_parsers["fit"].format_help()


def test_help_is_short_and_lists_no_torch_internals(fit_help):
    lines = fit_help.splitlines()
    assert len(lines) < 250
    assert "known subclasses" not in fit_help and "torch.ao." not in fit_help
    assert lines[0].startswith("usage: fnloop fit --config CONFIG")


def test_every_trainer_flag_has_a_description(fit_help):
    actions = {a.dest: a for a in build_parser().stage_parsers["fit"]._actions}
    flags = [f.name for f in dataclasses.fields(fl.Trainer) if f.name != "logger"]
    missing = [f for f in flags if not (actions.get(f"trainer.{f}") and (actions[f"trainer.{f}"].help or "").strip())]
    assert missing == []
    for flag in flags:
        assert f"--trainer.{flag} " in fit_help or f"--trainer.{flag}\n" in fit_help


def test_the_trainer_group_heading_is_a_whole_sentence(fit_help):
    assert "The driver's flags, with Lightning's names and meanings:" in fit_help


@pytest.mark.parametrize("schedule", [None, "warmup_cosine"])
def test_a_bad_optimizer_lr_names_optimizer_lr(schedule):
    with pytest.raises(ConfigError) as err:
        build_optimizer({"name": "adamw", "lr": "fast"}, schedule, {"warmup_steps": 2, "decay_steps": 10})
    assert "optimizer.lr" in str(err.value) and "peak_lr" not in str(err.value)
