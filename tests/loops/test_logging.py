"""What fit logs, read back from the files: TensorBoard (with TensorBoard's own reader), CSV, JSONL."""

from __future__ import annotations

import csv
import glob
import json
import math
import os

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.fixture
def run(tmp_path):
    torch.manual_seed(0)
    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(10)]
    state = fl.TrainState.create(torch.nn.Linear(3, 1), flo.sgd(flo.step_lr(0.1, step_size=5, gamma=0.5)), seed=0)
    loggers = [fl.TensorBoardLogger(str(tmp_path)), fl.CSVLogger(str(tmp_path)), fl.JSONLLogger(str(tmp_path))]
    trainer = fl.Trainer(
        max_epochs=2, log_every_n_steps=5, logger=loggers, enable_progress_bar=False,
        callbacks=[fl.LearningRateMonitor()], num_sanity_val_steps=0,
    )
    state = trainer.fit(state, fl.train_step(_loss), data, val_step=fl.eval_step(_loss), val_data=data[:3])
    (run_dir,) = glob.glob(str(tmp_path / "default" / "version_*"))
    return state, run_dir


def _tb_scalars(run_dir):
    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_has_train_val_and_lr_series_at_the_right_steps(run):
    state, run_dir = run
    scalars = _tb_scalars(run_dir)
    assert [s for s, _ in scalars["train/loss"]] == [5, 10, 15, 20]
    assert [s for s, _ in scalars["val/loss"]] == [10, 20]  # validation at the end of each epoch
    lrs = dict(scalars["lr"])
    assert [lrs[s] for s in (5, 10, 15, 20)] == pytest.approx([0.05, 0.025, 0.0125, 0.00625])  # step_lr halves every 5
    assert "throughput/samples_per_sec" in scalars
    assert state.loop.global_step == 20


def test_csv_and_jsonl_hold_the_same_values_as_tensorboard(run):
    _, run_dir = run
    scalars = _tb_scalars(run_dir)
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for tag in ("train/loss", "val/loss", "lr"):
        tb = dict(scalars[tag])
        from_csv = {int(r["step"]): float(r[tag]) for r in rows if r.get(tag) not in (None, "")}
        from_jsonl = {r["step"]: r["metrics"][tag] for r in records if tag in r["metrics"]}
        assert sorted(from_csv) == sorted(tb) == sorted(from_jsonl)
        for step, value in tb.items():  # TensorBoard stores float32
            assert math.isclose(from_csv[step], value, rel_tol=1e-6)
            assert math.isclose(from_jsonl[step], value, rel_tol=1e-6)
            assert from_csv[step] == from_jsonl[step]


def test_profile_and_hparams_are_logged(run):
    _, run_dir = run
    scalars = _tb_scalars(run_dir)
    for key in ("time/data_s", "time/step_s", "time/eval_s", "time/checkpoint_s", "time/total_s"):
        assert key in scalars
    total = scalars["time/total_s"][0][1]
    parts = sum(scalars[k][0][1] for k in ("time/data_s", "time/step_s", "time/eval_s", "time/checkpoint_s", "time/other_s"))
    assert parts == pytest.approx(total, rel=1e-3)
    with open(os.path.join(run_dir, "hparams.yaml")) as f:
        hparams = f.read()
    assert "max_epochs" in hparams and "log_every_n_steps" in hparams


def test_logger_true_writes_tensorboard_and_csv_under_default_root_dir(tmp_path):
    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(4)]
    state = fl.TrainState.create(torch.nn.Linear(3, 1), flo.sgd(lr=0.1))
    trainer = fl.Trainer(max_epochs=1, log_every_n_steps=2, logger=True, default_root_dir=str(tmp_path), enable_progress_bar=False)
    trainer.fit(state, fl.train_step(_loss), data)
    (run_dir,) = glob.glob(str(tmp_path / "default" / "version_*"))
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    assert os.path.exists(os.path.join(run_dir, "metrics.csv"))


def test_deterministic_flag_is_on_during_fit_and_restored_after():
    seen = []

    class Probe(fl.Callback):
        def on_train_batch_end(self, state, metrics):
            seen.append(torch.are_deterministic_algorithms_enabled())

    before = torch.are_deterministic_algorithms_enabled()
    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(2)]
    state = fl.TrainState.create(torch.nn.Linear(3, 1), flo.sgd(lr=0.1))
    fl.Trainer(max_epochs=1, deterministic=True, enable_progress_bar=False, callbacks=[Probe()]).fit(state, fl.train_step(_loss), data)
    assert seen == [True, True]
    assert torch.are_deterministic_algorithms_enabled() == before
