"""The order of callback hooks, pinned against a real Lightning run on the same flags.

A recording callback on each side records ``(hook, batch_idx, dataloader_idx)``; the sequences of
the hooks both define are compared. Documented differences, filtered out of Lightning's side:

* the sanity check calls no ``on_validation_end`` in fnloop (that hook carries the results
  EarlyStopping and ModelCheckpoint act on, and a sanity check has none);
* fnloop calls ``on_train_epoch_end`` only when an epoch completes (ModelCheckpoint saves an
  epoch-end checkpoint there, which resumes at the next epoch); Lightning also calls it when
  ``max_steps`` stops a run mid-epoch, so the runs here stop at epoch boundaries;
* hooks fnloop has no counterpart for are absent from fnloop's list and so never compared
  (``on_before_backward``, ``on_after_backward``, ``on_before_zero_grad``: gradients stay inside
  the pure step; ``on_before_optimizer_step`` is compared).
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pl = pytest.importorskip("pytorch_lightning")

X, Y = sc.samples(8)
FN_HOOKS = {n for n, _ in inspect.getmembers(fl.Callback, inspect.isfunction) if n.startswith("on_") or n in ("setup", "teardown")}
PL_HOOKS = {n for n, _ in inspect.getmembers(pl.Callback, inspect.isfunction) if n.startswith("on_") or n in ("setup", "teardown")}
SHARED = FN_HOOKS & PL_HOOKS


def _loader(batch_size=2):
    return DataLoader(TensorDataset(X, Y), batch_size=batch_size)


def _recorder(base):
    """A ``base`` subclass recording ``(hook, stage)`` / ``(hook, batch_idx, dataloader_idx)``
    of every shared hook, read by argument name from ``base``'s own signature."""
    events = []

    def make(name):
        signature = inspect.signature(getattr(base, name))

        def hook(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if "stage" in a:
                events.append((name, a["stage"]))
            elif "dataloader_idx" in a:
                events.append((name, a["batch_idx"], a["dataloader_idx"]))
            else:
                events.append((name,))

        return hook

    cls = type("Rec", (base,), {name: make(name) for name in SHARED})
    return cls(), events


class _Module(pl.LightningModule if pl else object):
    def __init__(self):
        super().__init__()
        self.net = sc.make_linear()

    def training_step(self, batch, batch_idx):
        return sc.mse(self.net, batch)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return sc.mse(self.net, batch)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        return sc.mse(self.net, batch)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _pl_trainer(callback, **flags):
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback], **flags,
    )


def _drop_sanity_validation_end(events):
    out, in_sanity = [], False
    for e in events:
        in_sanity = (in_sanity or e[0] == "on_sanity_check_start") and e[0] != "on_sanity_check_end"
        if not (in_sanity and e[0] == "on_validation_end"):
            out.append(e)
    return out


FIT_FLAGS = [
    dict(max_epochs=2, limit_train_batches=4, limit_val_batches=2, val_check_interval=2, num_sanity_val_steps=1),
    dict(max_epochs=1, limit_train_batches=3, num_sanity_val_steps=0),
    dict(max_steps=4, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=2),
]


@pytest.mark.parametrize("flags", FIT_FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("n_val_loaders", [1, 2])
def test_fit_hook_order_matches_lightning(flags, n_val_loaders):
    val = _loader() if n_val_loaders == 1 else [_loader(), _loader(4)]
    pl_cb, pl_events = _recorder(pl.Callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _pl_trainer(pl_cb, **flags).fit(_Module(), _loader(), val)
    fn_cb, fn_events = _recorder(fl.Callback)
    fl.Trainer(enable_progress_bar=False, callbacks=[fn_cb], **flags).fit(
        sc.linear_state(), fl.train_step(sc.mse), _loader(), val_step=fl.eval_step(sc.mse), val_data=val
    )
    assert "on_validation_batch_end" in {e[0] for e in fn_events}
    assert fn_events == _drop_sanity_validation_end(pl_events)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_validate_test_predict_hook_order_matches_lightning(stage):
    data = [_loader(), _loader(4)]
    pl_cb, pl_events = _recorder(pl.Callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(_pl_trainer(pl_cb, limit_val_batches=3, limit_test_batches=3, limit_predict_batches=3), stage)(
            _Module(), data
        )
    fn_cb, fn_events = _recorder(fl.Callback)
    step = fl.predict_step(lambda m, b: m(b[0])) if stage == "predict" else fl.eval_step(sc.mse)
    trainer = fl.Trainer(
        enable_progress_bar=False, callbacks=[fn_cb], limit_val_batches=3, limit_test_batches=3, limit_predict_batches=3
    )
    getattr(trainer, stage)(sc.linear_state(), step, data)
    assert len(fn_events) > 8
    assert fn_events == pl_events
