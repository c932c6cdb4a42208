"""EarlyStopping with Lightning's semantics, its counters in ``state.loop.callbacks``.

Lightning's rules, applied by hand in the tables: after each validation, stop if the value is
not finite (``check_finite``), else if it is strictly better than ``stopping_threshold``, else if
it is strictly worse than ``divergence_threshold``; otherwise a value better than the best by
more than ``min_delta`` resets the wait count, any other value increments it and the run stops
when it reaches ``patience``.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import fnloop as fl
from fnloop.errors import ConfigError

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

NAN, INF = float("nan"), float("inf")


def _feed(cb: fl.EarlyStopping, values, key: str = "val/loss"):
    """Feed ``values`` through ``on_validation_end``; returns the final state and the index of the
    first value that requested a stop (None if none did)."""
    state = sc.linear_state()
    stopped_at = None
    for i, value in enumerate(values):
        out = cb.on_validation_end(state, {key: value, "val/other": 0.0})
        state = state if out is None else out
        if state.loop.stop and stopped_at is None:
            stopped_at = i
    return state, stopped_at


# (options, values, index of the stopping value or None, best score at the end, wait count at the end)
TABLE = [
    (dict(patience=2), [1.0, 0.9, 0.95, 0.93, 0.8], 3, 0.9, 2),
    (dict(patience=3), [3.0, 2.0, 1.0, 2.0, 0.5], None, 0.5, 0),
    (dict(patience=1, mode="max"), [0.5, 0.6, 0.6], 2, 0.6, 1),
    (dict(patience=2, min_delta=0.1), [1.0, 0.95, 0.85, 0.84], None, 0.85, 1),
    (dict(patience=1, min_delta=0.1, mode="max"), [1.0, 1.05], 1, 1.0, 1),
    (dict(patience=5, stopping_threshold=0.5), [0.8, 0.6, 0.5, 0.4, 0.3], 3, 0.5, 0),
    (dict(patience=5, divergence_threshold=2.0), [1.0, 1.5, 2.0, 2.5], 3, 1.0, 2),
    (dict(patience=5, mode="max", stopping_threshold=0.9), [0.5, 0.9, 0.95], 2, 0.9, 0),
    (dict(patience=5, mode="max", divergence_threshold=0.1), [0.5, 0.1, 0.05], 2, 0.5, 1),
    (dict(patience=5), [1.0, NAN], 1, 1.0, 0),
    (dict(patience=5), [1.0, INF], 1, 1.0, 0),
    (dict(patience=2, check_finite=False), [1.0, NAN, NAN], 2, 1.0, 2),
    (dict(patience=0), [1.0, 1.0], 1, 1.0, 1),
]


@pytest.mark.parametrize(("options", "values", "stop_at", "best", "wait"), TABLE)
def test_early_stopping_table(options, values, stop_at, best, wait):
    cb = fl.EarlyStopping("val/loss", **options)
    state, stopped_at = _feed(cb, values[: (stop_at + 1) if stop_at is not None else None])
    assert stopped_at == stop_at
    record = state.loop.callbacks["EarlyStopping[val/loss]"]
    assert record["best_score"] == best
    assert record["wait_count"] == wait
    if stop_at is not None:
        assert record["stopped_epoch"] == 0 and "val/loss" in record["reason"]


def test_the_hook_returns_a_new_state_and_leaves_the_input_alone():
    cb = fl.EarlyStopping("val/loss", patience=0)
    state = sc.linear_state()
    first = cb.on_validation_end(state, {"val/loss": 1.0})
    second = cb.on_validation_end(first, {"val/loss": 2.0})
    assert state.loop.callbacks == {} and not state.loop.stop
    assert first.loop.callbacks["EarlyStopping[val/loss]"]["wait_count"] == 0 and not first.loop.stop
    assert second.loop.stop and second.loop.callbacks["EarlyStopping[val/loss]"]["wait_count"] == 1


def test_strict_missing_monitor_names_it_and_the_available_metrics():
    with pytest.raises(ConfigError, match=r"'val/acc'.*\['val/loss'\]"):
        fl.EarlyStopping("val/acc").on_validation_end(sc.linear_state(), {"val/loss": 1.0})


def test_non_strict_missing_monitor_is_skipped():
    state = sc.linear_state()
    assert fl.EarlyStopping("val/acc", strict=False).on_validation_end(state, {"val/loss": 1.0}) is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [(dict(mode="avg"), "mode='avg'"), (dict(patience=-1), "patience=-1"), (dict(monitor=""), "monitor=''")],
)
def test_bad_options(kwargs, needle):
    kwargs = {"monitor": "val/loss", **kwargs}
    with pytest.raises(ConfigError, match=needle):
        fl.EarlyStopping(**kwargs)


# --- end to end -----------------------------------------------------------------------------------

SEQUENCE = [1.0, 0.8, 0.9, 0.85, 0.7, 0.6]  # patience 2: stops at the 4th validation (0.85)


def _fake_val(state, batch):
    """The validation loss of the ``val_count``-th validation run, from SEQUENCE."""
    return {"loss": torch.tensor(SEQUENCE[state.loop.val_count])}


def _fit(state, callbacks, **flags):
    trainer = sc.quiet_trainer(num_sanity_val_steps=0, callbacks=callbacks, **{"max_epochs": 10, **flags})
    return trainer.fit(state, fl.train_step(sc.mse), sc.batches(2), val_step=_fake_val, val_data=sc.batches(1))


def test_end_to_end_stops_at_the_hand_computed_validation():
    state = _fit(sc.linear_state(), [fl.EarlyStopping("val/loss", patience=2)])
    assert state.loop.val_count == 4
    assert state.loop.stop and state.loop.status == "finished"
    assert (state.loop.epoch, state.loop.global_step) == (4, 8)  # the 4th epoch (index 3) completes
    record = state.loop.callbacks["EarlyStopping[val/loss]"]
    assert (record["best_score"], record["wait_count"], record["stopped_epoch"]) == (pytest.approx(0.8), 2, 3)


@pytest.mark.parametrize(("at", "wait"), [(2, 0), (4, 0), (6, 1)])
def test_counters_survive_interruption_and_resume(at, wait):
    reference = _fit(sc.linear_state(), [fl.EarlyStopping("val/loss", patience=2)])
    mid = _fit(sc.linear_state(), [fl.EarlyStopping("val/loss", patience=2), sc.InterruptAt(at)])
    assert mid.loop.status == "interrupted"
    assert mid.loop.callbacks["EarlyStopping[val/loss]"]["wait_count"] == wait
    # a new trainer and a new callback object: the counters come from the state
    final = _fit(mid, [fl.EarlyStopping("val/loss", patience=2)])
    assert final.loop.callbacks == reference.loop.callbacks
    assert (final.loop.epoch, final.loop.global_step, final.loop.val_count) == (4, 8, 4)
    sc.assert_same_training(final, reference)


def test_counters_survive_an_interruption_at_a_validation_batch():
    reference = _fit(sc.linear_state(), [fl.EarlyStopping("val/loss", patience=2)])
    mid = _fit(sc.linear_state(), [fl.EarlyStopping("val/loss", patience=2), sc.InterruptAt(3)])
    final = _fit(mid, [fl.EarlyStopping("val/loss", patience=2)])
    assert (final.loop.epoch, final.loop.global_step, final.loop.val_count) == (4, 8, 4)


@pytest.mark.parametrize(
    ("flags", "end"),
    [
        (dict(), (2, 0, 4)),  # stop requested at the 2nd validation (epoch 1)
        (dict(min_epochs=4), (4, 0, 8)),  # four epochs done first
        (dict(min_steps=7), (3, 1, 7)),  # stops mid-epoch once 7 steps are done
    ],
    ids=["no_minimum", "min_epochs", "min_steps"],
)
def test_minimums_delay_a_requested_stop(flags, end):
    state = _fit(sc.linear_state(), [fl.EarlyStopping("val/loss", patience=0, min_delta=1.0)], **flags)
    assert state.loop.stop
    assert (state.loop.epoch, state.loop.batch_idx, state.loop.global_step) == end


def test_divergence_is_checked_before_improvement():
    """A value past the divergence threshold stops the run even if it is the best so far."""
    cb = fl.EarlyStopping("val/loss", mode="max", divergence_threshold=0.5, patience=10)
    state, stopped_at = _feed(cb, [0.4])
    assert stopped_at == 0
    assert state.loop.callbacks["EarlyStopping[val/loss]"]["best_score"] == -math.inf
