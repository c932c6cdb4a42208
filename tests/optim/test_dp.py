"""DP-SGD: with the noise off, equal to Opacus's DPOptimizer (test-only dependency) to 1e-6;
the noise comes from the state's key and step (reproducible, per member under fl.vmap)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_trees_close, assert_trees_equal

import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

opacus = pytest.importorskip("opacus")
from opacus import GradSampleModule  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402

SETTINGS = {
    "sgd-clip-1": dict(lr=0.1, max_grad_norm=1.0),
    "tight-clip-momentum": dict(lr=0.05, max_grad_norm=0.1, momentum=0.9),
    "loose-clip-wd": dict(lr=0.1, max_grad_norm=10.0, weight_decay=1e-2),
}


def _opacus_run(settings, batches):
    model = sc.make_mlp()
    kw = dict(settings)
    clip, lr = kw.pop("max_grad_norm"), kw.pop("lr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about its non-secure RNG
        gsm = GradSampleModule(model)
        opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=lr, **kw), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=8)
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(gsm(x), y).backward()
            opt.step()
    return {k.removeprefix("_module."): v.detach() for k, v in gsm.named_parameters()}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_noise_off_equals_opacus(name):
    batches = sc.make_batches(5)
    state = fl.TrainState.create(sc.make_mlp(), flo.dp_sgd(noise_multiplier=0.0, **SETTINGS[name]))
    step = fl.train_step(sc.plain_loss)
    for batch in batches:
        state, metrics = step(state, batch)
    assert_trees_close(state.params, _opacus_run(SETTINGS[name], batches), rtol=1e-6, atol=1e-6)
    assert int(flo.dp_state(state.opt_state).count) == len(batches)


def test_noise_is_the_states_own():
    tx = flo.dp_sgd(lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0)
    step = fl.train_step(sc.plain_loss)
    a = fl.TrainState.create(sc.make_mlp(), tx, seed=1)
    batch = sc.make_batch()
    before = torch.get_rng_state()
    one, two = step(a, batch)[0], step(a, batch)[0]
    assert_trees_equal(one.params, two.params)  # reproducible: the same key and step
    assert torch.equal(before, torch.get_rng_state())
    other = step(a.replace(rng=torch.tensor(2)), batch)[0]
    assert not torch.equal(one.params["0.weight"], other.params["0.weight"])
    # members of a stacked run draw the noise their own run draws
    states = [fl.TrainState.create(sc.make_mlp(), tx, seed=s) for s in range(3)]
    stacked, _ = fl.vmap(step)(fl.stack(states), batch)
    for member, state in zip(fl.unstack(stacked), states):
        assert_trees_close(member.params, step(state, batch)[0].params, rtol=1e-5, atol=1e-6)


def test_options_that_do_not_apply_are_refused():
    state = fl.TrainState.create(sc.make_mlp(), flo.dp_sgd(lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0))
    with pytest.raises(fl.ConfigError, match="per-example optimizer"):
        fl.train_step(sc.plain_loss, gradient_clip_val=1.0)(state, sc.make_batch())
    with pytest.raises(fl.ConfigError, match="max_grad_norm"):
        flo.dp_sgd(lr=0.1, max_grad_norm=0.0, noise_multiplier=1.0)


def test_epsilon_is_logged_by_the_privacy_monitor(tmp_path):
    tx = flo.dp_sgd(lr=0.1, max_grad_norm=1.0, noise_multiplier=1.1)
    state = fl.TrainState.create(sc.make_mlp(), tx)
    data = sc.make_batches(4)
    monitor = fl.PrivacyMonitor(sample_rate=8 / 32, delta=1e-5)
    trainer = fl.Trainer(max_epochs=2, logger=fl.JSONLLogger(str(tmp_path)), log_every_n_steps=1, callbacks=[monitor],
                         enable_progress_bar=False)
    state = trainer.fit(state, fl.train_step(sc.plain_loss), data)
    import json
    import pathlib

    rows = [json.loads(line) for f in pathlib.Path(tmp_path).rglob("*.jsonl") for line in f.read_text().splitlines()]
    logged = [r["metrics"]["epsilon"] for r in rows if "epsilon" in r.get("metrics", {})]
    assert logged and logged[-1] == pytest.approx(fl.privacy.epsilon(1.1, 0.25, 8, 1e-5), abs=1e-9)
    assert logged == sorted(logged)  # privacy is only ever spent
