"""``flo.ema_params`` against ``torch.optim.swa_utils.AveragedModel`` with an EMA average."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_trees_close

import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

OPTIMIZERS = {
    "sgd": (lambda: flo.sgd(lr=0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    "adamw": (lambda: flo.adamw(lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2)),
}


@pytest.mark.parametrize("decay", [0.0, 0.9, 0.999])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("compiled", [False, True])
def test_equals_torch_averaged_model(name, decay, compiled):
    ours, theirs = OPTIMIZERS[name]
    model = sc.make_mlp()
    ref = copy.deepcopy(model)
    opt = theirs(ref.parameters())
    avg = AveragedModel(ref, multi_avg_fn=get_ema_multi_avg_fn(decay))
    state = fl.TrainState.create(model, flo.ema_params(ours(), decay))
    step = fl.train_step(sc.plain_loss)
    if compiled:
        step = fl.compile(step, backend="aot_eager")
    for batch in sc.make_batches(4):
        opt.zero_grad()
        sc.plain_loss(ref, batch).backward()
        opt.step()
        avg.update_parameters(ref)
        state, _ = step(state, batch)
    expected = {k.removeprefix("module."): v.detach() for k, v in avg.named_parameters()}
    assert_trees_close(flo.averaged_params(state.opt_state), expected, rtol=1e-6, atol=1e-7)
    assert_trees_close(state.params, dict(ref.named_parameters()), rtol=1e-6, atol=1e-7)


def test_the_average_is_checkpointed_and_evaluated(tmp_path):
    state = fl.TrainState.create(sc.make_mlp(), flo.ema_params(flo.sgd(lr=0.1), 0.5))
    for batch in sc.make_batches(3):
        state, _ = fl.train_step(sc.plain_loss)(state, batch)
    fl.save(state, str(tmp_path / "ckpt"))
    back = fl.restore(str(tmp_path / "ckpt"), like=state)
    fl.testing.assert_trees_equal(flo.averaged_params(back.opt_state), flo.averaged_params(state.opt_state))
    evaluated = fl.eval_step(sc.plain_loss)(state.replace(params=flo.averaged_params(state.opt_state)), sc.make_batch())
    assert torch.isfinite(evaluated["loss"])
    with pytest.raises(fl.ConfigError, match="holds no average"):
        flo.averaged_params(fl.TrainState.create(sc.make_mlp(), flo.sgd(lr=0.1)).opt_state)
