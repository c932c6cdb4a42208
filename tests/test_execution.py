"""The execution layer against the meaning of a step: every speed path of ``fnloop.execution``
(fast eager gradients, donation, identity caches, seed caching, step options carried in the
state) gives bitwise what ``fnloop.step.apply_train_step`` and ``fnloop.eval_steps.eval_core``
give."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop.eval_steps import eval_core
from fnloop.options import StepOptions
from fnloop.step import apply_train_step
from fnloop.testing import assert_trees_equal

import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

TXS = {
    "sgd-momentum": lambda: flo.sgd(lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda: flo.adam(lr=1e-2),
    "adamw-amsgrad": lambda: flo.adamw(lr=1e-2, weight_decay=0.1, amsgrad=True),
    "rmsprop-centered": lambda: flo.rmsprop(lr=1e-3, centered=True, momentum=0.5),
}
OPTIONS = st.builds(
    StepOptions,
    accumulate_grad_batches=st.integers(1, 3),
    gradient_clip_val=st.sampled_from([None, 0.3]),
    gradient_clip_algorithm=st.sampled_from([None, "norm", "value"]),
    skip_nonfinite=st.booleans(),
    precision=st.sampled_from(["32-true", "bf16-mixed", "16-mixed"]),
)


def _state(tx: str, seed: int = 0, frozen: bool = False) -> fl.TrainState:
    model = sc.make_dropout_bn_mlp(seed)
    if frozen:
        model.fc1.requires_grad_(False)
    return fl.TrainState.create(model, TXS[tx](), seed=seed)


def _data(state: fl.TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "buffers": state.buffers, "opt_state": state.opt_state, "options": state.loop.options}


def _pure_run(state: fl.TrainState, options: StepOptions, batches: list[Any]) -> tuple[fl.TrainState, list[Any]]:
    metrics = []
    for b in batches:
        state, m = apply_train_step(sc.loss_fn, state, b, options)
        metrics.append(m)
    return state, metrics


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(sorted(TXS)), OPTIONS, st.booleans(), st.booleans(), st.integers(0, 3))
def test_fast_and_donated_paths_equal_the_meaning(tx, options, frozen, donate, seed):
    state = _state(tx, seed, frozen)
    batches = sc.make_batches(5, seed=seed)
    expected, expected_metrics = _pure_run(state, options, batches)
    step = fl.train_step(sc.loss_fn).with_options(options)
    s = copy.deepcopy(state) if donate else state
    for b, want in zip(batches, expected_metrics):
        s, m = (step.donated if donate else step)(s, b)
        assert_trees_equal(m, {k: v.detach() for k, v in want.items()})
    assert_trees_equal(_data(s), _data(expected))


def test_flush_of_the_fast_path_equals_the_meaning():
    options = StepOptions(accumulate_grad_batches=3, gradient_clip_val=0.5)
    state = _state("adam")
    expected, _ = _pure_run(state, options, sc.make_batches(2))
    fast = state
    for b in sc.make_batches(2):
        fast, _ = fl.train_step(sc.loss_fn).with_options(options)(fast, b)
    assert_trees_equal(_data(fl.step.flush_window(fast, options)), _data(fl.step.flush_window(expected, options)))
    flushed = fl.step.flush_window(expected, options)
    assert not torch.equal(flushed.params["fc1.weight"], state.params["fc1.weight"])  # the window was applied


def test_identity_fast_path_rechecks_a_state_it_did_not_produce():
    """A state this step produced skips the structure check; one with other params does not."""
    state = _state("adam")
    step = fl.train_step(sc.loss_fn)
    new, _ = step(state, sc.make_batch())
    wrong = new.replace(params={**new.params, "fc1.weight": torch.zeros(2, 2)})
    with pytest.raises(fl.TreeMismatchError, match="fc1.weight"):
        step(wrong, sc.make_batch())
    again, _ = step(new, sc.make_batch(seed=1))
    expected, _ = apply_train_step(sc.loss_fn, new, sc.make_batch(seed=1))
    assert_trees_equal(_data(again), _data(expected))


def test_seed_cache_follows_states_it_did_not_produce():
    """Stepping an older state (not the one the cache remembers) draws that state's own mask."""
    state = _state("sgd-momentum")
    step = fl.train_step(sc.loss_fn)
    batches = sc.make_batches(3)
    s1, _ = step(state, batches[0])
    s2, _ = step(s1, batches[1])
    again, m = step(s1, batches[1])  # back to s1: its step tensor is not the one last produced
    expected, want = apply_train_step(sc.loss_fn, s1, batches[1])
    assert_trees_equal(_data(again), _data(expected))
    assert_trees_equal(_data(s2), _data(expected))


@pytest.mark.parametrize("kind", ["eval", "predict"])
def test_eval_fast_path_equals_the_meaning(kind):
    state = _state("adam")
    for b in sc.make_batches(3):
        state, _ = fl.train_step(sc.loss_fn)(state, b)
    fn, finish = (sc.eval_fn, fl.eval_step(sc.eval_fn)._finish) if kind == "eval" else (sc.predict_fn, lambda out: out)
    step = fl.eval_step(fn) if kind == "eval" else fl.predict_step(fn)
    batch = sc.make_batch(seed=5)
    with fl.rng.seeded(fl.execution.state_seed(state.rng, state.step), []):
        expected = eval_core(fn, state.module, finish)(state.params, state.buffers, batch)
    assert_trees_equal(step(state, batch), expected)


def test_a_pinned_state_is_stepped_purely_until_unpinned():
    """What an async save is still writing is never updated in place: a donated step on a pinned
    state runs the pure path (the input keeps its values and stays usable), then donates again."""
    state = _state("adamw-amsgrad")
    before = copy.deepcopy(_data(state))
    unpin = fl.execution.pin(state)
    step = fl.train_step(sc.loss_fn)
    new, _ = step.donated(state, sc.make_batch())
    assert_trees_equal(_data(state), before)
    state.params  # noqa: B018 - still readable, and accepted by every entry point:
    fl.eval_step(sc.eval_fn)(state, sc.make_batch())
    unpin()
    expected, _ = apply_train_step(sc.loss_fn, state, sc.make_batch())
    assert_trees_equal(_data(new), _data(expected))
    step.donated(state, sc.make_batch())
    with pytest.raises(fl.StepError, match="donated"):
        step(state, sc.make_batch())


def test_async_saves_during_a_donating_fit_hold_the_saved_values(tmp_path):
    """An async save writes the state's own tensors while the donating fit goes on: every
    checkpoint equals the one a synchronous save writes at the same step."""
    data = sc.make_batches(6)

    def run(async_save: bool, folder: str) -> list[str]:
        mgr = fl.CheckpointManager(str(tmp_path / folder), keep_last=10, every_n_steps=1, async_save=async_save)
        trainer = fl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False)
        trainer.fit(_state("adam"), fl.train_step(sc.loss_fn), data, checkpoint=mgr)
        mgr.close()
        return sorted((tmp_path / folder).iterdir())

    sync_dirs, async_dirs = run(False, "sync"), run(True, "async")
    assert [d.name for d in sync_dirs] == [d.name for d in async_dirs] and len(sync_dirs) >= 10
    like = _state("adam")
    for a, b in zip(sync_dirs, async_dirs):
        assert_trees_equal(_data(fl.restore(str(b), like=like)), _data(fl.restore(str(a), like=like)))
