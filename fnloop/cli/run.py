"""The subcommands: ``fit`` (then ``test`` with ``test_after_fit``), ``validate``, ``test`` and
``predict`` over a :class:`~fnloop.cli.job.Job`, printing where the run's files are.

Exit codes: 0 done; 130 ``fit`` stopped by SIGINT (Ctrl-C), 143 by SIGTERM (or another stop
signal), after saving a checkpoint (resume with ``--ckpt_path last --run_dir <run folder>``).

Example:
    >>> import signal
    >>> interrupted_exit_code(signal.SIGINT), interrupted_exit_code(signal.SIGTERM)
    (130, 143)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import torch
import yaml

from fnloop.callbacks.base import Callback
from fnloop.checkpoint import _fs
from fnloop.checkpoint.callback import ModelCheckpoint
from fnloop.checkpoint.format import META_FILE, read_meta, restore_weights
from fnloop.cli.job import CHECKPOINTS, Job, make_sinks
from fnloop.cli.run_folder import CONFIG_FILE, choose_run_dir, latest_run_dir, save_config
from fnloop.cli import sweep as _sweep
from fnloop.connectors.launch import connect
from fnloop.connectors.signals import last_received
from fnloop.errors import CheckpointError, ConfigError
from fnloop.loggers import format_metrics_table, to_plain
from fnloop.state import Status, TrainState
from fnloop.eval_steps import eval_step, predict_step
from fnloop.step import train_step

__all__ = [
    "EXIT_OK",
    "EXIT_SIGINT",
    "EXIT_INTERRUPTED",
    "interrupted_exit_code",
    "check_ckpt_path",
    "run_job",
    "fit",
    "evaluate",
    "predict",
]

EXIT_OK = 0
EXIT_SIGINT = 130
"""``fit`` stopped by SIGINT (Ctrl-C) or a KeyboardInterrupt: 128 + SIGINT, as shells report it."""
EXIT_INTERRUPTED = 143
"""``fit`` stopped by SIGTERM (128 + SIGTERM) or another stop signal (SIGUSR1)."""
_RESOLVED = ("last", "latest", "best")
PREDICTIONS_FILE = "predictions.pt"

_DATA_METHODS = {
    "val": ("val_data", "val_dataloader"),
    "test": ("test_data", "test_dataloader"),
    "predict": ("predict_data", "predict_dataloader"),
}
_TITLES = {"val": "validate", "test": "test"}


class _LastMetrics(Callback):
    """Keeps the latest value of everything logged during fit (printed at the end)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        self.values.update(metrics)

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        self.values.update(metrics)


def _has_data(data: Any, stage: str) -> bool:
    return any(callable(getattr(data, m, None)) for m in _DATA_METHODS[stage])


