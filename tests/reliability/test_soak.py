"""Soak: random SIGKILL, SIGTERM and double-SIGINT timings over a fit with sync and async saves.

Each case starts the ``resume_worker`` run, signals it after a random batch (and a random delay),
then checks that the latest committed checkpoint is finite and restores, restarts the same
command until it finishes, and compares the final state bitwise with an uninterrupted run.
``FNLOOP_SOAK=1`` runs 100 cases; by default 10 (``FNLOOP_SOAK_CASES`` picks another number).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import fnloop as fl
from fnloop.checkpoint import CheckpointManager
from scenarios import ENV
from test_resume_process import SLEEP, WORKER, Events, ForkServer, Worker, assert_bitwise_equal, run_until

import resume_worker  # noqa: E402  (on sys.path once test_resume_process is imported)

CASES = int(os.environ.get("FNLOOP_SOAK_CASES", "100" if os.environ.get("FNLOOP_SOAK") == "1" else "10"))
KINDS = ("SIGKILL", "SIGTERM", "SIGINT-SIGINT")
_rng = random.Random(20261130)
PLAN = [
    (_rng.choice(KINDS), _rng.randrange(1, resume_worker.TOTAL_BATCHES - 2), _rng.uniform(0.0, 0.03),
     _rng.uniform(0.0, 0.02), _rng.random() < 0.5)
    for _ in range(CASES)
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ForkServer(tmp_path_factory.mktemp("soak_server"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("soak_reference")
    done = subprocess.run([sys.executable, str(WORKER), str(run_dir), "--sleep", "0"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    return run_dir


def _start(server: ForkServer, run_dir, async_save: bool) -> Worker:
    output = run_dir / "worker.out"
    extra = " --async_save" if async_save else ""
    server.proc.stdin.write(f"{output} {run_dir} --sleep {SLEEP}{extra}\n".encode())
    server.proc.stdin.flush()
    answer = server.lines.read(timeout=60)
    assert answer is not None and answer.startswith("pid "), f"fork server answered {answer!r}"
    return Worker(server, int(answer.split()[1]), output)


def _template() -> fl.TrainState:
    import fnloop.optim as flo

    tx = flo.adamw(lr=flo.warmup_cosine(1e-2, warmup_steps=4, decay_steps=resume_worker.OPTIMIZER_STEPS), weight_decay=0.01)
    return fl.TrainState.create(resume_worker.make_model(), tx, seed=5)


def _check_latest(run_dir) -> None:
    latest = CheckpointManager(str(run_dir / "ckpt")).latest()
    if latest is None:
        return
    flat = fl.restore(latest)
    assert all(torch.isfinite(t).all() for t in flat.values() if t.is_floating_point()), latest
    fl.restore(latest, like=_template())  # the whole state restores into a fresh one


@pytest.mark.parametrize(("kind", "at", "delay", "gap", "async_save"), PLAN,
                         ids=[f"{i}-{k}-b{a}-{'async' if s else 'sync'}" for i, (k, a, _, _, s) in enumerate(PLAN)])
def test_random_interruption_resumes_bitwise(server, reference, tmp_path, kind, at, delay, gap, async_save):
    events = Events(tmp_path)
    worker = _start(server, tmp_path, async_save)
    try:
        run_until(worker, events, at)
        time.sleep(delay)
        if kind == "SIGINT-SIGINT":
            worker.signal(signal.SIGINT)
            time.sleep(gap)
            worker.signal(signal.SIGINT)
        else:
            worker.signal(getattr(signal, kind))
        code = worker.wait()
    finally:
        worker.stop()
    assert code in (0, 1, 143, -9), f"exit {code}\n{worker.tail()}"
    if code == 1:
        assert "KeyboardInterrupt" in worker.tail(), worker.tail()
    _check_latest(tmp_path)
    for _ in range(3):  # the same command until the run is finished
        if code == 0:
            break
        worker = _start(server, tmp_path, async_save)
        try:
            code = worker.wait()
        finally:
            worker.stop()
    assert code == 0, f"exit {code}\n{worker.tail()}"
    assert_bitwise_equal(tmp_path, reference)
