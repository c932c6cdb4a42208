"""``inference_mode`` and ``reload_dataloaders_every_n_epochs`` with Lightning's meanings."""

from __future__ import annotations

import pytest
import torch

import fnloop as fl
from fnloop.errors import ConfigError

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


@pytest.mark.parametrize("inference", [True, False])
def test_eval_and_predict_run_under_inference_mode_or_no_grad(inference):
    seen = []

    def probe(model, batch):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return sc.mse(model, batch)

    trainer = sc.quiet_trainer(max_epochs=1, inference_mode=inference, num_sanity_val_steps=0)
    state = trainer.fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(2), val_step=fl.eval_step(probe), val_data=sc.batches(1))
    trainer.test(state, fl.eval_step(probe), sc.batches(1))
    trainer.predict(state, fl.predict_step(probe), sc.batches(1))
    assert seen == [(inference, False)] * 3
    # training continues from a state evaluated under inference mode
    again = sc.quiet_trainer(max_epochs=2).fit(state, fl.train_step(sc.mse), sc.batches(2))
    assert again.loop.global_step == 4


class Counting:
    def __init__(self):
        self.calls = {"train": 0, "val": 0}

    def train_data(self):
        self.calls["train"] += 1
        return sc.batches(2, seed=self.calls["train"])

    def val_data(self):
        self.calls["val"] += 1
        return sc.batches(1)


@pytest.mark.parametrize(("every", "train_calls"), [(0, 1), (1, 5), (2, 3)])
def test_reload_dataloaders_every_n_epochs_asks_the_datamodule_again(every, train_calls):
    dm = Counting()
    trainer = sc.quiet_trainer(max_epochs=5, reload_dataloaders_every_n_epochs=every)
    trainer.fit(sc.linear_state(), fl.train_step(sc.mse), datamodule=dm, val_step=fl.eval_step(sc.mse))
    assert dm.calls == {"train": train_calls, "val": train_calls}


@pytest.mark.parametrize(("flag", "value"), [("reload_dataloaders_every_n_epochs", -1), ("inference_mode", "yes"), ("enable_model_summary", 1)])
def test_bad_values_name_the_flag(flag, value):
    with pytest.raises(ConfigError, match=flag):
        fl.Trainer(**{flag: value})
