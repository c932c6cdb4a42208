"""examples/custom_loop.py: the hand-written loop trains, and its checkpoint resumes bitwise."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_trees_equal

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("custom_loop")


@pytest.fixture(scope="module")
def trained_a_little(example):
    """A state after 5 steps on the first batches of epoch 0, the step, and the next 2 batches."""
    train, _ = example["make_data"](0)
    batches = example["epoch_batches"](train, batch_size=32, seed=0, epoch=0)
    state = fl.TrainState.create(example["make_model"](), flo.adamw(1e-3), seed=0)
    step = fl.train_step(example["loss_fn"])
    return example["run_steps"](state, step, batches[:5]), step, batches[5:7]


def test_quick_run_learns_and_resumes_bitwise(example, capsys, tmp_path):
    acc = example["main"](["--quick", "--ckpt-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert acc >= 0.85  # chance is 0.10 on 10 balanced classes
    assert "the restored run matches bitwise for 2 more steps" in out
    assert f"validation accuracy: {acc:.4f}" in out
    assert len(list(tmp_path.glob("ckpt-*/meta.json"))) == 1  # the mid-run checkpoint was committed


def test_restore_continues_bitwise_and_the_check_sees_a_difference(example, trained_a_little, tmp_path):
    state, step, next_batches = trained_a_little
    restored = example["save_restore_and_check"](state, step, next_batches, str(tmp_path / "ckpt"))
    assert_trees_equal(restored, state)
    # the continuation depends on the restored RNG key (dropout): a wrong key is caught
    other = restored.replace(rng=restored.rng + 1)
    with pytest.raises(AssertionError, match="params"):
        assert_trees_equal(
            example["run_steps"](other, step, next_batches), example["run_steps"](state, step, next_batches)
        )


def test_epoch_batches_are_a_pure_function_of_seed_and_epoch(example):
    train, _ = example["make_data"](0)
    before = torch.get_rng_state()
    a = example["epoch_batches"](train, batch_size=32, seed=0, epoch=3)
    b = example["epoch_batches"](train, batch_size=32, seed=0, epoch=3)
    c = example["epoch_batches"](train, batch_size=32, seed=0, epoch=4)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(train[1].tolist())  # every sample once


def test_compiled_steps_train_from_the_command_line():
    # a process of its own: dynamo looks the loss function's module up by name, as a script has it
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "custom_loop.py"), "--quick", "--epochs", "2", "--compile",
         "--backend", "eager"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "matches bitwise" in proc.stdout
    acc = float(re.search(r"validation accuracy: ([0-9.]+)", proc.stdout).group(1))
    assert acc >= 0.6


def test_epochs_below_two_is_refused(example, capsys):
    with pytest.raises(SystemExit):
        example["main"](["--epochs", "1"])
    assert "--epochs=1" in capsys.readouterr().err
