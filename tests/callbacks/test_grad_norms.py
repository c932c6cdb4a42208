"""on_before_optimizer_step with opt-in gradient norms: the norms and gradients a hand-written
torch loop computes, at optimizer steps only, nothing extra in the default step."""

from __future__ import annotations

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import ConfigError

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


class Seen(fl.Callback):
    def __init__(self):
        self.rows = []

    def on_before_optimizer_step(self, state, grad_norms):
        self.rows.append((state.loop.batch_idx, {k: v.clone() for k, v in grad_norms.items()},
                          {k: v.clone() for k, v in flo.tracked_grads(state.opt_state).items()}))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_norms_and_grads_equal_a_hand_written_loop(accumulate):
    data = sc.batches(4)
    seen = Seen()
    tx = flo.chain(flo.track_grad_norms(keep_grads=True), flo.sgd(lr=0.1))
    sc.quiet_trainer(max_epochs=1, callbacks=[seen], accumulate_grad_batches=accumulate).fit(
        fl.TrainState.create(sc.make_linear(), tx), fl.train_step(sc.mse), data
    )
    ref = sc.make_linear()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    expected = []
    for i, batch in enumerate(data):
        (sc.mse(ref, batch) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
            total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
            expected.append((i, grads, total))
            opt.step()
            opt.zero_grad()
    assert [r[0] for r in seen.rows] == [i for i, _, _ in expected]  # batch_idx is still the batch's index
    for (_, norms, grads), (_, ref_grads, total) in zip(seen.rows, expected):
        torch.testing.assert_close(norms["grad_2.0_norm_total"], total, rtol=1e-5, atol=1e-7)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(norms[f"grad_2.0_norm/{name}"], g.norm(), rtol=1e-5, atol=1e-7)


def test_without_the_transform_the_hook_gets_no_norms_and_the_state_tree_is_unchanged():
    seen = Seen()
    state = sc.quiet_trainer(max_epochs=1, callbacks=[seen]).fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(2))
    assert [r[1] for r in seen.rows] == [{}, {}]
    assert fl.tree_structure(state.opt_state) == fl.tree_structure(sc.linear_state().opt_state)


def test_a_bad_norm_type_is_named():
    with pytest.raises(ConfigError, match="norm_type"):
        flo.track_grad_norms(0)
