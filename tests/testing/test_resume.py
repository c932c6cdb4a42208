"""assert_resume_equivalent: passes on exact resumes, fails when a resume is not exact."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_resume_equivalent


def _make():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    return fl.TrainState.create(model, flo.adamw(flo.warmup_cosine(1e-2, warmup_steps=2, decay_steps=20)), seed=1)


STEP = fl.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
DATA = DataLoader(TensorDataset(torch.randn(40, 3), torch.randn(40, 1)), batch_size=8, shuffle=True)


def test_exact_resume_passes_with_shuffling_dropout_and_accumulation():
    trainer = fl.Trainer(max_epochs=2, accumulate_grad_batches=2, enable_progress_bar=False)
    final = assert_resume_equivalent(trainer, _make, STEP, DATA, interrupt_at=[1, 5, 7])
    assert final.loop.global_step == 6  # 5 batches per epoch, accumulation 2 -> 3 steps per epoch


def test_a_run_that_is_never_interrupted_is_reported():
    trainer = fl.Trainer(max_epochs=1, enable_progress_bar=False)
    with pytest.raises(AssertionError, match="not interrupted at batch 99"):
        assert_resume_equivalent(trainer, _make, STEP, DATA, interrupt_at=[99])


def test_an_inexact_resume_is_caught():
    calls = [0]

    def impure(model, batch):  # depends on a Python counter outside the state: not resumable
        calls[0] += 1
        scale = 2.0 if calls[0] % 3 == 0 else 1.0
        return scale * torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    trainer = fl.Trainer(max_epochs=1, enable_progress_bar=False)
    with pytest.raises(AssertionError, match="resumed after an interruption at batch 2"):
        assert_resume_equivalent(trainer, _make, fl.train_step(impure), DATA, interrupt_at=[2])
