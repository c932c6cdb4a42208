"""reduce_on_plateau against torch.optim.lr_scheduler.ReduceLROnPlateau: the same LR after every
metric of the same sequence, over modes, thresholds, cooldowns and floors; training with it
equals torch SGD under the scheduler; the callback steps it with a validation metric."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import ConfigError

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

SETTINGS = [
    dict(),
    dict(mode="max", factor=0.5, patience=1),
    dict(patience=0, threshold=0.1, threshold_mode="abs", cooldown=2),
    dict(patience=2, factor=0.3, min_lr=0.02),
    dict(mode="max", threshold=0.05, threshold_mode="rel", cooldown=1, patience=0, min_lr=0.001),
]


def _torch_lrs(lr, values, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
    out = []
    for v in values:
        sched.step(v)
        out.append(opt.param_groups[0]["lr"])
    return out


@settings(max_examples=30, deadline=None)
@example(kw=SETTINGS[1], values=[1.0, 0.9])  # 1.0 - 0.1 == 0.9 in float64, not through float32
@given(
    kw=st.sampled_from(SETTINGS),
    values=st.lists(st.sampled_from([1.0, 0.9, 0.95, 1.2, 0.5, 0.49, 2.0, 0.0, -1.0]), min_size=1, max_size=25),
)
def test_lr_after_each_metric_equals_torch(kw, values):
    lr = 0.1
    opt_state = flo.chain(flo.sgd(lr=lr), flo.reduce_on_plateau(lr, **kw)).init({"w": torch.zeros(1)})
    ours = []
    for v in values:
        opt_state = flo.plateau_step(opt_state, v)
        ours.append(float(flo.plateau_lr(opt_state)))
    assert ours == pytest.approx(_torch_lrs(lr, values, **kw), rel=1e-12, abs=0)


def test_training_equals_torch_sgd_under_the_scheduler():
    data = sc.batches(3)
    metrics = [1.0, 1.0, 1.0, 0.5, 0.6, 0.7]
    module = sc.make_linear(1)
    ref = sc.make_linear(1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    tx = flo.chain(flo.sgd(lr=0.2, momentum=0.9), flo.reduce_on_plateau(0.2, factor=0.5, patience=1))
    state = fl.TrainState.create(module, tx)
    step = fl.train_step(sc.mse)
    for m in metrics:
        for batch in data:
            state, _ = step(state, batch)
            opt.zero_grad()
            sc.mse(ref, batch).backward()
            opt.step()
        sched.step(m)
        state = state.replace(opt_state=flo.plateau_step(state.opt_state, m))
    assert float(flo.plateau_lr(state.opt_state)) == opt.param_groups[0]["lr"] < 0.2
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_the_callback_steps_with_the_monitored_validation_metric():
    tx = flo.chain(flo.sgd(lr=0.1), flo.reduce_on_plateau(0.1, factor=0.5, patience=0, mode="max"))
    state = fl.TrainState.create(sc.make_linear(), tx)
    # a constant validation metric never improves in "max" mode after the first epoch: halved each later epoch
    const = fl.eval_step(lambda m, b: {"score": torch.tensor(1.0)})
    trainer = sc.quiet_trainer(max_epochs=4, callbacks=[fl.ReduceLROnPlateau("val/score")], num_sanity_val_steps=0)
    state = trainer.fit(state, fl.train_step(sc.mse), sc.batches(2), val_step=const, val_data=sc.batches(1))
    assert float(flo.plateau_lr(state.opt_state)) == pytest.approx(0.1 * 0.5**3)
    with pytest.raises(ConfigError, match="val/missing"):
        sc.quiet_trainer(max_epochs=1, callbacks=[fl.ReduceLROnPlateau("val/missing")], num_sanity_val_steps=0).fit(
            fl.TrainState.create(sc.make_linear(), tx), fl.train_step(sc.mse), sc.batches(1), val_step=const, val_data=sc.batches(1)
        )


@pytest.mark.parametrize(("kw", "word"), [(dict(mode="up"), "mode"), (dict(factor=1.0), "factor"), (dict(patience=-1), "patience")])
def test_bad_settings_name_the_argument(kw, word):
    with pytest.raises(ConfigError, match=word):
        flo.reduce_on_plateau(0.1, **kw)


def test_plateau_step_without_the_transform_says_how_to_add_it():
    with pytest.raises(ConfigError, match="reduce_on_plateau"):
        flo.plateau_step(flo.sgd(lr=0.1).init({"w": torch.zeros(1)}), 1.0)