def _lead() -> bool:
    """This process prints and writes the run's files: rank 0, or the only process."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _say(stage: str, text: str) -> None:
    if _lead():
        print(f"fnloop {stage}: {text}", flush=True)


def _accuracy_line(metrics: Mapping[str, float], stage: str) -> None:
    key = f"{stage}/acc"
    if key in metrics and _lead():
        print(f"{_TITLES.get(stage, stage)} accuracy: {metrics[key]:.4f}", flush=True)


def _with_weights(state: TrainState, url: str) -> TrainState:
    """``state`` with the weights of checkpoint ``url`` and its epoch and global step."""
    state = restore_weights(url, like=state)
    counters = {}
    for entry in read_meta(url).get("leaves", []):
        name = entry.get("path", "").partition("loop/")[2]
        if name in ("epoch", "global_step") and isinstance(entry.get("value"), int):
            counters[name] = entry["value"]
    return state.replace(loop=state.loop.replace(**counters)) if counters else state


def _files(run_dir: str) -> str:
    labels: list[str] = []
    for name in sorted(os.listdir(run_dir)):
        label = "TensorBoard events" if name.startswith("events.") else name
        if not name.startswith(".") and label not in labels:
            labels.append(label)
    return ", ".join(labels)


def interrupted_exit_code(signum: int | None) -> int:
    """The exit code of a ``fit`` stopped by ``signum`` (None: a KeyboardInterrupt raised in the code).

    Example:
        >>> interrupted_exit_code(None)
        130
    """
    return EXIT_SIGINT if signum in (None, signal.SIGINT) else EXIT_INTERRUPTED


def check_ckpt_path(job: Job) -> None:
    """Refuse a ``--ckpt_path`` that names no checkpoint, before any folder is created.

    Raises:
        ConfigError: a URL without a checkpoint, ``best`` with no best checkpoint to resume, or
            ``last``/``best`` for ``fit`` with checkpointing off (exit 2).
        CheckpointError: a damaged checkpoint at the URL (exit 1).
    """
    path = job.ckpt_path
    if path is None or (path in _RESOLVED and job.stage != "fit"):
        return  # validate/test/predict resolve last/best in the existing run folder (or refuse)
    if path in _RESOLVED:
        if job.checkpoint_args is None:
            raise ConfigError(
                f"--ckpt_path {path}: checkpointing is off (checkpoint: null or trainer.enable_checkpointing: "
                "false); turn it on to resume, or pass a checkpoint URL"
            )
        run_dir = job.run_dir or latest_run_dir(job.root, job.name)
        if path == "best" and (run_dir is None or job.manager(run_dir).best() is None):
            where = run_dir or os.path.join(job.root, job.name)
            raise ConfigError(f"--ckpt_path best: no best checkpoint under {where!r}; run `fnloop fit` first, or pass a checkpoint URL")
        return
    fs, folder = _fs.resolve(path)
    if not fs.exists(f"{folder}/{META_FILE}"):
        reason = "the folder has no meta.json" if fs.exists(folder) else "it does not exist"
        raise ConfigError(f"--ckpt_path {path}: no checkpoint there ({reason}); pass a checkpoint folder, 'last' or 'best'")
    read_meta(path)


def _report_fit(
    state: TrainState, seconds: float, run_dir: str, manager: Any | None, last: _LastMetrics
) -> str | None:
    """Print how fit ended, where its files are and the final metrics; return the best checkpoint."""
    loop = state.loop
    _say("fit", f"{loop.status} after {loop.epoch} epochs ({loop.global_step} steps) in {seconds:.1f} s")
    _say("fit", f"logs in {run_dir} ({_files(run_dir)})")
    best = manager.best() if manager is not None and manager.monitor is not None else None
    if not _lead():
        return best
    if manager is None:
        _say("fit", "checkpointing is off")
    else:
        found = [f"{kind} {os.path.basename(url)}" for kind, url in (("best", best), ("last", manager.latest())) if url]
        _say("fit", f"checkpoints in {os.path.join(run_dir, CHECKPOINTS)} ({', '.join(found) or 'none'})")
    if last.values:
        print(format_metrics_table(last.values, "Final metrics"), flush=True)
    return best


def _test_after_fit(job: Job, trainer: Any, state: TrainState, best: str | None) -> Mapping[str, float] | None:
    if not _has_data(job.data, "test"):
        _say("fit", f"{type(job.data).__name__} has no test data: test skipped")
        return None
    if best is not None:
        _say("test", f"testing the best checkpoint {best}")
        state = _with_weights(state, best)
    else:
        _say("test", "testing the final state (no best checkpoint)")
    metrics = trainer.test(state, eval_step(job.metric_fn), datamodule=job.data)
    _accuracy_line(metrics, "test")
    return metrics


def _check_fresh(job: Job, run_dir: str) -> None:
    """A fit without ``--ckpt_path`` starts a new run: it refuses a run folder that holds the
    checkpoints of an earlier run (they would stay "last" and mix two runs' steps)."""
    if job.ckpt_path is not None or job.checkpoint_args is None:
        return
    with job.manager(run_dir) as manager:
        latest = manager.latest()
    if latest is not None:
        raise ConfigError(
            f"--run_dir {run_dir}: holds checkpoints of an earlier run (latest {os.path.basename(latest)}); pass "
            "--ckpt_path last to continue that run, or pick a new --run_dir"
        )


def _fresh_run_dir(job: Job) -> str:
    run_dir = choose_run_dir("fit", root=job.root, name=job.name, run_dir=job.run_dir, ckpt_path=job.ckpt_path)
    _check_fresh(job, run_dir)
    return run_dir


def fit(job: Job) -> int:
    """Train in the run folder, save checkpoints and logs there; then test (``test_after_fit``)
    the best checkpoint if there is one, else the final state.

    Returns:
        0, or 130 (SIGINT) / 143 (SIGTERM) when a signal stopped training (a checkpoint was saved).

    Example:
        >>> from fnloop.cli import main
        >>> main(["fit", "--config", "examples/digits.yaml", "--trainer.max_epochs", "2"])  # doctest: +SKIP
        0
    """
    check_ckpt_path(job)
    parallel = connect(job.trainer)  # a distributed run: join it, or start its other ranks (this process is rank 0)
    lead = parallel.is_global_zero
    run_dir = parallel.broadcast(_fresh_run_dir(job) if lead else None)
    config_path = save_config(run_dir, job.config_text, overwrite=job.overwrite_config) if lead else os.path.join(run_dir, CONFIG_FILE)
    sinks = make_sinks(job.loggers if lead else [], run_dir)
    last = _LastMetrics()
    record = _sweep.MemberRecord(*_sweep.monitored(job.checkpoint_args, job.trainer.callback_list))
    extra = [last, record] if job.sweep else [last]
    trainer = dataclasses.replace(job.trainer, callbacks=[*job.trainer.callback_list, *extra], logger=sinks)
    _say("fit", f"run folder {run_dir} (config {config_path})")
    if job.sweep:
        _say("fit", f"a sweep of {len(job.sweep)} members trained as one stacked state")
    state = _sweep.initial_state(job.model, job.tx, job.seed)
    manager = job.manager(run_dir) if job.checkpoint_args is not None else None
    with manager if manager is not None else contextlib.nullcontext():
        sinks.log_hparams(to_plain(yaml.safe_load(job.config_text) or {}))
        started = time.perf_counter()
        state = trainer.fit(
            state,
            train_step(job.loss_fn),
            datamodule=job.data,
            val_step=eval_step(job.metric_fn) if _has_data(job.data, "val") else None,
            checkpoint=ModelCheckpoint(manager) if manager is not None else None,
            ckpt_path=job.ckpt_path,
        )
        best = parallel.broadcast(_report_fit(state, time.perf_counter() - started, run_dir, manager, last))
    if state.loop.status == Status.INTERRUPTED:
        _say("fit", f"interrupted; resume with: fnloop fit --config {config_path} --ckpt_path last --run_dir {run_dir}")
        return interrupted_exit_code(last_received())
    test = _test_after_fit(job, trainer, state, best) if job.test_after_fit else None
    if job.sweep and _lead():
        _sweep.report(list(job.sweep), record, test)
    return EXIT_OK


def _eval_state(job: Job, run_dir: str) -> TrainState:
    state = _sweep.initial_state(job.model, job.tx, job.seed)
    if job.ckpt_path is None:
        _say(job.stage, "no --ckpt_path: using the initial weights")
        return state
    if job.ckpt_path in ("last", "latest", "best"):
        with job.manager(run_dir) as manager:
            try:
                url = manager.resolve(job.ckpt_path)
            except CheckpointError as err:
                raise ConfigError(f"--ckpt_path {job.ckpt_path}: {err}; run `fnloop fit` first or pass a checkpoint URL") from None
    else:
        url = job.ckpt_path
    _say(job.stage, f"weights from {url}")
    return _with_weights(state, url)


def _eval_setup(job: Job) -> tuple[str, Any, TrainState]:
    check_ckpt_path(job)
    run_dir = choose_run_dir(job.stage, root=job.root, name=job.name, run_dir=job.run_dir, ckpt_path=job.ckpt_path)
    state = _eval_state(job, run_dir)  # before the config is written: a missing checkpoint leaves no file
    save_config(run_dir, job.config_text, only_if_missing=True)
    trainer = dataclasses.replace(job.trainer, logger=make_sinks(job.loggers, run_dir))
    _say(job.stage, f"run folder {run_dir}")
    return run_dir, trainer, state


def evaluate(job: Job) -> int:
    """``validate`` or ``test``: the metric function over that stage's data; prints the table.

    Example:
        >>> from fnloop.cli import main
        >>> main(["test", "--config", "examples/digits.yaml", "--ckpt_path", "best"])  # doctest: +SKIP
        0
    """
    stage = "val" if job.stage == "validate" else "test"
    if not _has_data(job.data, stage):
        method = _DATA_METHODS[stage][0]
        raise ConfigError(f"data: {type(job.data).__name__} has no {method}() method; {job.stage} needs it")
    _, trainer, state = _eval_setup(job)
    run = trainer.validate if stage == "val" else trainer.test
    metrics = run(state, eval_step(job.metric_fn), datamodule=job.data, verbose=False)
    print(format_metrics_table(metrics, f"{job.stage.capitalize()} metrics"), flush=True)
    _accuracy_line(metrics, stage)
    return EXIT_OK


def predict(job: Job) -> int:
    """``predict``: ``predict_fn`` over the predict data; the outputs of every batch, in order,
    go to ``<run folder>/predictions.pt`` (``torch.load(path)`` reads them back).

    Example:
        >>> from fnloop.cli import main
        >>> main(["predict", "--config", "examples/digits.yaml", "--ckpt_path", "best"])  # doctest: +SKIP
        0
    """
    if job.predict_fn is None:
        raise ConfigError("predict_fn is not set: give the import path of predict_fn(model, batch) in the config")
    if not _has_data(job.data, "predict"):
        raise ConfigError(f"data: {type(job.data).__name__} has no predict_data() method; predict needs it")
    run_dir, trainer, state = _eval_setup(job)
    outputs = trainer.predict(state, predict_step(job.predict_fn), datamodule=job.data)
    path = os.path.join(run_dir, PREDICTIONS_FILE)
    torch.save(outputs, path)
    _say("predict", f"{len(outputs)} batches of predictions in {path}")
    return EXIT_OK


def run_job(job: Job) -> int:
    """Run the job's subcommand; return the exit code.

    Example:
        >>> from fnloop.cli.job import build_job
        >>> from fnloop.cli.parser import build_parser
        >>> parser = build_parser()
        >>> stage, cfg = parser.parse(["test", "--config", "examples/digits.yaml"])  # doctest: +SKIP
        >>> run_job(build_job(stage, cfg, parser.stage_parsers[stage]))  # doctest: +SKIP
        0
    """
    if job.stage == "fit":
        return fit(job)
    if job.stage == "predict":
        return predict(job)
    return evaluate(job)
