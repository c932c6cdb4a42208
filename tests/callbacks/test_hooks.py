"""Hooks beyond the fit loop's order: checkpoint metadata written and read back, exceptions,
states returned by hooks, and hooks nobody overrides costing nothing."""

from __future__ import annotations

import pytest
import torch

import fnloop as fl
from fnloop.callbacks import with_callback_state
from fnloop.checkpoint._read import read_meta
from fnloop.loops.hooks import Hooks

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


class Tagger(fl.Callback):
    def __init__(self):
        self.loaded = []

    def on_save_checkpoint(self, state, metadata):
        return {**metadata, "tag": f"step-{state.loop.global_step}", "lr_scale": 0.5}

    def on_load_checkpoint(self, state, metadata):
        self.loaded.append(dict(metadata))
        return with_callback_state(state, "Tagger", {"restored_from": metadata["tag"]})


def test_save_checkpoint_adds_metadata_and_load_checkpoint_reads_it(tmp_path):
    url = str(tmp_path / "ckpt")
    tagger = Tagger()
    trainer = sc.quiet_trainer(max_epochs=1, callbacks=[tagger, fl.ModelCheckpoint(url, every_n_steps=2)])
    sc_data = sc.batches(4)
    trainer.fit(sc.linear_state(), fl.train_step(sc.mse), sc_data)
    manager = fl.CheckpointManager(url)
    meta = read_meta(manager.latest())["metrics"]
    assert meta["tag"] == "step-4" and meta["lr_scale"] == 0.5
    resumed = sc.quiet_trainer(max_epochs=2, callbacks=[tagger, fl.ModelCheckpoint(url, every_n_steps=2)]).fit(
        sc.linear_state(), fl.train_step(sc.mse), sc_data, ckpt_path="last"
    )
    assert [m["tag"] for m in tagger.loaded] == ["step-4"]
    assert resumed.loop.callbacks["Tagger"] == {"restored_from": "step-4"}


def test_on_exception_gets_the_last_state_and_teardown_is_not_called():
    seen = []

    class Rec(fl.Callback):
        def on_train_batch_end(self, state, metrics):
            if state.loop.global_step == 3:
                raise RuntimeError("boom")

        def on_exception(self, state, exception):
            seen.append(("exception", state.loop.global_step, state.loop.status, str(exception)))

        def teardown(self, state, stage):
            seen.append(("teardown", stage))

    with pytest.raises(RuntimeError, match="boom"):
        sc.quiet_trainer(max_epochs=1, callbacks=[Rec()]).fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(5))
    assert seen == [("exception", 3, "failed", "boom")]


def test_states_returned_by_setup_and_batch_start_reach_the_step():
    steps_seen = []

    class Mark(fl.Callback):
        def setup(self, state, stage):
            return with_callback_state(state, "Mark", {"stage": stage})

        def on_train_batch_start(self, state, batch, batch_idx):
            steps_seen.append((batch_idx, state.loop.callbacks["Mark"]["stage"]))

    state = sc.quiet_trainer(max_epochs=1, callbacks=[Mark()]).fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(2))
    assert steps_seen == [(0, "fit"), (1, "fit")]
    assert state.loop.callbacks["Mark"] == {"stage": "fit"}


def test_only_overridden_hooks_are_called():
    class One(fl.Callback):
        def on_train_batch_start(self, state, batch, batch_idx):
            return state + 1

    hooks = Hooks([fl.Callback(), One(), fl.Callback()])
    assert hooks.wants("on_train_batch_start") and not hooks.wants("on_train_batch_end")
    assert hooks("on_train_batch_start", 0, None, 0) == 1
    assert hooks.overriding("on_train_batch_start") == [hooks.callbacks[1]]


def test_predict_hooks_see_outputs_and_return_predictions_false_keeps_none():
    outs = []

    class Keep(fl.Callback):
        def on_predict_batch_end(self, state, outputs, batch, batch_idx, dataloader_idx):
            outs.append(outputs.shape[0])

    step = fl.predict_step(lambda m, b: m(b[0]))
    got = sc.quiet_trainer(callbacks=[Keep()]).predict(sc.linear_state(), step, sc.batches(3), return_predictions=False)
    assert got is None and outs == [4, 4, 4]
    assert torch.is_tensor(sc.quiet_trainer().predict(sc.linear_state(), step, sc.batches(1))[0])


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_on_exception_is_called_when_an_evaluation_stage_raises(stage):
    seen = []

    class Rec(fl.Callback):
        def on_exception(self, state, exception):
            seen.append(str(exception))

    def boom(model, batch):
        raise ValueError("bad batch")

    step = fl.predict_step(boom) if stage == "predict" else fl.eval_step(boom)
    with pytest.raises(ValueError, match="bad batch"):
        getattr(sc.quiet_trainer(callbacks=[Rec()]), stage)(sc.linear_state(), step, sc.batches(1))
    assert seen == ["bad batch"]
