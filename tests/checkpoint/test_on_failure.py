"""Checkpoint on failure and ``Trainer(enable_checkpointing=...)``.

An exception inside ``fit`` saves the last consistent state through the ``ModelCheckpoint``
before it propagates; ``ckpt_path="last"`` then resumes bitwise onto the uninterrupted run.
A save that fails at that moment never hides the original exception.

Scenario: linear regression in batches of 4 (6 batches an epoch, 3 epochs), Adam, validation
every epoch, a ``memory://`` checkpoint folder per example.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop.checkpoint import CheckpointManager, ModelCheckpoint, read_meta
from fnloop.errors import ConfigError
from fnloop.testing import assert_trees_equal

W = torch.tensor([[1.5], [-2.0], [0.5]])
EPOCHS, BATCHES = 3, 6


def _data(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(x, x @ W) for x in (torch.randn(4, 3, generator=g) for _ in range(n))]


TRAIN, VAL = _data(BATCHES, 0), _data(2, 1)


def _mse(model: Any, batch: Any) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


class Boom(RuntimeError):
    """The failure the tests inject."""


class FailingLoss:
    """``_mse`` that raises on its ``at``-th call (1-based)."""

    def __init__(self, at: int | None) -> None:
        self.at, self.calls = at, 0

    def __call__(self, model: Any, batch: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            raise Boom(f"loss_fn failed at call {self.calls}")
        return _mse(model, batch)


class FailAfter(fl.Callback):
    """Raises after training batch ``at`` (1-based, over epochs)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> None:
        if state.loop.total_batch_idx == self.at:
            raise Boom(f"callback failed after batch {self.at}")


def _state() -> fl.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
    return fl.TrainState.create(model, flo.adam(lr=0.05), seed=1)


def _fit(loss: Any = _mse, *callbacks: fl.Callback, checkpoint: Any = None, **options: Any) -> fl.TrainState:
    trainer = fl.Trainer(max_epochs=EPOCHS, enable_progress_bar=False, num_sanity_val_steps=0, callbacks=list(callbacks))
    return trainer.fit(_state(), fl.train_step(loss), TRAIN, val_step=fl.eval_step(_mse), val_data=VAL,
                       checkpoint=checkpoint, **options)


def _memory_url() -> str:
    return f"memory://fnloop-tests/on-failure/{uuid.uuid4().hex}"


def _assert_resumed_equals(final: fl.TrainState, reference: fl.TrainState) -> None:
    for name in ("step", "params", "buffers", "opt_state", "rng"):
        assert_trees_equal(getattr(final, name), getattr(reference, name), msg=name)
    for name in ("epoch", "global_step", "total_batch_idx", "samples_seen", "val_count", "status"):
        assert getattr(final.loop, name) == getattr(reference.loop, name), name


@functools.cache
def _reference() -> fl.TrainState:
    """The uninterrupted run."""
    return _fit()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(at=st.integers(1, EPOCHS * BATCHES), where=st.sampled_from(["loss_fn", "callback"]), async_save=st.booleans())
def test_a_failure_at_any_step_saves_and_resumes_bitwise(at, where, async_save):
    url = _memory_url()
    manager = CheckpointManager(url, keep_last=2, every_n_steps=5, async_save=async_save)
    failing = (FailingLoss(at),) if where == "loss_fn" else (_mse, FailAfter(at))
    with pytest.raises(Boom):
        _fit(*failing, checkpoint=manager)
    manager.close()
    done = at - 1 if where == "loss_fn" else at  # batches finished before the failure
    if done > 0:
        latest = read_meta(CheckpointManager(url).latest())
        loop = {e["path"][5:]: e["value"] for e in latest["leaves"] if e["path"].startswith("loop/") and e["kind"] == "value"}
        saved_by_trigger = where == "loss_fn" and done % 5 == 0  # the same state, saved before: not again
        assert loop["status"] == ("running" if saved_by_trigger else "failed") and loop["total_batch_idx"] == done
    resumed = CheckpointManager(url, keep_last=2, every_n_steps=5)
    final = _fit(_mse, checkpoint=resumed, ckpt_path="last") if done > 0 else _fit(_mse, checkpoint=resumed)
    _assert_resumed_equals(final, _reference())


def test_a_failure_before_the_first_step_saves_nothing():
    url = _memory_url()
    with pytest.raises(Boom):
        _fit(FailingLoss(1), checkpoint=CheckpointManager(url))
    assert CheckpointManager(url).all() == []


def test_a_failing_save_does_not_hide_the_exception(caplog, monkeypatch):
    manager = CheckpointManager(_memory_url(), every_n_steps=100)

    def broken(*args: Any, **kwargs: Any) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(manager, "save", broken)
    with caplog.at_level(logging.ERROR, logger="fnloop.checkpoint"), pytest.raises(Boom) as err:
        _fit(FailingLoss(4), checkpoint=manager)
    assert "disk full" in caplog.text and "saving the state at failure" in caplog.text
    if hasattr(BaseException, "add_note"):  # Python 3.11+: the note travels with the exception
        assert any("disk full" in n for n in err.value.__notes__)


def test_enable_checkpointing_false_saves_nothing(tmp_path):
    trainer = fl.Trainer(
        max_epochs=1, enable_progress_bar=False, enable_checkpointing=False, logger=False, default_root_dir=str(tmp_path)
    )
    state = trainer.fit(_state(), fl.train_step(_mse), TRAIN)
    assert state.loop.status == "finished" and os.listdir(tmp_path) == []
    with pytest.raises(ConfigError, match="enable_checkpointing=False"):
        fl.Trainer(enable_checkpointing=False, callbacks=[ModelCheckpoint(_memory_url())])
    with pytest.raises(ConfigError, match="enable_checkpointing=False"):
        trainer.fit(_state(), fl.train_step(_mse), TRAIN, checkpoint=CheckpointManager(_memory_url()))
    with pytest.raises(ConfigError, match="enable_checkpointing=1"):
        fl.Trainer(enable_checkpointing=1)


def test_enable_checkpointing_true_adds_a_default_checkpoint(tmp_path):
    trainer = fl.Trainer(
        max_epochs=2, enable_progress_bar=False, enable_checkpointing=True, logger=False, default_root_dir=str(tmp_path)
    )
    state = trainer.fit(_state(), fl.train_step(_mse), TRAIN)
    manager = CheckpointManager(str(tmp_path / "checkpoints"))
    assert [os.path.basename(u) for u in manager.all()] == ["step-00000012"]  # the latest epoch only
    assert_trees_equal(manager.restore("last", like=_state()).params, state.params)
    untouched = fl.Trainer(max_epochs=1, enable_progress_bar=False, logger=False, default_root_dir=str(tmp_path / "default"))
    untouched.fit(_state(), fl.train_step(_mse), TRAIN)
    assert not (tmp_path / "default").exists()  # None (the default): no file unless asked
