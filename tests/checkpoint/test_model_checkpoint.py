"""``ModelCheckpoint`` inside ``Trainer.fit``, and resuming with ``ckpt_path``.

When it saves (optimizer steps, completed epochs, after validation when it has no trigger, at
the end), what it keeps (``keep_best`` by ``val/loss``), what a checkpoint holds (the loop
counters and the callback states, restored by ``ckpt_path="last"``), and where a resume reads
from (``"last"``, ``"best"``, a URL, a ``memory://`` folder).

Scenario: linear regression in batches of 4; validation data whose targets are the negated
training targets, so the validation loss rises as training goes on and the best checkpoint is
the first one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.checkpoint import CheckpointManager, ModelCheckpoint, read_meta
from fnloop.errors import CheckpointError
from fnloop.testing import assert_trees_equal

W = torch.tensor([[1.5], [-2.0], [0.5]])


def _data(n: int, *, seed: int, sign: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 3, generator=g)
        out.append((x, sign * (x @ W)))
    return out


TRAIN = _data(6, seed=0)
VAL = _data(2, seed=1, sign=-1.0)


def _mse(model: Any, batch: Any) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


STEP = fl.train_step(_mse)
VAL_STEP = fl.eval_step(_mse)


def _state(lr: float = 0.05) -> fl.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
    return fl.TrainState.create(model, flo.adam(lr=lr), seed=1)


def _trainer(*callbacks: fl.Callback, **flags: Any) -> fl.Trainer:
    flags.setdefault("max_epochs", 2)
    return fl.Trainer(enable_progress_bar=False, num_sanity_val_steps=0, callbacks=list(callbacks), **flags)


def _memory_url() -> str:
    return f"memory://fnloop-tests/model-checkpoint/{uuid.uuid4().hex}"


def _steps(mgr: CheckpointManager) -> list[int]:
    return [int(os.path.basename(u).split("-")[1]) for u in mgr.all()]


def _loop_of(url: str) -> dict[str, Any]:
    return {e["path"][5:]: e.get("value") for e in read_meta(url)["leaves"] if e["path"].startswith("loop/")}


class Probe(fl.Callback):
    """Records the loop state fit starts from and the metrics of every validation."""

    def __init__(self) -> None:
        self.start: Any = None
        self.validations: list[tuple[int, float]] = []

    def on_fit_start(self, state: Any) -> None:
        self.start = state.loop

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        self.validations.append((state.loop.global_step, metrics["val/loss"]))


class InterruptAt(fl.Callback):
    """Raises ``KeyboardInterrupt`` after training batch ``at`` (1-based, over epochs)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> None:
        if state.loop.total_batch_idx == self.at:
            raise KeyboardInterrupt


def _assert_same_training(actual: fl.TrainState, expected: fl.TrainState) -> None:
    for name in ("step", "params", "buffers", "opt_state", "rng"):
        assert_trees_equal(getattr(actual, name), getattr(expected, name), msg=name)


# --- when it saves -------------------------------------------------------------------------------


def test_every_n_steps_counts_optimizer_steps(tmp_path):
    """accumulate 2: 3 optimizer steps per epoch of 6 batches; a save at every 2nd optimizer step."""
    mgr = CheckpointManager(str(tmp_path), every_n_steps=2)
    state = _trainer(accumulate_grad_batches=2).fit(_state(), STEP, TRAIN, checkpoint=mgr)
    assert state.loop.global_step == 6
    assert _steps(mgr) == [2, 4, 6]
    for url, step in zip(mgr.all(), (2, 4, 6)):
        loop = _loop_of(url)
        assert loop["global_step"] == step and loop["total_batch_idx"] == 2 * step  # saved when the step happened


def test_save_last_adds_the_final_step_and_can_be_turned_off(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "on"), every_n_steps=4)
    _trainer().fit(_state(), STEP, TRAIN, checkpoint=mgr)
    assert _steps(mgr) == [4, 8, 12]
    mgr = CheckpointManager(str(tmp_path / "on5"), every_n_steps=5)
    state = _trainer().fit(_state(), STEP, TRAIN, checkpoint=mgr)
    assert _steps(mgr) == [5, 10, 12]
    final = _loop_of(mgr.latest())
    assert (final["global_step"], final["epoch"], final["batch_idx"]) == (12, 2, 0)
    assert final["status"] == state.loop.status == "finished"
    mgr = CheckpointManager(str(tmp_path / "off"), every_n_steps=5, save_last=False)
    _trainer().fit(_state(), STEP, TRAIN, checkpoint=mgr)
    assert _steps(mgr) == [5, 10]


