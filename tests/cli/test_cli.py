"""The ``fnloop`` command line, run as the real console script in subprocesses (in temporary
folders, with small epochs through overrides), plus in-process checks of its config helpers."""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch
import yaml

import fnloop.optim as flo
from fnloop.cli.optimizer import OPTIMIZERS, build_optimizer
from fnloop.cli.parser import build_parser, explain
from fnloop.cli.run_folder import choose_run_dir, latest_run_dir, save_config
from fnloop.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "examples" / "digits.yaml")
SCRIPT = pathlib.Path(sys.executable).with_name("fnloop")
FNLOOP = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "fnloop"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

FINISHED = re.compile(r"fnloop fit: (\w+) after (\d+) epochs \((\d+) steps\)")
EARLY_STOPPING_UP = '"class_path": "fnloop.EarlyStopping", "init_args": {"monitor": "x", "mode": "up"}'  # bad mode
ACCURACY = re.compile(r"^test accuracy: (\d\.\d{4})$", re.M)


def start(args: list[str], cwd: pathlib.Path) -> subprocess.Popen:
    pipe = subprocess.PIPE
    return subprocess.Popen(
        [*FNLOOP, *args], cwd=cwd, env=ENV, stdout=pipe, stderr=pipe, text=True, start_new_session=True
    )


@contextlib.contextmanager
def running(args: list[str], cwd: pathlib.Path) -> Iterator[subprocess.Popen]:
    """``start`` whose process group is killed on the way out if it is still there (a test that
    times out leaves no process behind)."""
    proc = start(args, cwd)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)


