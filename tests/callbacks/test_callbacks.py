"""The callback protocol during fit: hook order, returned states, immutability, and the small
built-ins (LearningRateMonitor, Timer, ProgressBar)."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.callbacks import misc, with_callback_state

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


class FullRecorder(sc.Recorder):
    """Also records the ``log`` hook (extra values asked for at a logging boundary)."""

    def log(self, state):
        self.events.append(("log_values", state.loop.global_step))
        return {}


def _strip(events):
    return [e[:4] if e[0] == "val_end" else e for e in events]


# --- hook order ---------------------------------------------------------------------------------------

def test_hook_order_matches_the_documented_order():
    events: list = []
    rec = FullRecorder(events)
    trainer = sc.quiet_trainer(max_epochs=2, log_every_n_steps=2, num_sanity_val_steps=1, callbacks=[rec])
    val = dict(val_step=sc.CountingEval(events), val_data=sc.batches(1))
    trainer.fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(2), **val)
    assert _strip(events) == [
        ("fit_start",),
        ("val_batch",),  # the sanity check runs no hook
        ("epoch_start", 0),
        ("batch_end", 0, 1, 0),
        ("batch_end", 0, 2, 1),
        ("log_values", 2),
        ("log", 2),
        ("val_batch",),
        ("val_end", 0, 2, 1),
        ("epoch_end", 0),
        ("epoch_start", 1),
        ("batch_end", 1, 3, 0),
        ("batch_end", 1, 4, 1),
        ("log_values", 4),
        ("log", 4),
        ("val_batch",),
        ("val_end", 1, 4, 1),
        ("epoch_end", 1),
        ("fit_end", "finished"),
    ]


def test_the_last_partial_logging_window_of_an_epoch_is_flushed_before_epoch_end():
    rec = FullRecorder()
    trainer = sc.quiet_trainer(max_epochs=1, log_every_n_steps=2, callbacks=[rec])
    trainer.fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(3))
    assert rec.kinds()[-4:] == ["log_values", "log", "epoch_end", "fit_end"]
    assert [e for e in rec.events if e[0] == "log"] == [("log", 2), ("log", 3)]


class Statuses(fl.Callback):
    def __init__(self):
        self.seen = []

    def on_fit_end(self, state):
        self.seen.append(("fit_end", state.loop.status))

    def on_exception(self, state, exception):
        self.seen.append(("exception", state.loop.status, type(exception).__name__))


def test_on_exception_replaces_on_fit_end_when_fit_raises():
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return sc.mse(model, batch)

    statuses, sink = Statuses(), sc.RecordingLogger()
    trainer = sc.quiet_trainer(max_epochs=2, callbacks=[statuses], logger=sink)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(sc.linear_state(), fl.train_step(loss), sc.batches(2))
    assert statuses.seen == [("exception", "failed", "StepError")]  # the step error names its batch
    assert sink.statuses == ["failed"]


def test_an_interrupted_fit_still_calls_on_fit_end():
    statuses, sink = Statuses(), sc.RecordingLogger()
    trainer = sc.quiet_trainer(max_epochs=2, callbacks=[statuses, sc.InterruptAt(2)], logger=sink)
    state = trainer.fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(4))
    assert state.loop.status == "interrupted"
    assert statuses.seen == [("fit_end", "interrupted")]
    assert sink.statuses == ["interrupted"]


# --- states in, states out ----------------------------------------------------------------------------

class Passive(fl.Callback):
    """Overrides every hook and returns None from each."""

    def on_fit_start(self, state):
        return None

    def on_train_epoch_start(self, state):
        return None

    def on_train_batch_end(self, state, metrics):
        return None

    def on_train_epoch_end(self, state):
        return None

    def on_validation_end(self, state, metrics):
        return None

    def on_fit_end(self, state):
        return None


def _run(callbacks, state=None, **flags):
    trainer = sc.quiet_trainer(callbacks=callbacks, **{"max_epochs": 2, **flags})
    return trainer.fit(
        state or sc.linear_state(), fl.train_step(sc.mse), sc.batches(3),
        val_step=fl.eval_step(sc.mse), val_data=sc.batches(1),
    )


def test_hooks_returning_none_keep_the_state():
    plain = _run([])
    passive = _run([Passive()])
    sc.assert_same_training(passive, plain)
    assert passive.loop == plain.loop


class Counter(fl.Callback):
    """Counts batches in its own entry of ``state.loop.callbacks`` and requests a stop at ``stop_at``."""

    def __init__(self, stop_at=None):
        self.stop_at = stop_at
        self.inputs = []

    def on_train_batch_end(self, state, metrics):
        self.inputs.append(state)
        n = state.loop.callbacks.get(self.state_key, {}).get("n", 0) + 1
        state = with_callback_state(state, self.state_key, {"n": n})
        return fl.request_stop(state) if n == self.stop_at else state


def test_a_returned_state_is_the_one_training_continues_with():
    counter = Counter()
    state = _run([counter])
    assert state.loop.callbacks == {"Counter": {"n": 6}}
    # each hook saw the state returned by the previous call, and none of them was changed afterwards
    assert [s.loop.callbacks.get("Counter", {}).get("n", 0) for s in counter.inputs] == [0, 1, 2, 3, 4, 5]


def test_a_hook_can_request_a_stop():
    state = _run([Counter(stop_at=4)])
    assert state.loop.stop and state.loop.global_step == 4
    assert (state.loop.epoch, state.loop.batch_idx) == (1, 1)


class Mutator(fl.Callback):
    def __init__(self):
        self.errors = []

    def on_train_batch_end(self, state, metrics):
        for target, name, value in ((state.loop, "epoch", 99), (state, "step", torch.tensor(0))):
            try:
                setattr(target, name, value)
            except dataclasses.FrozenInstanceError:
                self.errors.append(name)


def test_hooks_cannot_mutate_the_state():
    mutator = Mutator()
    state = _run([mutator])
    assert mutator.errors == ["epoch", "step"] * 6
    assert state.loop.epoch == 2 and int(state.step) == 6


# --- built-in callbacks -----------------------------------------------------------------------------

@pytest.mark.parametrize("accumulate", [1, 2])
def test_learning_rate_monitor_logs_the_lr_in_force(accumulate):
    sink = sc.RecordingLogger()
    tx = flo.sgd(lr=flo.step_lr(0.1, step_size=2, gamma=0.5))  # 0.1 * 0.5 ** (updates // 2)
    trainer = sc.quiet_trainer(
        max_epochs=2, log_every_n_steps=2, accumulate_grad_batches=accumulate, logger=sink,
        callbacks=[fl.LearningRateMonitor()],
    )
    state = trainer.fit(fl.TrainState.create(sc.make_linear(), tx), fl.train_step(sc.mse), sc.batches(4 * accumulate))
    assert state.loop.global_step == 8
    assert [step for step, _ in sink.values("lr")] == [2, 4, 6, 8]
    assert [lr for _, lr in sink.values("lr")] == pytest.approx([0.05, 0.025, 0.0125, 0.00625])
    assert [step for step, _ in sink.values("train/loss")] == [2, 4, 6, 8]
    assert sink.statuses == ["finished"]


class _Clock:
    """A stand-in for the ``time`` module whose ``monotonic()`` moves only when told to."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


