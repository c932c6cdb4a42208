"""``Trainer(logger=..., enable_progress_bar=...)`` with Lightning's meanings: None and True write
TensorBoard and CSV files, False writes nothing; fit and a later test share one run folder;
nothing is printed unless a progress bar is asked for."""

from __future__ import annotations

import csv
import glob
import os

import pytest

import fnloop as fl

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


def _fit_and_test(trainer):
    state = trainer.fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(4))
    return trainer.test(state, fl.eval_step(sc.mse), sc.batches(2))


@pytest.mark.parametrize("logger", [None, True])
def test_none_and_true_write_tensorboard_and_csv_to_one_folder_for_fit_and_test(tmp_path, logger, capsys):
    trainer = fl.Trainer(
        max_epochs=1, logger=logger, default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=2,
    )
    tested = _fit_and_test(trainer)
    (run_dir,) = glob.glob(str(tmp_path / "default" / "version_*"))
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r.get("train/loss")] == ["2", "4"]
    assert [float(r["test/loss"]) for r in rows if r.get("test/loss")] == [pytest.approx(tested["test/loss"])]
    assert capsys.readouterr().out == ""


def test_false_writes_nothing_and_prints_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = fl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    _fit_and_test(trainer)
    assert os.listdir(tmp_path) == []
    assert capsys.readouterr().out == ""


def test_the_progress_bar_prints_the_test_table_unless_verbose_is_false(capsys):
    trainer = fl.Trainer(max_epochs=1, logger=False, enable_progress_bar=True, enable_model_summary=False)
    state = sc.linear_state()
    trainer.test(state, fl.eval_step(sc.mse), sc.batches(2))
    assert "test/loss" in capsys.readouterr().out
    trainer.test(state, fl.eval_step(sc.mse), sc.batches(2), verbose=False)
    trainer.fit(state, fl.train_step(sc.mse), sc.batches(2))
    out = capsys.readouterr().out
    assert "test/loss" not in out and "fit time" not in out