def fnloop(args: list[str], cwd: pathlib.Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*FNLOOP, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def ended(stdout: str) -> tuple[str, int, int]:
    status, epochs, steps = FINISHED.search(stdout).groups()
    return status, int(epochs), int(steps)


# --- the real command in subprocesses ------------------------------------------------------------


def test_fit_then_test_best_checkpoint(tmp_path):
    fit = fnloop(["fit", "--config", DIGITS, "--trainer.max_epochs", "2", "--optimizer.lr", "2e-3"], tmp_path)
    assert fit.returncode == 0, fit.stderr
    assert ended(fit.stdout) == ("finished", 2, 80)  # 1257 images, batch 32: 40 steps per epoch
    run = tmp_path / "runs" / "digits" / "version_0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 2 and config["optimizer"]["lr"] == 0.002
    assert config["name"] == "digits"
    assert glob.glob(str(run / "events.out.tfevents.*"))
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/loss", "train/loss", "lr", "test/acc"} <= set(header)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints and all((run / "checkpoints" / c / "meta.json").exists() for c in checkpoints)
    best = re.search(r"\(best (step-\d+)", fit.stdout).group(1)
    fit_acc = float(ACCURACY.search(fit.stdout).group(1))
    assert fit_acc > 0.5

    test = start(["test", "--config", DIGITS, "--ckpt_path", "best"], tmp_path)  # side by side: both only read
    predict = start(["predict", "--config", DIGITS, "--ckpt_path", "best"], tmp_path)
    out, err = test.communicate(timeout=120)
    assert test.returncode == 0, err
    assert f"checkpoints/{best}" in out  # the best checkpoint of the latest run folder
    assert "test/acc" in out
    assert float(ACCURACY.search(out).group(1)) == fit_acc
    out, err = predict.communicate(timeout=120)
    assert predict.returncode == 0, err
    predictions = torch.load(run / "predictions.pt")
    assert sum(len(p) for p in predictions) == 270 and all(p.dtype == torch.int64 for p in predictions)
    assert not (run.parent / "version_1").exists()


def test_print_config_applies_overrides_and_exits_without_training(tmp_path):
    overrides = ["--trainer.max_epochs", "7", "--optimizer.lr", "0.01"]
    out = fnloop(["fit", "--config", DIGITS, *overrides, "--print_config"], tmp_path)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert config["trainer"]["max_epochs"] == 7
    assert config["optimizer"] == {"name": "adamw", "lr": 0.01, "weight_decay": 0.0001}
    assert config["schedule"]["name"] == "warmup_cosine"
    assert config["model"]["class_path"] == "examples.digits_task.MLP"
    assert not (tmp_path / "runs").exists()


def test_configuration_errors_exit_2_naming_the_key(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(pathlib.Path(DIGITS).read_text().replace("max_epochs: 40", "max_epoch: 40"))
    cases = [  # (arguments, words the message must hold)
        (["--config", DIGITS, "--trainer.max_epoch", "3"], ["trainer.max_epoch", "max_epochs", "log_every_n_steps"]),
        (["--config", str(bad_yaml)], ["trainer.max_epoch", "max_epochs"]),
        (["--config", DIGITS, "--trainer.max_epochs", "abc"], ["trainer.max_epochs", "int"]),
        (["--config", DIGITS, "--model.class_path", "examples.digits_task.NoSuchModel"], ["model", "NoSuchModel"]),
        (["--config", DIGITS, "--optimizer.name", "adamx"], ["optimizer.name", ", ".join(OPTIMIZERS)]),
    ]
    procs = [start(["fit", *args], tmp_path) for args, _ in cases]  # side by side: each imports torch
    for proc, (args, words) in zip(procs, cases):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (args, err)
        assert "Traceback" not in err
        for word in words:
            assert word in err, (args, word, err)
    assert not (tmp_path / "runs").exists()  # nothing is created before the config is valid


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--loss_fn", "examples.digits_task.no_such_fn"], ["loss_fn", "no_such_fn"]),
        (["--optimizer.momentum", "0.9"], ["optimizer.momentum", "accepted keys: lr, betas"]),
        (["--trainer.max_epochs", "-3"], ["trainer.max_epochs", ">= -1"]),
        (["--checkpoint.mode", "up"], ["checkpoint.mode", "'min' or 'max'"]),
        (["--model.init_args.hiden", "3"], ["model.init_args.hiden", "hidden"]),
        (["--schedule.init_args.peak_lr", "0.1"], ["schedule.init_args.peak_lr", "optimizer.lr"]),
        (["--trainer.loggers", "[tensorbord]"], ["trainer.loggers", "tensorboard"]),
        (["--trainer.callbacks", f"[{{{EARLY_STOPPING_UP}}}]"], ["EarlyStopping(mode='up')", "'min' or 'max'"]),
    ],
)
def test_more_configuration_errors_in_process(args, words, tmp_path, monkeypatch, capsys):
    from fnloop.cli import main

    monkeypatch.setattr(sys, "path", [str(ROOT), *sys.path])
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DIGITS, *args]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "runs").exists()


def test_missing_checkpoints_exit_2_before_creating_anything(tmp_path, monkeypatch, capsys):
    """``--ckpt_path`` naming no checkpoint (``best`` in a run folder without checkpoints, a URL
    with nothing there) is a bad flag value: exit 2 and no new file or folder; a damaged
    checkpoint is an fnloop error (exit 1). None prints a traceback."""
    from fnloop.cli import main

    monkeypatch.setattr(sys, "path", [str(ROOT), *sys.path])
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "digits" / "version_0"
    run.mkdir(parents=True)
    for stage in ("test", "fit"):
        assert main([stage, "--config", DIGITS, "--ckpt_path", "best"]) == 2
        err = capsys.readouterr().err
        assert "--ckpt_path best" in err and ("no 'best' checkpoint" in err or "no best checkpoint" in err)
        assert "Traceback" not in err
    missing = tmp_path / "nowhere"
    for stage in ("fit", "test", "predict"):
        assert main([stage, "--config", DIGITS, "--ckpt_path", str(missing)]) == 2
        err = capsys.readouterr().err
        assert str(missing) in err and "does not exist" in err and "Traceback" not in err
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "meta.json").write_text("{not json")
    assert main(["fit", "--config", DIGITS, "--ckpt_path", str(damaged)]) == 1
    err = capsys.readouterr().err
    assert "malformed JSON" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "runs" / "digits").iterdir()) == ["version_0"]
    assert list(run.iterdir()) == []  # not even a config.yaml