class Tick(fl.Callback):
    def __init__(self, clock, seconds):
        self.clock, self.seconds = clock, seconds

    def on_train_batch_end(self, state, metrics):
        self.clock.now += self.seconds


def test_timer_stops_a_run_and_keeps_the_elapsed_time_in_the_state(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(misc, "time", clock)
    state = _run([Tick(clock, 10.0), fl.Timer("00:00:00:30")], max_epochs=5)
    assert state.loop.stop and state.loop.global_step == 3
    assert state.loop.callbacks["Timer"]["elapsed"] == pytest.approx(30.0)


def test_timer_budget_continues_across_an_interruption(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(misc, "time", clock)
    mid = _run([Tick(clock, 10.0), fl.Timer("00:00:00:30"), sc.InterruptAt(1)], max_epochs=5)
    assert mid.loop.status == "interrupted"
    assert mid.loop.callbacks["Timer"]["elapsed"] == pytest.approx(20.0)
    clock.now += 3600.0  # time spent while the run was not training does not count
    final = _run([Tick(clock, 10.0), fl.Timer("00:00:00:30")], state=mid, max_epochs=5)
    assert final.loop.stop and final.loop.global_step == 3
    assert final.loop.callbacks["Timer"]["elapsed"] == pytest.approx(30.0)


def test_progress_bar_runs_with_tqdm(capsys):
    state = fl.Trainer(max_epochs=2, log_every_n_steps=1).fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(4))
    assert state.loop.global_step == 8
    err = capsys.readouterr().err
    assert "epoch 0" in err and "epoch 1" in err and "4/4" in err


def test_an_explicit_progress_bar_replaces_the_default_one(capsys, monkeypatch):
    import tqdm.auto

    made = []

    class CountingTqdm(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            made.append(kwargs.get("desc"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", CountingTqdm)
    trainer = fl.Trainer(max_epochs=2, callbacks=[fl.ProgressBar(leave=False, refresh_rate=2)])
    trainer.fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(4))
    assert made == ["epoch 0", "epoch 1"]  # one bar per epoch, no second default bar
    assert "epoch 1" in capsys.readouterr().err
