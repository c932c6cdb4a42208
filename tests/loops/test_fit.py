"""Trainer.fit against Lightning's loop semantics, written out by hand.

The expected numbers in the tables below are computed by hand from Lightning's documented
rules, not with fnloop's own rule functions:

* optimizer step after batch ``b`` (0-based in the epoch) when ``(b + 1) % k == 0`` or ``b`` is
  the last batch of the epoch (``k = accumulate_grad_batches``);
* ``max_steps`` stops as soon as ``global_step`` reaches it; ``max_epochs`` is 1000 when neither
  limit is given; ``limit_train_batches`` int ``k`` -> ``min(n, k)`` batches, float ``f`` ->
  ``int(n * f)``;
* ``val_check_interval`` float ``f``: validate after ``b`` when ``(b + 1) % max(1, int(n * f)) == 0``;
  int ``k``: when ``(b + 1) % k == 0``, or ``(total_batch_idx + 1) % k == 0`` with
  ``check_val_every_n_epoch=None``; only in epochs with ``(epoch + 1) % check_val_every_n_epoch == 0``;
* sanity check: ``num_sanity_val_steps`` val batches before training (-1: all), not counted in
  ``val_count``, and none when a run with progress is continued.

Validations are listed as ``(epoch, global_step, b)``: the epoch, the optimizer steps done and
the 0-based index of the training batch after which validation ran.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import ConfigError

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

V = 3  # validation batches

# id, train batches per epoch, data kind, flags,
# expected: global_step, val_count, sanity batches, val batches per run, validations, (epoch, batch_idx) at the end
TABLE = [
    ("k3_one_epoch", 10, "list", dict(max_epochs=1, accumulate_grad_batches=3),
     4, 1, 2, V, [(0, 4, 9)], (1, 0)),
    ("k3_quarter_interval", 10, "loader", dict(max_epochs=2, accumulate_grad_batches=3, val_check_interval=0.25),
     8, 10, 2, V, [(0, 0, 1), (0, 1, 3), (0, 2, 5), (0, 2, 7), (0, 4, 9),
                   (1, 4, 1), (1, 5, 3), (1, 6, 5), (1, 6, 7), (1, 8, 9)], (2, 0)),
    ("every_2nd_epoch", 5, "list", dict(max_epochs=4, check_val_every_n_epoch=2),
     20, 2, 2, V, [(1, 10, 4), (3, 20, 4)], (4, 0)),
    ("max_steps_mid_epoch", 10, "list", dict(max_steps=15),
     15, 1, 2, V, [(0, 10, 9)], (1, 5)),
    ("max_steps_k2_half_interval", 10, "list", dict(max_steps=7, accumulate_grad_batches=2, val_check_interval=0.5),
     7, 2, 2, V, [(0, 2, 4), (0, 5, 9)], (1, 4)),
    ("max_steps_before_first_val", 10, "list", dict(max_steps=3, accumulate_grad_batches=3),
     3, 0, 2, V, [], (0, 9)),
    ("limit_train_fraction", 10, "loader", dict(max_epochs=2, limit_train_batches=0.5, accumulate_grad_batches=2),
     6, 2, 2, V, [(0, 3, 4), (1, 6, 4)], (2, 0)),
    ("limit_train_int_interval_int", 10, "list", dict(max_epochs=2, limit_train_batches=4, val_check_interval=2),
     8, 4, 2, V, [(0, 2, 1), (0, 4, 3), (1, 6, 1), (1, 8, 3)], (2, 0)),
    ("limit_train_fraction_interval_fraction", 10, "list",
     dict(max_epochs=1, limit_train_batches=0.4, val_check_interval=0.5),
     4, 2, 2, V, [(0, 2, 1), (0, 4, 3)], (1, 0)),
    ("interval_int_across_epochs", 4, "list", dict(max_epochs=3, val_check_interval=3, check_val_every_n_epoch=None),
     12, 4, 2, V, [(0, 3, 2), (1, 6, 1), (2, 9, 0), (2, 12, 3)], (3, 0)),
    ("interval_int_across_epochs_k2", 3, "list",
     dict(max_epochs=4, accumulate_grad_batches=2, val_check_interval=5, check_val_every_n_epoch=None),
     8, 2, 2, V, [(1, 3, 1), (3, 6, 0)], (4, 0)),
    ("interval_0.3", 10, "list", dict(max_epochs=1, val_check_interval=0.3),
     10, 3, 2, V, [(0, 3, 2), (0, 6, 5), (0, 9, 8)], (1, 0)),
    ("k4_half_interval", 10, "list", dict(max_epochs=1, accumulate_grad_batches=4, val_check_interval=0.5),
     3, 2, 2, V, [(0, 1, 4), (0, 3, 9)], (1, 0)),
    ("every_2nd_epoch_half_interval", 4, "list", dict(max_epochs=3, check_val_every_n_epoch=2, val_check_interval=0.5),
     12, 2, 2, V, [(1, 6, 1), (1, 8, 3)], (3, 0)),
    ("max_epochs_before_max_steps", 5, "list", dict(max_epochs=2, max_steps=100),
     10, 2, 2, V, [(0, 5, 4), (1, 10, 4)], (2, 0)),
    ("sanity_all", 2, "list", dict(max_epochs=1, num_sanity_val_steps=-1),
     2, 1, 3, V, [(0, 2, 1)], (1, 0)),
    ("sanity_off", 2, "list", dict(max_epochs=1, num_sanity_val_steps=0),
     2, 1, 0, V, [(0, 2, 1)], (1, 0)),
    ("sanity_more_than_val", 2, "list", dict(max_epochs=1, num_sanity_val_steps=5),
     2, 1, 3, V, [(0, 2, 1)], (1, 0)),
    ("limit_val_int", 2, "list", dict(max_epochs=2, num_sanity_val_steps=-1, limit_val_batches=2),
     4, 2, 2, 2, [(0, 2, 1), (1, 4, 1)], (2, 0)),
    ("limit_val_zero", 3, "list", dict(max_epochs=2, limit_val_batches=0),
     6, 0, 0, 0, [], (2, 0)),
    ("default_1000_epochs", 1, "list", dict(check_val_every_n_epoch=250),
     1000, 4, 2, V, [(249, 250, 0), (499, 500, 0), (749, 750, 0), (999, 1000, 0)], (1000, 0)),
]


def _train_data(n: int, kind: str):
    if kind == "list":
        return sc.batches(n)
    x, y = sc.samples(4 * n - 2)  # the last batch holds 2 samples
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)


def _fit(flags, n, kind="list", val=True, state=None, events=None):
    events = [] if events is None else events
    rec = sc.Recorder(events)
    trainer = sc.quiet_trainer(callbacks=[rec], **flags)
    val_kw = dict(val_step=sc.CountingEval(events), val_data=sc.batches(V, seed=1)) if val else {}
    state = trainer.fit(state or sc.linear_state(), fl.train_step(sc.mse), _train_data(n, kind), **val_kw)
    return state, rec


@pytest.mark.parametrize(
    ("n", "kind", "flags", "steps", "val_count", "sanity", "per_run", "validations", "end"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_lightning_semantics_table(n, kind, flags, steps, val_count, sanity, per_run, validations, end):
    state, rec = _fit(flags, n, kind)
    assert state.loop.global_step == steps
    assert state.loop.val_count == val_count
    assert rec.validations() == validations
    assert rec.sanity_batches() == sanity
    assert rec.val_batches_in_training() == val_count * per_run
    assert (state.loop.epoch, state.loop.batch_idx) == end
    assert state.loop.status == "finished"


def test_without_val_data_nothing_is_validated():
    state, rec = _fit(dict(max_epochs=2, val_check_interval=0.5), 4, val=False)
    assert (state.loop.global_step, state.loop.val_count, rec.validations()) == (8, 0, [])


def test_no_sanity_check_when_continuing_a_run_with_progress():
    events: list = []
    state, rec = _fit(dict(max_epochs=1), 3, events=events)
    assert rec.sanity_batches() == 2
    events.clear()
    state, rec = _fit(dict(max_epochs=2), 3, state=state, events=events)
    assert rec.sanity_batches() == 0
    assert rec.validations() == [(1, 6, 2)]
    assert (state.loop.global_step, state.loop.val_count) == (6, 2)


# --- fast_dev_run and overfit_batches ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("fast_dev_run", "steps", "validations"), [(True, 1, [(0, 1, 0)]), (3, 3, [(0, 3, 2)])]
)
def test_fast_dev_run(fast_dev_run, steps, validations):
    state, rec = _fit(dict(fast_dev_run=fast_dev_run, max_epochs=5, num_sanity_val_steps=2), 10)
    assert state.loop.global_step == steps
    assert (state.loop.epoch, state.loop.batch_idx) == (1, 0)
    assert rec.validations() == validations
    assert rec.sanity_batches() == 0
    assert rec.val_batches_in_training() == steps  # n val batches per run


@pytest.mark.parametrize(
    "flags", [dict(check_val_every_n_epoch=2), dict(val_check_interval=5)], ids=["every_2", "interval_5"]
)
def test_fast_dev_run_always_validates_once(flags):
    state, rec = _fit(dict(fast_dev_run=True, **flags), 10)
    assert state.loop.global_step == 1
    assert rec.validations() == [(0, 1, 0)]


@pytest.mark.parametrize("overfit", [2, 0.25])
def test_overfit_batches_repeat_the_same_unshuffled_batches(overfit):
    ds = sc.LoggedDataset(32)  # 8 batches of 4
    events: list = []
    rec = sc.Recorder(events)
    trainer = sc.quiet_trainer(max_epochs=3, overfit_batches=overfit, callbacks=[rec, sc.EpochMarker(ds)])
    state = trainer.fit(
        sc.linear_state(), fl.train_step(sc.mse), DataLoader(ds, batch_size=4, shuffle=True),
        val_step=sc.CountingEval(events), val_data=sc.batches(8, seed=1),
    )
    assert dict(ds.seen) == {0: list(range(8)), 1: list(range(8)), 2: list(range(8))}
    assert state.loop.global_step == 6
    assert rec.validations() == [(0, 2, 1), (1, 4, 1), (2, 6, 1)]
    assert rec.val_batches_in_training() == 3 * 2  # 2 of the 8 val batches, as for training


# --- gradient accumulation ---------------------------------------------------------------------------

def _mlp_state(tx):
    mlp = sc.seeded_module(
        0, lambda: torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    )
    return fl.TrainState.create(mlp, tx), mlp


def test_accumulate_4_of_8_equals_one_step_of_32():
    x, y = sc.samples(64)
    tx = flo.sgd(lr=0.1, momentum=0.9)
    small = sc.quiet_trainer(max_epochs=1, accumulate_grad_batches=4).fit(
        _mlp_state(tx)[0], fl.train_step(sc.mse), DataLoader(TensorDataset(x, y), batch_size=8)
    )
    large = sc.quiet_trainer(max_epochs=1).fit(
        _mlp_state(tx)[0], fl.train_step(sc.mse), DataLoader(TensorDataset(x, y), batch_size=32)
    )
    assert small.loop.global_step == large.loop.global_step == 2
    for name, p in large.params.items():
        torch.testing.assert_close(small.params[name], p, rtol=0, atol=1e-6)


def test_accumulation_steps_on_a_partial_window_at_epoch_end():
    """Lightning divides every micro-batch loss by k, also in the short last window."""
    data = sc.batches(10)
    state, mlp = _mlp_state(flo.sgd(lr=0.1))
    out = sc.quiet_trainer(max_epochs=1, accumulate_grad_batches=4).fit(state, fl.train_step(sc.mse), data)
    ref = copy.deepcopy(mlp)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    steps = 0
    for b, batch in enumerate(data):
        (sc.mse(ref, batch) / 4).backward()
        if (b + 1) % 4 == 0 or b == len(data) - 1:
            opt.step()
            opt.zero_grad()
            steps += 1
    assert out.loop.global_step == steps == 3
    for name, p in ref.named_parameters():
        torch.testing.assert_close(out.params[name], p.detach(), rtol=0, atol=1e-6)


# --- data --------------------------------------------------------------------------------------------

def test_fit_accepts_a_dataloader_over_a_tensor_dataset():
    x, y = sc.samples(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    state = sc.quiet_trainer(max_epochs=2).fit(sc.linear_state(), fl.train_step(sc.mse), loader)
    assert (state.loop.global_step, state.loop.samples_seen) == (6, 20)


def test_fit_accepts_a_dataset_with_batches_of_one():
    x, y = sc.samples(6)
    state = sc.quiet_trainer(max_epochs=1).fit(sc.linear_state(), fl.train_step(sc.mse), TensorDataset(x, y))
    assert (state.loop.global_step, state.loop.samples_seen) == (6, 6)


def test_fit_accepts_a_datamodule():
    class Module:
        def __init__(self):
            self.stages = []

        def setup(self, stage):
            self.stages.append(stage)

        def train_data(self):
            return sc.batches(3)

        def val_data(self):
            return sc.batches(2, seed=1)

    dm = Module()
    events: list = []
    rec = sc.Recorder(events)
    state = sc.quiet_trainer(max_epochs=2, callbacks=[rec]).fit(
        sc.linear_state(), fl.train_step(sc.mse), datamodule=dm, val_step=sc.CountingEval(events)
    )
    assert dm.stages == ["fit"]
    assert state.loop.global_step == 6
    assert rec.validations() == [(0, 3, 2), (1, 6, 2)]


@pytest.mark.parametrize("which", ["train", "val"])
def test_a_generator_is_rejected(which):
    gen = (b for b in sc.batches(3))
    kw = dict(train_data=gen if which == "train" else sc.batches(3))
    if which == "val":
        kw.update(val_step=fl.eval_step(sc.mse), val_data=gen)
    with pytest.raises(ConfigError, match="one-shot iterator"):
        sc.quiet_trainer(max_epochs=1).fit(sc.linear_state(), fl.train_step(sc.mse), **kw)


def test_fit_without_train_data_names_what_is_missing():
    with pytest.raises(ConfigError, match="train_data"):
        sc.quiet_trainer(max_epochs=1).fit(sc.linear_state(), fl.train_step(sc.mse))


# --- non-finite loss policy ------------------------------------------------------------------------

class Poison(fl.Callback):
    """Makes the loss NaN on batch ``b`` of epoch ``epoch``; batches carry their index."""

    def __init__(self, epoch: int, b: int) -> None:
        self.at = (epoch, b)
        self.epoch = None
        self.params: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, state):
        self.epoch = state.loop.epoch

    def on_train_batch_end(self, state, metrics):
        self.params.append({k: v.clone() for k, v in state.params.items()})

    def loss(self, model, batch):
        x, y, i = batch
        loss = sc.mse(model, (x, y))
        return loss * float("nan") if (self.epoch, i) == self.at else loss


def _poisoned_fit(policy, log_every_n_steps, events=None):
    poison = Poison(1, 1)  # 4 batches per epoch: the 6th step (global step 5) of epoch 1
    data = [(x, y, i) for i, (x, y) in enumerate(sc.batches(4))]
    trainer = sc.quiet_trainer(
        max_epochs=3, on_nonfinite=policy, log_every_n_steps=log_every_n_steps, callbacks=[poison, sc.Recorder(events)]
    )
    return trainer.fit(sc.linear_state(), fl.train_step(poison.loss), data), poison


def test_nonfinite_raise_names_the_step_and_epoch():
    events: list = []
    with pytest.raises(fl.StepError, match=r"global step 5\b.*epoch 1\b") as info:
        _poisoned_fit("raise", 1, events)
    assert "on_nonfinite" in str(info.value)
    assert events[-1] == ("exception", "StepError")
    assert ("fit_end", "finished") not in events


def test_nonfinite_raise_names_the_step_and_epoch_of_a_long_window():
    with pytest.raises(fl.StepError, match=r"global step 5\b.*epoch 1\b"):
        _poisoned_fit("raise", 50)


def test_nonfinite_stop_returns_with_the_stop_flag():
    state, _ = _poisoned_fit("stop", 1)
    assert state.loop.stop is True
    assert state.loop.status == "finished"
    assert state.loop.global_step == 6
    assert (state.loop.epoch, state.loop.batch_idx) == (1, 2)


def test_nonfinite_skip_leaves_the_params_of_that_step_and_continues():
    state, poison = _poisoned_fit("skip", 1)
    assert state.loop.global_step == 12 and not state.loop.stop
    after = poison.params  # params after each of the 12 steps
    for name in after[0]:
        assert torch.equal(after[5][name], after[4][name]), "the non-finite step changed the params"
        assert not torch.equal(after[6][name], after[5][name]), "training did not continue after the skipped step"
        assert torch.isfinite(state.params[name]).all()


# --- no host syncs inside a logging window -----------------------------------------------------------

SYNC_CASES = {
    "sgd": dict(tx=lambda: flo.sgd(lr=0.1), n=10, flags=dict(max_epochs=2, log_every_n_steps=5), steps=20),
    "adamw_k2_clip_skip_lr_monitor": dict(
        tx=lambda: flo.adamw(lr=flo.warmup_cosine(1e-2, warmup_steps=3, decay_steps=20), weight_decay=0.01),
        n=12,
        flags=dict(max_epochs=2, log_every_n_steps=3, accumulate_grad_batches=2, gradient_clip_val=1.0,
                   on_nonfinite="skip", val_check_interval=0.5, callbacks=[fl.LearningRateMonitor()]),
        steps=12,
    ),
}


@pytest.mark.parametrize("case", list(SYNC_CASES))
def test_no_host_sync_between_logging_boundaries(case, monkeypatch):
    spec = SYNC_CASES[case]
    flags = dict(spec["flags"])
    probe = sc.SyncProbe(monkeypatch)
    flags["callbacks"] = [*flags.get("callbacks", []), probe]
    state = fl.TrainState.create(sc.make_dropout_mlp(), spec["tx"]())
    state = sc.quiet_trainer(**flags).fit(
        state, probe.wrap(fl.train_step(sc.mse)), sc.batches(spec["n"]),
        val_step=fl.eval_step(sc.mse), val_data=sc.batches(2, seed=1),
    )
    monkeypatch.undo()
    assert state.loop.global_step == spec["steps"]
    L = flags["log_every_n_steps"]
    assert probe.logs == spec["steps"] // L + (spec["steps"] % L != 0)
    in_step = [r for r in probe.data_reads if r[2]]
    assert in_step == [], f"host reads inside the train step: {in_step[:5]}"
    between = [r for r in probe.data_reads if r[0] not in probe.boundaries]
    assert between == [], f"host reads between logging boundaries (segment, global_step, ...): {between[:5]}"
    per_segment: dict[int, int] = {}
    for seg, *_ in probe.data_reads:
        per_segment[seg] = per_segment.get(seg, 0) + 1
    for seg, count in per_segment.items():
        limit = 3 * probe.boundaries[seg]
        assert count <= limit, f"{count} host reads at {probe.boundaries[seg]} boundaries (segment {seg})"
    assert probe.data_reads, "the probe saw no read at all: the metrics were never reduced"