def test_checkpoint_null_turns_checkpointing_off(tmp_path, monkeypatch, capsys):
    from fnloop.cli import main

    monkeypatch.setattr(sys, "path", [str(ROOT), *sys.path])
    monkeypatch.chdir(tmp_path)
    small = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
             "--test_after_fit", "false", "--trainer.loggers", "[]"]
    (tmp_path / "off.yaml").write_text(pathlib.Path(DIGITS).read_text() + "checkpoint: null\n")
    assert main(["fit", "--config", "off.yaml", *small]) == 0
    assert "checkpointing is off" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "off" / "version_0" / "checkpoints").exists()
    assert main(["fit", "--config", DIGITS, *small, "--trainer.enable_checkpointing", "false"]) == 0
    assert not (tmp_path / "runs" / "digits" / "version_0" / "checkpoints").exists()
    assert main(["fit", "--config", "off.yaml", *small, "--ckpt_path", "last"]) == 2
    assert "checkpointing is off" in capsys.readouterr().err
    assert main(["fit", "--config", DIGITS, *small]) == 0  # the default config checkpoints
    assert list((tmp_path / "runs" / "digits" / "version_1" / "checkpoints").iterdir())


def _long_config(tmp_path: pathlib.Path) -> pathlib.Path:
    config = yaml.safe_load(pathlib.Path(DIGITS).read_text())
    config["trainer"].update(max_epochs=500, limit_train_batches=10, log_every_n_steps=5)
    callbacks = config["trainer"]["callbacks"]
    config["trainer"]["callbacks"] = [c for c in callbacks if "EarlyStopping" not in c["class_path"]]
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "runs" / "long" / "version_0"


