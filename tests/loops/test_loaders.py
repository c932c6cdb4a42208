"""Several evaluation and prediction loaders: each runs in turn with its own limit, metrics are
named as Lightning names them (``val/loss/dataloader_idx_1``) or by dict key, steps per loader."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
from fnloop.errors import ConfigError

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

XA, YA = sc.samples(10, seed=1)
XB, YB = sc.samples(6, seed=2)


def _loaders():
    return [DataLoader(TensorDataset(XA, YA), batch_size=4), DataLoader(TensorDataset(XB, YB), batch_size=4)]


def _by_hand(module, x, y):
    with torch.no_grad():
        return float((module(x) - y).double().square().mean())


@pytest.mark.parametrize(("stage", "prefix"), [("validate", "val"), ("test", "test")])
def test_a_list_of_loaders_gives_one_value_per_loader_named_by_dataloader_idx(stage, prefix):
    module = sc.make_linear(3)
    state = fl.TrainState.create(module, fl.optim.sgd(lr=0.1))
    out = getattr(sc.quiet_trainer(), stage)(state, fl.eval_step(sc.mse), _loaders())
    assert sorted(out) == [f"{prefix}/loss/dataloader_idx_0", f"{prefix}/loss/dataloader_idx_1"]
    assert out[f"{prefix}/loss/dataloader_idx_0"] == pytest.approx(_by_hand(module, XA, YA), rel=1e-6)
    assert out[f"{prefix}/loss/dataloader_idx_1"] == pytest.approx(_by_hand(module, XB, YB), rel=1e-6)


def test_a_dict_of_loaders_is_named_by_key_and_the_limit_applies_per_loader():
    module = sc.make_linear(3)
    state = fl.TrainState.create(module, fl.optim.sgd(lr=0.1))
    clean, noisy = _loaders()
    out = sc.quiet_trainer(limit_test_batches=1).test(state, fl.eval_step(sc.mse), {"clean": clean, "noisy": noisy})
    assert sorted(out) == ["test/loss/clean", "test/loss/noisy"]
    assert out["test/loss/clean"] == pytest.approx(_by_hand(module, XA[:4], YA[:4]), rel=1e-6)
    assert out["test/loss/noisy"] == pytest.approx(_by_hand(module, XB[:4], YB[:4]), rel=1e-6)


def test_a_list_of_steps_gives_each_loader_its_own_step():
    state = sc.linear_state()
    steps = [fl.eval_step(lambda m, b, i=i: {"idx": torch.tensor(float(i))}) for i in range(2)]
    out = sc.quiet_trainer().validate(state, steps, _loaders())
    assert out == {"val/idx/dataloader_idx_0": 0.0, "val/idx/dataloader_idx_1": 1.0}
    with pytest.raises(ConfigError, match="3 steps for 2 loaders"):
        sc.quiet_trainer().validate(state, steps + steps[:1], _loaders())


def test_a_list_of_batches_is_still_one_loader():
    out = sc.quiet_trainer().validate(sc.linear_state(), fl.eval_step(sc.mse), sc.batches(3))
    assert list(out) == ["val/loss"]


def test_batch_hooks_see_the_dataloader_idx():
    seen = []

    class Rec(fl.Callback):
        def on_test_batch_end(self, state, metrics, batch, batch_idx, dataloader_idx):
            seen.append((dataloader_idx, batch_idx))

    sc.quiet_trainer(callbacks=[Rec()]).test(sc.linear_state(), fl.eval_step(sc.mse), _loaders())
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def test_predict_over_several_loaders_returns_one_list_per_loader():
    module = sc.make_linear(4)
    state = fl.TrainState.create(module, fl.optim.sgd(lr=0.1))
    step = fl.predict_step(lambda model, batch: model(batch[0]))
    outs = sc.quiet_trainer(limit_predict_batches=2).predict(state, step, _loaders())
    assert [[o.shape[0] for o in per] for per in outs] == [[4, 4], [4, 2]]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(outs[1]), module(XB), rtol=0, atol=1e-6)
    named = sc.quiet_trainer().predict(state, step, dict(zip("ab", _loaders())))
    assert list(named) == ["a", "b"] and len(named["a"]) == 3


def test_fit_validates_every_loader_and_logs_each():
    sink = sc.RecordingLogger()
    trainer = sc.quiet_trainer(max_epochs=1, logger=sink, num_sanity_val_steps=0)
    trainer.fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(2), val_step=fl.eval_step(sc.mse), val_data=_loaders())
    assert [v for _, v in sink.values("val/loss/dataloader_idx_1")] and sink.values("val/loss/dataloader_idx_0")
    assert not sink.values("val/loss")
