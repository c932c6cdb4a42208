"""Nothing blocks or runs away: special files and oversized or exploding configs are refused
before they are read, and the loops stop (or fail by name) when no batch arrives."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop.cli.config_file import MAX_CONFIG_BYTES, MAX_CONFIG_NODES, read_config_text
from fnloop.cli.run_folder import save_config
from fnloop.errors import ConfigError, FnloopError
from scenarios import cli, small_state, within


def _bomb(width: int, depth: int) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    for i in range(1, depth):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def _expanded(width: int, depth: int) -> int:
    """Nodes of the bomb once expanded: the root mapping, its keys, and each level's list."""
    size, total = 1 + width, 1
    for level in range(depth):
        total += 1 + size
        size = 1 + width * size
    return total


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 12), depth=st.integers(1, 9))
def test_alias_bombs_are_refused_unexpanded(tmp_path_factory, width, depth):
    path = tmp_path_factory.mktemp("bomb") / "bomb.yaml"
    path.write_text(_bomb(width, depth))
    if _expanded(width, depth) <= MAX_CONFIG_NODES // 2:
        assert read_config_text(str(path)).startswith("l0:")
    elif _expanded(width, depth) > 2 * MAX_CONFIG_NODES:
        with pytest.raises(ConfigError, match="bomb.yaml: expands to more than"):
            read_config_text(str(path))


@pytest.mark.parametrize("kind", ["fifo", "oversized", "deep", "bomb"])
def test_cli_refuses_a_config_that_would_block_or_explode(tmp_path, capsys, monkeypatch, kind):
    path = tmp_path / "config.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "oversized":
        path.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    elif kind == "deep":
        path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    else:
        path.write_text(_bomb(10, 9))
    code, err = cli(["fit", "--config", str(path)], tmp_path, capsys, monkeypatch)
    assert code == 2 and "config.yaml" in err and "Traceback" not in err, err


def test_run_folder_config_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="FIFO"):
        within(lambda: save_config(str(tmp_path), "seed: 0\n"))


def _fit_data(n: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 4, generator=g), torch.randn(2, 2, generator=g)) for _ in range(n)]


def _fit_state():
    state = small_state(flo.sgd(lr=1e-2), step=0)
    return state.replace(loop=state.loop.replace(global_step=0, epoch=0))


def _mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize(
    ("flags", "n"),
    [
        ({"max_steps": 5, "max_epochs": None, "limit_train_batches": 0}, 4),
        ({"max_steps": 5, "max_epochs": -1, "limit_train_batches": 0, "max_time": 30.0}, 4),
        ({"max_steps": 5, "max_epochs": None}, 0),
        ({"max_steps": -1, "max_epochs": 1000, "limit_train_batches": 0.0}, 4),
    ],
    ids=["limit-0", "limit-0-max_time", "empty-data", "limit-0.0-many-epochs"],
)
def test_fit_without_training_batches_stops_or_fails_by_name(flags, n):
    trainer = fl.Trainer(enable_progress_bar=False, **flags)
    try:
        state = within(lambda: trainer.fit(_fit_state(), fl.train_step(_mse), _fit_data(n)))
    except FnloopError as err:
        assert "batch" in str(err)
        return
    assert state.loop.status == "finished" and state.loop.global_step == 0
