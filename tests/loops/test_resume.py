"""Interrupt and exact resume: a fit interrupted by ``KeyboardInterrupt`` returns its state, and
calling ``fit`` again on it ends bitwise where an uninterrupted run ends, having read every
sample exactly once per epoch.

Scenario: 22 shuffled samples in batches of 4 (6 batches per epoch, the last one of 2), 3
epochs, a model with Dropout (randomness from the state), AdamW with a warmup-cosine schedule,
validation twice per epoch (after batches 2 and 5).
"""

from __future__ import annotations

import random
import sys

import pytest
from torch.utils.data import DataLoader

import fnloop as fl
import fnloop.optim as flo

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

N_SAMPLES, BATCH, EPOCHS = 22, 4, 3
N_BATCHES = 6
TOTAL = N_BATCHES * EPOCHS
VAL_AFTER = (2, 5)  # val_check_interval=0.5 of 6 batches
LOOP_FIELDS = ("epoch", "batch_idx", "total_batch_idx", "global_step", "samples_seen", "status", "stop")


def _interrupt_points(accumulate: int, count: int = 3) -> list[int]:
    return sorted(random.Random(20261128 + accumulate).sample(range(TOTAL), count))


CASES = [(k, at) for k in (1, 2) for at in _interrupt_points(k)] + [(2, 2 * N_BATCHES - 1)]  # + an epoch's last batch


def _state():
    tx = flo.adamw(lr=flo.warmup_cosine(1e-2, warmup_steps=3, decay_steps=TOTAL), weight_decay=0.01)
    return fl.TrainState.create(sc.make_dropout_mlp(seed=1), tx, seed=7)


def _setup(accumulate: int, callbacks: list) -> tuple:
    ds = sc.LoggedDataset(N_SAMPLES, seed=2)
    trainer = sc.quiet_trainer(
        max_epochs=EPOCHS, accumulate_grad_batches=accumulate, val_check_interval=0.5, log_every_n_steps=3,
        callbacks=[sc.EpochMarker(ds), *callbacks],
    )
    return ds, trainer, DataLoader(ds, batch_size=BATCH, shuffle=True)


_STEP = fl.train_step(sc.mse)
_VAL = fl.eval_step(sc.mse)
_VAL_DATA = sc.batches(2, seed=3)
_REFERENCES: dict[int, tuple] = {}


def _reference(accumulate: int) -> tuple:
    if accumulate not in _REFERENCES:
        ds, trainer, loader = _setup(accumulate, [])
        state = trainer.fit(_state(), _STEP, loader, val_step=_VAL, val_data=_VAL_DATA)
        _REFERENCES[accumulate] = (state, {e: list(v) for e, v in ds.seen.items()})
    return _REFERENCES[accumulate]


def _check_epochs_read_once(seen: dict) -> None:
    assert sorted(seen) == list(range(EPOCHS))
    for epoch, indices in seen.items():
        assert sorted(indices) == list(range(N_SAMPLES)), f"epoch {epoch} read {sorted(indices)}"


def test_reference_run_shuffles_each_epoch():
    state, seen = _reference(1)
    assert state.loop.global_step == TOTAL and state.loop.val_count == 2 * EPOCHS
    _check_epochs_read_once(seen)
    assert seen[0] != seen[1] != seen[2]


@pytest.mark.parametrize(("accumulate", "at"), CASES, ids=[f"k{k}-batch{at}" for k, at in CASES])
def test_interrupt_and_resume_is_exact(accumulate, at):
    ref, ref_seen = _reference(accumulate)
    ds, trainer, loader = _setup(accumulate, [sc.InterruptAt(at)])
    mid = trainer.fit(_state(), _STEP, loader, val_step=_VAL, val_data=_VAL_DATA)
    assert mid.loop.status == "interrupted"
    assert mid.loop.total_batch_idx == at + 1
    assert (mid.loop.epoch, mid.loop.batch_idx) == (at // N_BATCHES, at % N_BATCHES + 1)
    final = trainer.fit(mid, _STEP, loader, val_step=_VAL, val_data=_VAL_DATA)
    sc.assert_same_training(final, ref)
    for field in LOOP_FIELDS:
        assert getattr(final.loop, field) == getattr(ref.loop, field), field
    if at % N_BATCHES not in VAL_AFTER:  # see test_interrupt_at_a_validation_batch_keeps_the_validation
        assert final.loop.val_count == ref.loop.val_count
    _check_epochs_read_once(ds.seen)
    assert dict(ds.seen) == ref_seen  # the same order as the uninterrupted run


def test_interrupt_at_a_validation_batch_keeps_the_validation():
    ref, _ = _reference(1)
    _, trainer, loader = _setup(1, [sc.InterruptAt(N_BATCHES + VAL_AFTER[0])])
    mid = trainer.fit(_state(), _STEP, loader, val_step=_VAL, val_data=_VAL_DATA)
    final = trainer.fit(mid, _STEP, loader, val_step=_VAL, val_data=_VAL_DATA)
    assert final.loop.val_count == ref.loop.val_count


def test_interrupt_inside_the_step_replays_that_batch():
    """An interrupt raised by the loss function leaves the state before that batch."""
    ref, _ = _reference(2)
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return sc.mse(model, batch)

    step = fl.train_step(loss)
    _, trainer, loader = _setup(2, [])
    mid = trainer.fit(_state(), step, loader, val_step=_VAL, val_data=_VAL_DATA)
    assert mid.loop.status == "interrupted"
    assert mid.loop.total_batch_idx == 7
    final = trainer.fit(mid, step, loader, val_step=_VAL, val_data=_VAL_DATA)
    sc.assert_same_training(final, ref)
    assert (final.loop.global_step, final.loop.val_count) == (ref.loop.global_step, ref.loop.val_count)


def test_a_finished_run_is_not_trained_further():
    ref, _ = _reference(1)
    _, trainer, loader = _setup(1, [])
    again = trainer.fit(ref, _STEP, loader, val_step=_VAL, val_data=_VAL_DATA)
    sc.assert_same_training(again, ref)
    assert again.loop.global_step == ref.loop.global_step and again.loop.status == "finished"
