"""Trainer flags (gradient accumulation, clipping, the non-finite policy) never change the tree of
the state the user created, nor its optimizer: ``fit`` returns a state whose structure is that of
``TrainState.create(model, tx)`` and whose ``tx`` is the user's own object, so a checkpoint of it
always restores into a fresh ``TrainState.create(model, tx)``, and a run interrupted anywhere
(inside an accumulation window too), saved, restored into a fresh template and resumed with the
same flags ends bitwise where an uninterrupted run ends.

Scenario: 7 batches per epoch (accumulation windows of 2 and 3 are partial at the epoch end),
2 epochs, a model with Dropout (randomness from the state), AdamW.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

N_BATCHES, EPOCHS = 7, 2
TOTAL = N_BATCHES * EPOCHS
DATA = sc.batches(N_BATCHES, seed=4)
STEP = fl.train_step(sc.mse)
TX = flo.adamw(lr=1e-2, weight_decay=0.1)
LOOP_FIELDS = ("epoch", "batch_idx", "total_batch_idx", "global_step", "samples_seen", "val_count", "stop", "status")

ACCUMULATE = (1, 2, 3)
CLIP_VAL = (None, 0.5)
CLIP_ALGORITHM = (None, "norm", "value")
NONFINITE = ("raise", "skip", "stop")
FLAGS = [
    {"accumulate_grad_batches": a, "gradient_clip_val": v, "gradient_clip_algorithm": alg, "on_nonfinite": nf}
    for a, v, alg, nf in itertools.product(ACCUMULATE, CLIP_VAL, CLIP_ALGORITHM, NONFINITE)
]


def _flag_id(flags: dict[str, Any]) -> str:
    return "k{accumulate_grad_batches}-clip{gradient_clip_val}-{gradient_clip_algorithm}-{on_nonfinite}".format(**flags)


def _model() -> Any:
    return sc.make_dropout_mlp(seed=1)


def _fresh(tx: Any = TX) -> fl.TrainState:
    """A fresh state (its own tensors: runs never share memory, whatever fit donates)."""
    return fl.TrainState.create(_model(), tx, seed=7)


def _trainer(flags: dict[str, Any], callbacks: list[Any] | None = None, epochs: int = EPOCHS) -> fl.Trainer:
    return fl.Trainer(
        max_epochs=epochs, logger=False, enable_progress_bar=False, log_every_n_steps=2, callbacks=callbacks, **flags
    )


class InterruptAt(fl.Callback):
    """Raises ``KeyboardInterrupt`` once, in ``on_train_batch_end`` when ``total_batch_idx == at``."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.fired = False

    def on_train_batch_end(self, state: Any, metrics: Any) -> None:
        if not self.fired and state.loop.total_batch_idx == self.at:
            self.fired = True
            raise KeyboardInterrupt


def _save_restore(state: fl.TrainState, tx: Any = TX) -> fl.TrainState:
    """``state`` saved, then restored into a fresh ``TrainState.create(model_copy, tx)``."""
    with tempfile.TemporaryDirectory() as tmp:
        url = fl.save(state, os.path.join(tmp, "ckpt"))
        return fl.restore(url, like=_fresh(tx))


def _assert_users_tree(out: fl.TrainState, tx: Any = TX) -> None:
    # the template module is a static field compared by identity: take the state's own, so the
    # structures compare the leaves' tree and the optimizer object
    template = _fresh(tx).replace(module=out.module)
    assert fl.tree_structure(out) == fl.tree_structure(template), (
        f"fit changed the state's tree:\n  got      {fl.tree_structure(out.opt_state)}\n"
        f"  expected {fl.tree_structure(template.opt_state)}"
    )
    assert out.tx is tx, f"fit replaced the user's optimizer with {out.tx!r}"


# --- the returned state keeps the user's tree and optimizer -------------------------------------


@pytest.mark.parametrize("flags", FLAGS, ids=[_flag_id(f) for f in FLAGS])
def test_fit_returns_the_users_tree_and_tx(flags):
    out = _trainer(flags, epochs=1).fit(_fresh(), STEP, DATA)
    assert out.loop.status == "finished" and out.loop.total_batch_idx == N_BATCHES
    _assert_users_tree(out)
    restored = _save_restore(out)
    sc.assert_same_training(restored, out)