def test_without_trigger_or_validation_only_the_end_is_saved(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "a"))
    _trainer(max_epochs=3).fit(_state(), STEP, TRAIN, checkpoint=mgr)
    assert _steps(mgr) == [18]
    mgr = CheckpointManager(str(tmp_path / "b"), save_last=False)
    _trainer(max_epochs=3).fit(_state(), STEP, TRAIN, checkpoint=mgr)
    assert _steps(mgr) == []


def test_every_n_epochs_saves_at_epoch_ends(tmp_path):
    mgr = CheckpointManager(str(tmp_path), every_n_epochs=2)
    _trainer(max_epochs=5).fit(_state(), STEP, TRAIN, checkpoint=mgr)
    assert _steps(mgr) == [12, 24, 30]  # epochs 2 and 4, and the end
    assert [_loop_of(u)["epoch"] for u in mgr.all()[:2]] == [2, 4]




def test_resuming_from_an_every_n_epochs_checkpoint_trains_the_next_epoch(tmp_path):
    mgr = CheckpointManager(str(tmp_path), every_n_epochs=1)
    _trainer(max_epochs=2).fit(_state(), STEP, TRAIN, checkpoint=mgr)
    first_epoch = mgr.all()[0]  # after epoch 1 of 2
    loop = _loop_of(first_epoch)
    assert (loop["epoch"], loop["global_step"]) == (1, 6)
    resumed = _trainer(max_epochs=3).fit(_state(), STEP, TRAIN, ckpt_path=first_epoch)
    reference = _trainer(max_epochs=3).fit(_state(), STEP, TRAIN)
    assert resumed.loop.global_step == reference.loop.global_step == 18
    _assert_same_training(resumed, reference)


def test_without_a_trigger_it_saves_after_each_validation_with_its_metrics(tmp_path):
    probe = Probe()
    mgr = CheckpointManager(str(tmp_path))
    _trainer(probe, val_check_interval=0.5).fit(_state(), STEP, TRAIN, val_step=VAL_STEP, val_data=VAL, checkpoint=mgr)
    assert [s for s, _ in probe.validations] == [3, 6, 9, 12]
    assert _steps(mgr) == [3, 6, 9, 12]
    for url, (_, loss) in zip(mgr.all(), probe.validations):
        assert read_meta(url)["metrics"]["val/loss"] == pytest.approx(loss, rel=1e-6)


def test_with_a_trigger_validation_does_not_save(tmp_path):
    probe = Probe()
    mgr = CheckpointManager(str(tmp_path), every_n_steps=5)
    _trainer(probe, val_check_interval=0.5).fit(
        _state(), STEP, TRAIN, val_step=VAL_STEP, val_data=VAL, checkpoint=mgr
    )
    assert _steps(mgr) == [5, 10, 12]
    # each save carries the latest validation's metrics: those of steps 3, 9 and 12
    losses = dict(probe.validations)
    saved = [read_meta(u)["metrics"]["val/loss"] for u in mgr.all()]
    assert saved == pytest.approx([losses[3], losses[9], losses[12]], rel=1e-6)


# --- keep_best, "best", URLs -------------------------------------------------------------------


def test_keep_best_keeps_the_lowest_val_loss_and_the_newest(tmp_path):
    probe = Probe()
    mgr = CheckpointManager(str(tmp_path), keep_best=1, monitor="val/loss")
    _trainer(probe, max_epochs=3).fit(_state(), STEP, TRAIN, val_step=VAL_STEP, val_data=VAL, checkpoint=mgr)
    losses = dict(probe.validations)
    best_step = min(losses, key=losses.get)
    assert best_step == 6 and losses[6] < losses[18]  # the scenario: validation loss rises with training
    assert _steps(mgr) == [best_step, 18]
    assert mgr.best() == mgr.all()[0]


def test_ckpt_path_best_resumes_from_the_best(tmp_path):
    mgr = CheckpointManager(str(tmp_path), monitor="val/loss")
    first = _trainer(max_epochs=3).fit(_state(), STEP, TRAIN, val_step=VAL_STEP, val_data=VAL, checkpoint=mgr)
    assert _steps(mgr) == [6, 12, 18]
    probe = Probe()
    resumed = _trainer(probe, max_epochs=3).fit(
        _state(), STEP, TRAIN, val_step=VAL_STEP, val_data=VAL,
        checkpoint=CheckpointManager(str(tmp_path), monitor="val/loss"), ckpt_path="best",
    )
    assert (probe.start.global_step, probe.start.epoch, probe.start.batch_idx) == (6, 0, 6)
    assert resumed.loop.global_step == 18
    _assert_same_training(resumed, first)  # continuing from the best checkpoint retraces the run


def test_ckpt_path_url_resumes_from_that_checkpoint(tmp_path):
    mgr = CheckpointManager(str(tmp_path), every_n_steps=4)
    _trainer().fit(_state(), STEP, TRAIN, checkpoint=mgr)
    url = mgr.all()[0]
    probe = Probe()
    _trainer(probe).fit(_state(), STEP, TRAIN, ckpt_path=url)
    assert probe.start.global_step == 4 and probe.start.total_batch_idx == 4
    probe = Probe()
    _trainer(probe).fit(_state(), STEP, TRAIN, ckpt_path="file://" + mgr.all()[1])
    assert probe.start.global_step == 8


