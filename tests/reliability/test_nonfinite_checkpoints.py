"""No checkpoint is committed from a non-finite state unless asked, pruning never removes the
newest finite checkpoint, and ``ckpt_path="last"`` after a divergence resumes finite weights."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop.checkpoint import CheckpointManager, read_meta
from fnloop.checkpoint._policy import Checkpoint, KeepPolicy, to_delete
from fnloop.errors import CheckpointError, FnloopError
from scenarios import small_state


def _poisoned(state: fl.TrainState, where: str) -> fl.TrainState:
    if where == "params":
        return state.replace(params={**state.params, "weight": torch.full_like(state.params["weight"], math.nan)})
    mu = state.opt_state[0].mu
    first = state.opt_state[0]._replace(mu={**mu, "bias": torch.full_like(mu["bias"], math.inf)})
    return state.replace(opt_state=(first, *state.opt_state[1:]))


@pytest.mark.parametrize("where", ["params", "opt_state"])
@pytest.mark.parametrize("async_save", [False, True])
def test_manager_refuses_a_non_finite_state_unless_asked(tmp_path, where, async_save):
    with CheckpointManager(str(tmp_path / "a"), keep_last=1, async_save=async_save) as mgr:
        mgr.save(small_state(step=1))
        with pytest.raises(CheckpointError, match=f"nan or inf in \\['{where}/"):
            mgr.save(_poisoned(small_state(step=2), where))
        assert mgr.latest().endswith("step-00000001")
    with CheckpointManager(str(tmp_path / "b"), save_non_finite=True, async_save=async_save) as mgr:
        url = mgr.save(_poisoned(small_state(step=2), where))
        mgr.wait()
        assert read_meta(url)["finite"] is False


@pytest.mark.parametrize("where", ["params", "opt_state", None])
@pytest.mark.parametrize("folder", ["local", "memory"])
def test_save_records_whether_the_state_is_finite(tmp_path, where, folder):
    """fl.save checks the tensors while it writes them; meta.json holds the answer."""
    state = small_state(step=3) if where is None else _poisoned(small_state(step=3), where)
    url = str(tmp_path / "ckpt") if folder == "local" else f"memory://finite-{where}/ckpt"
    fl.save(state, url, overwrite=True)
    assert read_meta(url)["finite"] is (where is None)
    fl.testing.assert_trees_equal(fl.restore(url, like=small_state()).params, state.params)


def test_buffers_may_hold_infinities(tmp_path):
    state = small_state().replace(buffers={"mask": torch.tensor([-math.inf, 0.0])})
    with CheckpointManager(str(tmp_path)) as mgr:
        assert read_meta(mgr.save(state))["finite"] is True


@settings(max_examples=200, deadline=None)
@given(
    finite=st.lists(st.booleans(), min_size=1, max_size=12),
    keep_last=st.one_of(st.none(), st.integers(1, 4)),
    keep_every=st.one_of(st.none(), st.integers(1, 5)),
)
def test_pruning_never_removes_the_newest_finite_checkpoint(finite, keep_last, keep_every):
    cks = [Checkpoint(step, f"s{step}", None, ok) for step, ok in enumerate(finite, start=1)]
    doomed = set(to_delete(cks, KeepPolicy(keep_last=keep_last, keep_every_n_steps=keep_every)))
    kept = [c for c in cks if c.name not in doomed]
    assert cks[-1] in kept
    if any(finite):
        newest_finite = [c for c in cks if c.finite][-1]
        assert newest_finite in kept


def _diverging_loss(at: int):
    """An MSE loss that becomes nan from the batch whose inputs hold ``at`` on."""

    def loss_fn(model, batch):
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss * math.nan if batch[0][0, 0].item() >= at else loss

    return loss_fn


def test_fit_that_diverges_keeps_a_finite_last_checkpoint(tmp_path):
    n = 12
    data = [(torch.full((2, 4), float(i)), torch.zeros(2, 2)) for i in range(n)]
    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2, every_n_steps=1)
    trainer = fl.Trainer(max_epochs=1, log_every_n_steps=50, enable_progress_bar=False)
    state = small_state(flo.sgd(lr=1e-3), step=0).replace(loop=small_state().loop.replace(global_step=0, epoch=0))
    with pytest.raises(FnloopError, match="non-finite|nan"):  # the loop's own check, not a failed save
        trainer.fit(state, fl.train_step(_diverging_loss(at=6)), data, checkpoint=mgr)
    mgr.close()
    latest = CheckpointManager(str(tmp_path / "ckpt")).latest()
    assert latest is not None and read_meta(latest)["finite"] is True
    restored = fl.restore(latest, like=small_state(flo.sgd(lr=1e-3)))
    assert all(torch.isfinite(p).all() for p in restored.params.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64])
def test_the_non_finite_check_is_exact(dtype):
    """Large finite values whose sum overflows are finite; one nan or inf anywhere is not."""
    from fnloop.checkpoint._finite import non_finite

    big = torch.full((1000,), torch.finfo(torch.float32 if dtype.is_complex else dtype).max, dtype=dtype)
    assert non_finite({"params/big": big, "params/expanded": torch.ones(1, dtype=dtype).expand(10**6)}) == []
    for bad in (math.nan, math.inf, -math.inf):
        t = torch.zeros(4097, dtype=dtype)
        t[4096] = bad
        assert non_finite({"params/ok": big, "params/bad": t}) == ["params/bad"]