def _stop_after_first_checkpoint(proc: subprocess.Popen, run: pathlib.Path, signum: int) -> tuple[str, str]:
    deadline = time.monotonic() + 60
    while not glob.glob(str(run / "checkpoints" / "*" / "meta.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.02)
    proc.send_signal(signum)
    return proc.communicate(timeout=60)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_saves_and_exits_128_plus_its_number(tmp_path, signum, code):
    run = _long_config(tmp_path)
    with running(["fit", "--config", "long.yaml"], tmp_path) as proc:
        out, err = _stop_after_first_checkpoint(proc, run, signum)
    assert proc.returncode == code, err
    status, _, steps = ended(out)
    assert status == "interrupted"
    assert (run / "checkpoints" / f"step-{steps:08d}" / "meta.json").exists()


def test_sigterm_saves_exits_143_and_resume_continues(tmp_path):
    run = _long_config(tmp_path)
    with running(["fit", "--config", "long.yaml"], tmp_path) as proc:
        out, err = _stop_after_first_checkpoint(proc, run, signal.SIGTERM)
    assert proc.returncode == 143, err
    status, epochs, steps = ended(out)
    assert status == "interrupted" and steps >= 10
    assert (run / "checkpoints" / f"step-{steps:08d}" / "meta.json").exists()
    saved = (run / "config.yaml").read_bytes()

    resume = ["fit", "--config", "long.yaml", "--ckpt_path", "last", "--run_dir", str(run)]
    resume += ["--trainer.max_epochs", str(epochs + 2)]
    refused = fnloop(resume, tmp_path)
    assert refused.returncode == 2
    assert "trainer.max_epochs" in refused.stderr and "--overwrite_config" in refused.stderr
    assert (run / "config.yaml").read_bytes() == saved  # not overwritten silently

    resumed = fnloop([*resume, "--overwrite_config", "--test_after_fit", "false"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert ended(resumed.stdout) == ("finished", epochs + 2, (epochs + 2) * 10)  # continued at the next batch
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"] == epochs + 2
    assert not (run.parent / "version_1").exists()


# --- config helpers, in process ----------------------------------------------------------------


def test_save_config_keeps_same_config_and_refuses_a_different_one(tmp_path):
    path = save_config(str(tmp_path), "seed: 0\nckpt_path: null\ntrainer: {max_epochs: 2}\n")
    save_config(str(tmp_path), "seed: 0\nckpt_path: last\ntrainer: {max_epochs: 2}\n")  # a resume: same run
    assert "ckpt_path: null" in pathlib.Path(path).read_text()
    with pytest.raises(ConfigError, match=r"keys that differ: seed, trainer\.max_epochs.*--overwrite_config"):
        save_config(str(tmp_path), "seed: 1\ntrainer: {max_epochs: 3}\n")
    save_config(str(tmp_path), "seed: 1\n", only_if_missing=True)
    assert "seed: 0" in pathlib.Path(path).read_text()
    save_config(str(tmp_path), "seed: 1\n", overwrite=True)
    assert pathlib.Path(path).read_text() == "seed: 1\n"


def test_run_folders_new_latest_and_explicit(tmp_path):
    root = str(tmp_path)
    with pytest.raises(ConfigError, match="no run folder"):
        choose_run_dir("test", root=root, name="exp", ckpt_path="best")
    first = choose_run_dir("fit", root=root, name="exp", ckpt_path="last")  # nothing to resume: a new folder
    second = choose_run_dir("fit", root=root, name="exp")
    assert (first, second) == (os.path.join(root, "exp", "version_0"), os.path.join(root, "exp", "version_1"))
    assert latest_run_dir(root, "exp") == second
    assert choose_run_dir("fit", root=root, name="exp", ckpt_path="last") == second
    assert choose_run_dir("validate", root=root, name="exp", run_dir=first, ckpt_path="last") == first
    with pytest.raises(ConfigError, match="no such folder"):
        choose_run_dir("test", root=root, name="exp", run_dir=str(tmp_path / "missing"))


def test_schedule_takes_its_peak_from_optimizer_lr():
    params = {"w": torch.zeros(2)}
    tx = build_optimizer({"name": "sgd", "lr": 0.5}, "step_lr", {"step_size": 1, "gamma": 0.1})
    assert float(flo.learning_rate(tx.init(params))) == 0.5
    tx = build_optimizer({"name": "sgd"}, "step_lr", {"lr": 0.25, "step_size": 1})
    assert float(flo.learning_rate(tx.init(params))) == 0.25
    with pytest.raises(ConfigError, match=r"schedule\.init_args\.lr and optimizer\.lr"):
        build_optimizer({"name": "sgd", "lr": 0.5}, "step_lr", {"lr": 0.25, "step_size": 1})
    with pytest.raises(ConfigError, match=r"schedule\.init_args\.step_size"):
        build_optimizer({"name": "sgd", "lr": 0.5}, "step_lr", {"step_size": "often"})
    with pytest.raises(ConfigError, match=r"optimizer\.betas is not an argument of fnloop\.optim\.sgd"):
        build_optimizer({"name": "sgd", "betas": [0.9, 0.99]})
    tx = build_optimizer({"name": "adam", "betas": [0.8, 0.9]})  # a YAML list becomes the tuple adam takes
    assert float(flo.learning_rate(tx.init(params))) == 1e-3


@pytest.mark.parametrize(
    ("message", "hint"),
    [
        ("unrecognized arguments: --trainer.max_epoch 3", "key 'trainer.max_epoch' (did you mean 'max_epochs'?)"),
        ("Subcommand 'fit' does not accept option 'lossfn'", "unknown key 'lossfn' (did you mean 'loss_fn'?)"),
        ("Parser key \"checkpoint\": nothing to add", None),
    ],
)
def test_error_hints_name_the_key_and_the_accepted_keys(message, hint):
    text = explain(message, build_parser().stage_parsers["fit"])
    assert text.startswith(message)
    if hint is None:
        assert text == message
    else:
        assert hint in text and "accepted keys" in text