@pytest.mark.parametrize("which", ["last", "best"])
def test_ckpt_path_last_or_best_without_a_manager_names_the_fix(which):
    with pytest.raises(CheckpointError, match=r"checkpoint=fl\.CheckpointManager") as info:
        _trainer().fit(_state(), STEP, TRAIN, ckpt_path=which)
    assert repr(which) in str(info.value) and "ModelCheckpoint" in str(info.value)


def test_ckpt_path_last_with_no_checkpoint_yet_warns_and_starts_fresh(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    with pytest.warns(UserWarning, match="no checkpoint"):
        state = _trainer().fit(_state(), STEP, TRAIN, checkpoint=mgr, ckpt_path="last")
    _assert_same_training(state, _trainer().fit(_state(), STEP, TRAIN))


def test_ckpt_path_last_reads_the_model_checkpoint_among_the_callbacks(tmp_path):
    url = _memory_url()
    _trainer(ModelCheckpoint(url, every_n_steps=5), max_epochs=1).fit(_state(), STEP, TRAIN)
    probe = Probe()
    _trainer(probe, ModelCheckpoint(url, every_n_steps=5)).fit(_state(), STEP, TRAIN, ckpt_path="last")
    assert probe.start.global_step == 6


# --- what a checkpoint holds ---------------------------------------------------------------------


def test_callback_states_are_saved_and_restored_by_ckpt_path_last(tmp_path):
    """EarlyStopping's counters survive the restart: the resumed run stops where the whole one does.

    With lr=0 the validation loss never improves after the first validation, so patience=3 stops
    after the 4th validation (epoch 4 of 6). Restarting after epoch 2 without the counters
    would stop after epoch 6 instead.
    """
    key = "EarlyStopping[val/loss]"
    whole = _trainer(fl.EarlyStopping("val/loss", patience=3), max_epochs=6).fit(
        _state(lr=0.0), STEP, TRAIN, val_step=VAL_STEP, val_data=VAL
    )
    assert whole.loop.epoch == 4 and whole.loop.callbacks[key]["wait_count"] == 3

    mgr = CheckpointManager(str(tmp_path))
    first = _trainer(fl.EarlyStopping("val/loss", patience=3), max_epochs=2).fit(
        _state(lr=0.0), STEP, TRAIN, val_step=VAL_STEP, val_data=VAL, checkpoint=mgr
    )
    saved = first.loop.callbacks[key]
    assert saved["wait_count"] == 1
    probe = Probe()
    resumed = _trainer(probe, fl.EarlyStopping("val/loss", patience=3), max_epochs=6).fit(
        _state(lr=0.0), STEP, TRAIN, val_step=VAL_STEP, val_data=VAL,
        checkpoint=CheckpointManager(str(tmp_path)), ckpt_path="last",
    )
    assert dict(probe.start.callbacks[key]) == dict(saved)
    assert "ModelCheckpoint" in probe.start.callbacks  # the checkpoint callback's own record too
    assert resumed.loop.epoch == whole.loop.epoch == 4
    assert resumed.loop.callbacks[key] == whole.loop.callbacks[key]


@pytest.mark.parametrize("where", ["memory", "local-async"])
def test_interrupt_and_resume_through_a_manager_is_exact(tmp_path, where):
    url = _memory_url() if where == "memory" else str(tmp_path)
    async_save = where == "local-async"
    reference = _trainer(max_epochs=3).fit(_state(), STEP, TRAIN, val_step=VAL_STEP, val_data=VAL)
    mgr = CheckpointManager(url, keep_last=2, every_n_steps=4, async_save=async_save)
    mid = _trainer(InterruptAt(9), max_epochs=3).fit(
        _state(), STEP, TRAIN, val_step=VAL_STEP, val_data=VAL, checkpoint=mgr
    )
    assert mid.loop.status == "interrupted"
    assert _steps(mgr) == [8, 9]
    assert _loop_of(mgr.latest())["status"] == "interrupted"
    mgr2 = CheckpointManager(url, keep_last=2, every_n_steps=4, async_save=async_save)
    final = _trainer(max_epochs=3).fit(
        _state(), STEP, TRAIN, val_step=VAL_STEP, val_data=VAL, checkpoint=mgr2, ckpt_path="last"
    )
    assert final.loop.global_step == reference.loop.global_step == 18
    assert final.loop.val_count == reference.loop.val_count
    _assert_same_training(final, reference)
    assert _steps(mgr2) == [16, 18]
    mgr.close()
    mgr2.close()