@pytest.mark.parametrize("flags", FLAGS[::5], ids=[_flag_id(f) for f in FLAGS[::5]])
def test_interrupted_fit_returns_the_users_tree_and_tx(flags):
    out = _trainer(flags, [InterruptAt(3)]).fit(_fresh(), STEP, DATA)
    assert out.loop.status == "interrupted" and out.loop.total_batch_idx == 3
    _assert_users_tree(out)
    _save_restore(out)


# --- interrupt, save, restore into a fresh template, resume: bitwise the uninterrupted run ------

_REFERENCES: dict[str, fl.TrainState] = {}


def _reference(flags: dict[str, Any]) -> fl.TrainState:
    key = _flag_id(flags)
    if key not in _REFERENCES:
        _REFERENCES[key] = _trainer(flags).fit(_fresh(), STEP, DATA)
    return _REFERENCES[key]


@settings(max_examples=15, deadline=None)
@given(
    accumulate=st.sampled_from(ACCUMULATE),
    clip_val=st.sampled_from(CLIP_VAL),
    clip_algorithm=st.sampled_from(CLIP_ALGORITHM),
    nonfinite=st.sampled_from(NONFINITE),
    at=st.integers(1, TOTAL - 1),
)
def test_resume_from_a_restored_checkpoint_is_exact(accumulate, clip_val, clip_algorithm, nonfinite, at):
    flags = {
        "accumulate_grad_batches": accumulate,
        "gradient_clip_val": clip_val,
        "gradient_clip_algorithm": clip_algorithm,
        "on_nonfinite": nonfinite,
    }
    ref = _reference(flags)
    assert ref.loop.status == "finished" and ref.loop.total_batch_idx == TOTAL
    mid = _trainer(flags, [InterruptAt(at)]).fit(_fresh(), STEP, DATA)
    assert mid.loop.status == "interrupted" and mid.loop.total_batch_idx == at
    restored = _save_restore(mid)
    final = _trainer(flags).fit(restored, STEP, DATA)
    sc.assert_same_training(final, ref)  # step, params, buffers, opt_state, rng
    for name in LOOP_FIELDS:
        assert getattr(final.loop, name) == getattr(ref.loop, name), name
    _assert_users_tree(final)


# --- a checkpoint saved under some flags resumes under others ------------------------------------

FLAG_CHANGES = [
    ({"accumulate_grad_batches": 2, "gradient_clip_val": 0.5, "on_nonfinite": "skip"}, {}),
    (
        {},
        {
            "accumulate_grad_batches": 3,
            "gradient_clip_val": 0.5,
            "gradient_clip_algorithm": "value",
            "on_nonfinite": "skip",
        },
    ),
    (
        {"accumulate_grad_batches": 3, "gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"},
        {
            "accumulate_grad_batches": 2,
            "gradient_clip_val": 0.5,
            "gradient_clip_algorithm": "norm",
            "on_nonfinite": "skip",
        },
    ),
    ({"accumulate_grad_batches": 2, "on_nonfinite": "skip"}, {"gradient_clip_val": 0.5, "on_nonfinite": "stop"}),
]


@pytest.mark.parametrize(("flags_a", "flags_b"), FLAG_CHANGES, ids=[f"change{i}" for i in range(len(FLAG_CHANGES))])
@pytest.mark.parametrize("at", [3, 8])  # inside a window of the first epoch; in the second epoch
def test_checkpoint_saved_under_some_flags_resumes_under_others(flags_a, flags_b, at):
    mid = _trainer(flags_a, [InterruptAt(at)]).fit(_fresh(), STEP, DATA)
    assert mid.loop.status == "interrupted"
    restored = _save_restore(mid)
    final = _trainer(flags_b).fit(restored, STEP, DATA)
    assert final.loop.status == "finished" and final.loop.total_batch_idx == TOTAL
    _assert_users_tree(final)
