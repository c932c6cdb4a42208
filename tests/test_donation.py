"""Donation: after ``Trainer.fit`` (``donate=True``, the default) or ``step.donated(s, b)``, the
very object the caller holds is refused by every fnloop entry point, with a message that says
what to use instead; the state fit returned works everywhere; ``donate=False`` leaves the input
intact and usable (a sweep can reuse one starting state).

Like a donated buffer in JAX: the donated tensors may have been overwritten in place, so a later
use must fail loudly instead of computing with corrupted values.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_trees_equal

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

DATA = sc.batches(4, seed=5)
BATCH = DATA[0]
STEP = fl.train_step(sc.mse)
EVAL = fl.eval_step(sc.mse)
PREDICT = fl.predict_step(lambda model, batch: model(batch[0]))


def _state() -> fl.TrainState:
    tx = flo.adamw(lr=1e-2, weight_decay=0.1)  # optimizer state to overwrite in place
    return fl.TrainState.create(sc.make_dropout_mlp(seed=3), tx, seed=11)


def _trainer(**flags: Any) -> fl.Trainer:
    return fl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, **flags)


# Every fnloop entry point that takes a state: (state, tmp_path) -> anything.
ENTRY_POINTS: dict[str, Callable[[Any, pathlib.Path], Any]] = {
    "step": lambda s, tmp: STEP(s, BATCH),
    "step.donated": lambda s, tmp: STEP.donated(s, BATCH),
    "compile(step)": lambda s, tmp: fl.compile(STEP, backend="aot_eager")(s, BATCH),
    "eval_step": lambda s, tmp: EVAL(s, BATCH),
    "predict_step": lambda s, tmp: PREDICT(s, BATCH),
    "Trainer.fit": lambda s, tmp: _trainer().fit(s, STEP, DATA),
    "Trainer.validate": lambda s, tmp: _trainer().validate(s, EVAL, DATA),
    "Trainer.test": lambda s, tmp: _trainer().test(s, EVAL, DATA),
    "Trainer.predict": lambda s, tmp: _trainer().predict(s, PREDICT, DATA),
    "save": lambda s, tmp: fl.save(s, str(tmp / "ckpt")),
    "registry.publish": lambda s, tmp: fl.registry.publish(s, str(tmp / "registry"), "name"),
    "fl.stack": lambda s, tmp: fl.stack([s, s]),
}
# a compiled step refuses before compiling; compiling it for the "accepted" cases costs seconds
ACCEPT_POINTS = [name for name in ENTRY_POINTS if name != "compile(step)"]


def _assert_refused(entry: str, state: Any, tmp_path: pathlib.Path) -> None:
    with pytest.raises(fl.StepError) as info:
        ENTRY_POINTS[entry](state, tmp_path)
    msg = str(info.value)
    assert "donated" in msg, msg
    # says what to use instead: the state fit returned, or Trainer(donate=False)
    assert "returned" in msg and "donate=False" in msg, msg


def _fit_donating() -> tuple[fl.TrainState, fl.TrainState]:
    s0 = _state()
    s1 = _trainer().fit(s0, STEP, DATA)
    return s0, s1


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_state_given_to_fit_is_refused(entry, tmp_path):
    s0, s1 = _fit_donating()
    assert s1.loop.status == "finished" and s1.loop.global_step == len(DATA)
    _assert_refused(entry, s0, tmp_path)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_state_given_to_step_donated_is_refused(entry, tmp_path):
    s = _state()
    new, _ = STEP.donated(s, BATCH)  # the caller's own object is the one marked
    assert int(new.step) == 1
    _assert_refused(entry, s, tmp_path)


@pytest.mark.parametrize("entry", ACCEPT_POINTS)
def test_state_fit_returned_works_everywhere(entry, tmp_path):
    _, s1 = _fit_donating()
    ENTRY_POINTS[entry](s1, tmp_path)


def test_state_fit_returned_works_compiled():
    _, s1 = _fit_donating()
    expected, metrics = STEP(s1, BATCH)
    got, got_metrics = fl.compile(STEP, backend="aot_eager")(s1, BATCH)  # graph capture without codegen
    assert int(got.step) == int(s1.step) + 1
    fl.testing.assert_trees_close((got.params, got_metrics), (expected.params, metrics))


def test_refusal_happens_before_any_work(tmp_path):
    """A refused save writes nothing; a refused fit leaves the returned state usable."""
    s0, s1 = _fit_donating()
    before = {k: v.clone() for k, v in s1.params.items()}
    with pytest.raises(fl.StepError):
        fl.save(s0, str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(fl.StepError):
        _trainer().fit(s0, STEP, DATA)
    assert_trees_equal(s1.params, before)
    assert fl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False).fit(s1, STEP, DATA).loop.global_step == 2 * len(DATA)


@pytest.mark.parametrize("entry", ACCEPT_POINTS)
def test_donate_false_leaves_the_input_intact_and_usable(entry, tmp_path):
    s0 = _state()
    before = copy.deepcopy(s0)
    s1 = _trainer(donate=False).fit(s0, STEP, DATA)
    assert s1.loop.global_step == len(DATA)
    for name in ("step", "params", "buffers", "opt_state", "rng", "loop"):  # bitwise
        assert_trees_equal(getattr(s0, name), getattr(before, name), msg=name)
    assert not torch.equal(s1.params["0.weight"], s0.params["0.weight"])  # fit did train
    ENTRY_POINTS[entry](s0, tmp_path)


def test_donate_false_compiled_step_accepts_the_input():
    s0 = _state()
    _trainer(donate=False).fit(s0, STEP, DATA)
    got, _ = fl.compile(STEP, backend="aot_eager")(s0, BATCH)
    fl.testing.assert_trees_close(got.params, STEP(s0, BATCH)[0].params)


def test_sweep_reusing_a_starting_state_with_donate_false_repeats_exactly():
    start = _state()
    trainer = fl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, donate=False)
    first = trainer.fit(start, STEP, DATA)
    second = trainer.fit(start, STEP, DATA)
    sc.assert_same_training(second, first)
    assert second.loop.global_step == first.loop.global_step == 2 * len(DATA)
