"""Trainer.validate / test / predict: batch-size weighted means over the whole loader, outputs in
order, batch limits, eval mode."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
from fnloop.errors import ConfigError
from fnloop.testing import assert_trees_equal

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

X, Y = sc.samples(10)


def _loader(batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(X, Y), batch_size=batch_size)  # batches of 4, 4, 2


def _metrics(model, batch):
    x, y = batch
    err = model(x) - y
    return {"loss": err.square().mean(), "mae": err.abs().mean()}


def _by_hand(module: torch.nn.Module, n: int) -> dict[str, float]:
    """Per-sample means over the first ``n`` samples, computed directly."""
    with torch.no_grad():
        err = (module(X[:n]) - Y[:n]).double()
    return {"loss": float(err.square().mean()), "mae": float(err.abs().mean())}


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_metrics_are_batch_size_weighted_over_the_loader(stage):
    module = sc.make_linear(3)
    state = fl.TrainState.create(module, fl.optim.sgd(lr=0.1))
    out = getattr(sc.quiet_trainer(), stage)(state, fl.eval_step(_metrics), _loader())
    prefix = "val" if stage == "validate" else "test"
    expected = _by_hand(module, 10)
    assert sorted(out) == [f"{prefix}/loss", f"{prefix}/mae"]
    for key, value in expected.items():
        assert isinstance(out[f"{prefix}/{key}"], float)
        assert out[f"{prefix}/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-7)
    # the unweighted mean of the three batch means is a different number: weighting matters
    with torch.no_grad():
        per_batch = [float((module(x) - y).square().mean()) for x, y in _loader()]
    assert abs(sum(per_batch) / 3 - expected["loss"]) > 1e-3


@pytest.mark.parametrize(("limit", "samples"), [(2, 8), (0.5, 4), (1.0, 10), (0, 0)])
def test_limit_test_batches(limit, samples):
    module = sc.make_linear(3)
    state = fl.TrainState.create(module, fl.optim.sgd(lr=0.1))
    out = sc.quiet_trainer(limit_test_batches=limit).test(state, fl.eval_step(_metrics), _loader())
    if samples == 0:
        assert out == {}
        return
    assert out["test/loss"] == pytest.approx(_by_hand(module, samples)["loss"], rel=1e-6, abs=1e-7)


def test_predict_returns_outputs_in_order_and_respects_its_limit():
    module = sc.make_linear(4)
    state = fl.TrainState.create(module, fl.optim.sgd(lr=0.1))
    step = fl.predict_step(lambda model, batch: model(batch[0]))
    outs = sc.quiet_trainer().predict(state, step, _loader())
    assert [o.shape[0] for o in outs] == [4, 4, 2]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(outs), module(X), rtol=0, atol=1e-6)
    limited = sc.quiet_trainer(limit_predict_batches=2).predict(state, step, _loader())
    assert len(limited) == 2
    torch.testing.assert_close(torch.cat(limited), torch.cat(outs[:2]), rtol=0, atol=0)


def test_fast_dev_run_runs_one_batch_of_each_stage():
    module = sc.make_linear(3)
    state = fl.TrainState.create(module, fl.optim.sgd(lr=0.1))
    trainer = sc.quiet_trainer(fast_dev_run=True)
    out = trainer.test(state, fl.eval_step(_metrics), _loader())
    assert out["test/loss"] == pytest.approx(_by_hand(module, 4)["loss"], rel=1e-6, abs=1e-7)
    assert len(trainer.predict(state, fl.predict_step(lambda m, b: m(b[0])), _loader())) == 1


def test_eval_and_predict_run_in_eval_mode_without_grad():
    module = sc.make_dropout_mlp(seed=5, p=0.9)
    state = fl.TrainState.create(module, fl.optim.sgd(lr=0.1))
    modes = []

    def predict(model, batch):
        modes.append((model.training, torch.is_grad_enabled()))
        return model(batch[0])

    def train_loss(model, batch):
        modes.append(("train", model.training))
        return sc.mse(model, batch)

    def predict_loss(model, batch):
        return torch.nn.functional.mse_loss(predict(model, batch), batch[1])

    outs = sc.quiet_trainer().predict(state, fl.predict_step(predict), _loader())
    reference = copy.deepcopy(module).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(outs), reference(X), rtol=0, atol=1e-6)  # dropout (p=0.9) is off
    assert set(modes) == {(False, False)}
    # a train step in between does not leave the module in train mode for the next evaluation
    modes.clear()
    state = sc.quiet_trainer(max_epochs=1).fit(state, fl.train_step(train_loss), sc.batches(1))
    sc.quiet_trainer().validate(state, fl.eval_step(predict_loss), _loader())
    assert modes[0] == ("train", True)
    assert modes[1:] == [(False, False)] * 3


def test_validate_leaves_the_state_untouched():
    state = sc.linear_state()
    before = fl.tree_map(lambda t: t.clone(), state.params)
    sc.quiet_trainer().validate(state, fl.eval_step(_metrics), _loader())
    assert_trees_equal(state.params, before)
    assert state.loop.val_count == 0


def test_metrics_go_to_the_logger_at_the_state_step():
    sink = sc.RecordingLogger()
    state = sc.quiet_trainer(max_epochs=1).fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(3))
    out = sc.quiet_trainer(logger=sink).test(state, fl.eval_step(_metrics), _loader())
    assert sink.metrics == [(3, out)]
    assert sink.statuses == ["finished"]


def test_a_metrics_table_is_printed_when_asked(capsys):
    fl.Trainer(enable_progress_bar=True).test(sc.linear_state(), fl.eval_step(_metrics), _loader())
    printed = capsys.readouterr().out
    assert "test/loss" in printed and "test/mae" in printed


def test_stage_data_from_a_datamodule():
    class Module:
        def __init__(self):
            self.stages = []

        def setup(self, stage):
            self.stages.append(stage)

        def val_data(self):
            return _loader()

        def test_data(self):
            return _loader(5)

        def predict_data(self):
            return _loader(3)

    dm = Module()
    state = sc.linear_state()
    trainer = sc.quiet_trainer()
    assert set(trainer.validate(state, fl.eval_step(_metrics), datamodule=dm)) == {"val/loss", "val/mae"}
    assert set(trainer.test(state, fl.eval_step(_metrics), datamodule=dm)) == {"test/loss", "test/mae"}
    assert len(trainer.predict(state, fl.predict_step(lambda m, b: m(b[0])), datamodule=dm)) == 4
    assert dm.stages == ["validate", "test", "predict"]


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_missing_data_names_the_stage(stage):
    step = fl.predict_step(sc.mse) if stage == "predict" else fl.eval_step(sc.mse)
    with pytest.raises(ConfigError, match="data is missing"):
        getattr(sc.quiet_trainer(), stage)(sc.linear_state(), step)
