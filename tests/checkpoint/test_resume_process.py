"""Exact resume across processes: a training process stopped by a signal, or killed, and started
again with the same command ends bitwise where an uninterrupted run ends.

The run is ``_procs/resume_worker.py`` (Dropout + BatchNorm1d, AdamW with warmup-cosine,
``accumulate_grad_batches=2``, 3 epochs of 13 shuffled batches, a checkpoint every 3 optimizer
steps, ``ckpt_path="last"``). The reference runs once as a plain ``python resume_worker.py``
process; the interrupted runs are forked by ``_procs/fork_server.py``, which imports torch once,
so each restart costs a fork instead of an interpreter start. Every run's only link to the
previous one is its run folder on disk.

* SIGTERM / SIGUSR1 / SIGINT at seeded random batches: fit finishes the batch, saves a
  checkpoint at that point and the process exits 143; the restart ends with params, buffers,
  optimizer state, RNG and loop counters bitwise equal to the reference, and every sample was
  read exactly once per epoch, in the reference order.
* SIGKILL three times at seeded random moments, restarting after each: the final state is still
  bitwise the reference; the batches between the last checkpoint and a kill are read twice.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import random
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fnloop.checkpoint import CheckpointManager, read_meta

PROCS = pathlib.Path(__file__).resolve().parent / "_procs"
WORKER = PROCS / "resume_worker.py"
SERVER = PROCS / "fork_server.py"
REPO = PROCS.parents[2]

sys.path.insert(0, str(PROCS))
import resume_worker  # noqa: E402  (the run's shape)

N_SAMPLES, N_BATCHES, EPOCHS = resume_worker.N_SAMPLES, resume_worker.N_BATCHES, resume_worker.EPOCHS
OPTIMIZER_STEPS, TOTAL_BATCHES = resume_worker.OPTIMIZER_STEPS, resume_worker.TOTAL_BATCHES
INTERRUPTED_EXIT = resume_worker.INTERRUPTED_EXIT
assert (N_SAMPLES, N_BATCHES, EPOCHS, OPTIMIZER_STEPS) == (100, 13, 3, 21)  # the cases below are chosen for this shape
SLEEP = "0.03"  # seconds the worker sleeps after each batch, so a signal lands mid-run

_rng = random.Random(20240917)
_RANDOM_BATCHES = [b for b in range(1, TOTAL_BATCHES - 9) if b not in (7, 13)]  # 9+ batches before the end
# (batch to wait for, signal): random batches, plus batch 7 (the interrupted save replaces the
# checkpoint of global step 3, saved one batch earlier, mid accumulation window) and batch 13
# (the last, partial accumulation window of an epoch)
SIGNAL_CASES = (
    [(at, signal.SIGTERM) for at in sorted(_rng.sample(_RANDOM_BATCHES, 5))]
    + [(7, signal.SIGTERM), (13, signal.SIGUSR1), (_rng.randrange(14, TOTAL_BATCHES - 9), signal.SIGINT)]
)
KILL_AT = sorted(_rng.sample(range(2, TOTAL_BATCHES - 9), 3))
KILL_DELAYS = [_rng.uniform(0.0, 0.03) for _ in KILL_AT]


# --- processes -----------------------------------------------------------------------------------


class _Lines:
    """Lines from a pipe, with a deadline so a stuck process fails the test instead of hanging it."""

    def __init__(self, pipe) -> None:
        self.fd = pipe.fileno()
        self.buffer = b""

    def read(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], max(deadline - time.monotonic(), 0.0))
            if not ready:
                return None
            chunk = os.read(self.fd, 4096)
            assert chunk, "the fork server exited"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


class ForkServer:
    """``_procs/fork_server.py``: forks one worker at a time and reports its pid and exit code."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.err = open(folder / "fork_server.err", "wb")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env
        )
        self.lines = _Lines(self.proc.stdout)

    def start(self, run_dir: pathlib.Path) -> Worker:
        output = run_dir / "worker.out"
        self.proc.stdin.write(f"{output} {run_dir} --sleep {SLEEP}\n".encode())
        self.proc.stdin.flush()
        answer = self.lines.read(timeout=60)
        assert answer is not None and answer.startswith("pid "), f"fork server answered {answer!r}"
        return Worker(self, int(answer.split()[1]), output)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.err.close()


class Worker:
    """One forked training process."""

    def __init__(self, server: ForkServer, pid: int, output: pathlib.Path) -> None:
        self.server, self.pid, self.output = server, pid, output
        self.code: int | None = None

    def poll(self) -> int | None:
        if self.code is None:
            line = self.server.lines.read(timeout=0)
            if line is not None:
                assert line.startswith("exit "), line
                self.code = int(line.split()[1])
        return self.code

    def wait(self, timeout: float = 120) -> int:
        if self.code is None:
            line = self.server.lines.read(timeout=timeout)
            assert line is not None, f"worker {self.pid} did not exit within {timeout} s\n{self.tail()}"
            self.code = int(line.split()[1])
        return self.code

    def signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # it exited meanwhile; wait() reports how
                pass

    def stop(self) -> None:
        """Kill and reap the worker if it still runs (after a failed assertion)."""
        if self.code is None:
            self.signal(signal.SIGKILL)
            self.wait(timeout=30)

    def tail(self) -> str:
        try:
            return self.output.read_text()[-3000:]
        except FileNotFoundError:
            return "(no output)"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ForkServer(tmp_path_factory.mktemp("fork_server"))
    yield s
    s.close()


# --- events --------------------------------------------------------------------------------------


class Events:
    """The lines of a run folder's ``events.log`` (see ``resume_worker.py``), read as they come."""

    def __init__(self, run_dir: pathlib.Path) -> None:
        self.path = run_dir / "events.log"
        self.offset = 0
        self.pending = b""

    def new(self) -> list[list[str]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *complete, self.pending = (self.pending + data).split(b"\n")
        return [line.decode().split() for line in complete]

    def all(self) -> list[list[str]]:
        return [line.split() for line in self.path.read_text().splitlines()]


def run_until(worker: Worker, events: Events, at: int) -> None:
    """Return as soon as the worker reports training batch number ``at`` (over all epochs) done.

    Lines before the worker's own ``start`` line (left by an earlier process) are skipped.
    """
    deadline = time.monotonic() + 120
    started = False
    while True:
        for words in events.new():
            started = started or words[:2] == ["start", str(worker.pid)]
            if started and words[0] == "batch" and int(words[4]) >= at:
                return
        code = worker.poll()
        assert code is None, f"the worker exited ({code}) before batch {at}\n{worker.tail()}"
        assert time.monotonic() < deadline, f"no batch {at} within 120 s\n{worker.tail()}"
        time.sleep(0.001)


def samples_by_epoch(lines: list[list[str]]) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = collections.defaultdict(list)
    for words in lines:
        if words[0] == "sample":
            seen[int(words[1])].append(int(words[2]))
    return dict(seen)


def first_occurrences(indices: list[int]) -> list[int]:
    return list(dict.fromkeys(indices))


def starts(lines: list[list[str]]) -> list[tuple[int, int, int]]:
    """``(epoch, batch_idx, global_step)`` where each process began (after its resume)."""
    return [(int(w[2]), int(w[3]), int(w[4])) for w in lines if w[0] == "start"]


def latest_position(run_dir: pathlib.Path) -> tuple[int, int, int, str] | None:
    """``(global_step, total_batch_idx, batch position, status)`` of the latest committed checkpoint."""
    url = CheckpointManager(str(run_dir / "ckpt")).latest()
    if url is None:
        return None
    loop = {e["path"][5:]: e.get("value") for e in read_meta(url)["leaves"] if e["path"].startswith("loop/")}
    assert os.path.basename(url) == f"step-{loop['global_step']:08d}", url
    return loop["global_step"], loop["total_batch_idx"], loop["epoch"] * N_BATCHES + loop["batch_idx"], loop["status"]


# --- final states --------------------------------------------------------------------------------


def final_state(run_dir: pathlib.Path) -> tuple[dict, dict]:
    """Tensors (by key path) and non-tensor leaves of the state the run saved at its end."""
    tensors = load_file(str(run_dir / "final" / "state.safetensors"))
    meta = json.loads((run_dir / "final" / "meta.json").read_text())
    values = {e["path"]: e["value"] for e in meta["leaves"] if e["kind"] == "value"}
    return tensors, values


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_bitwise_equal(run_dir: pathlib.Path, ref_dir: pathlib.Path) -> None:
    tensors, values = final_state(run_dir)
    ref_tensors, ref_values = final_state(ref_dir)
    assert sorted(tensors) == sorted(ref_tensors)
    for group in ("params/", "buffers/", "opt_state/", "rng", "step"):
        assert any(k.startswith(group) for k in ref_tensors), group
    differ = [k for k in ref_tensors if not _same_bits(tensors[k], ref_tensors[k])]
    assert not differ, f"not bitwise equal to the uninterrupted run: {differ}"
    assert values == ref_values


# --- the reference -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, as a plain ``python resume_worker.py RUN_DIR`` process."""
    run_dir = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(WORKER), str(run_dir), "--sleep", "0"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = Events(run_dir).all()
    return run_dir, lines


def test_reference_run_reads_each_sample_once_per_epoch_in_a_new_order(reference):
    run_dir, lines = reference
    assert starts(lines) == [(0, 0, 0)]
    assert lines[-1] == ["end", "finished", str(OPTIMIZER_STEPS), str(TOTAL_BATCHES)]
    assert sum(w[0] == "batch" for w in lines) == TOTAL_BATCHES
    seen = samples_by_epoch(lines)
    assert sorted(seen) == list(range(EPOCHS))
    for epoch, indices in seen.items():
        assert sorted(indices) == list(range(N_SAMPLES)), epoch
    assert seen[0] != seen[1] != seen[2] != seen[0]
    _, values = final_state(run_dir)
    assert values["loop/status"] == "finished" and values["loop/samples_seen"] == EPOCHS * N_SAMPLES


# --- stop signals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "signum"), SIGNAL_CASES, ids=[f"{signal.Signals(s).name}-after-batch{at}" for at, s in SIGNAL_CASES]
)
def test_signal_then_restart_is_bitwise_the_uninterrupted_run(server, reference, tmp_path, at, signum):
    ref_dir, ref_lines = reference
    events = Events(tmp_path)
    worker = server.start(tmp_path)
    try:
        run_until(worker, events, at)
        worker.signal(signum)
        code = worker.wait()
    finally:
        worker.stop()
    assert code == INTERRUPTED_EXIT, f"exit code {code}\n{worker.tail()}"
    lines = events.all()
    end = lines[-1]
    assert end[:2] == ["end", "interrupted"], end
    stopped_step, stopped_batch = int(end[2]), int(end[3])
    assert stopped_batch >= at
    batches = [w for w in lines if w[0] == "batch"]
    assert int(batches[-1][4]) == stopped_batch  # the loop returned right after the batch it was in
    # the interrupted save is the latest checkpoint, at the batch the loop stopped at
    assert latest_position(tmp_path) == (stopped_step, stopped_batch, stopped_batch, "interrupted")

    worker = server.start(tmp_path)  # the same command again: resumes from ckpt_path="last"
    try:
        code = worker.wait()
    finally:
        worker.stop()
    assert code == 0, f"exit code {code}\n{worker.tail()}"
    lines = events.all()
    (e0, b0, g0), (e1, b1, g1) = starts(lines)
    assert (e0, b0, g0) == (0, 0, 0)
    assert (e1 * N_BATCHES + b1, g1) == (stopped_batch, stopped_step), "the restart did not resume where it stopped"
    assert lines[-1] == ["end", "finished", str(OPTIMIZER_STEPS), str(TOTAL_BATCHES)]
    assert sum(w[0] == "batch" for w in lines) == TOTAL_BATCHES  # no batch trained twice, none skipped

    seen, ref_seen = samples_by_epoch(lines), samples_by_epoch(ref_lines)
    for epoch in range(EPOCHS):
        assert sorted(seen.get(epoch, [])) == list(range(N_SAMPLES)), f"epoch {epoch}: not every sample exactly once"
        assert seen[epoch] == ref_seen[epoch], f"epoch {epoch}: another order than the uninterrupted run"
    assert_bitwise_equal(tmp_path, ref_dir)
    print(f"{signal.Signals(signum).name} sent after batch {at}; the run stopped after batch {stopped_batch}")


# --- SIGKILL -------------------------------------------------------------------------------------


def test_sigkill_three_times_then_restart_is_bitwise_the_uninterrupted_run(server, reference, tmp_path):
    ref_dir, ref_lines = reference
    events = Events(tmp_path)
    resumed_from = []
    for at, delay in zip(KILL_AT, KILL_DELAYS):
        expected = latest_position(tmp_path)
        resumed_from.append(expected)
        worker = server.start(tmp_path)
        try:
            run_until(worker, events, at)
            time.sleep(delay)
            worker.signal(signal.SIGKILL)
            code = worker.wait()
        finally:
            worker.stop()
        assert code == -signal.SIGKILL, f"exit code {code}\n{worker.tail()}"
    expected = latest_position(tmp_path)
    resumed_from.append(expected)
    assert expected is not None and expected[3] == "running"  # saved by every_n_steps, not by an interruption
    worker = server.start(tmp_path)
    try:
        code = worker.wait()
    finally:
        worker.stop()
    assert code == 0, f"exit code {code}\n{worker.tail()}"

    lines = events.all()
    # each process resumed from the latest checkpoint committed before it started (or from scratch)
    positions = [(e * N_BATCHES + b, g) for e, b, g in starts(lines)]
    assert positions == [(0, 0) if r is None else (r[2], r[0]) for r in resumed_from]
    assert lines[-1] == ["end", "finished", str(OPTIMIZER_STEPS), str(TOTAL_BATCHES)]

    seen, ref_seen = samples_by_epoch(lines), samples_by_epoch(ref_lines)
    replayed = 0
    for epoch in range(EPOCHS):
        assert set(seen[epoch]) == set(range(N_SAMPLES)), f"epoch {epoch}: some samples were never read"
        assert first_occurrences(seen[epoch]) == ref_seen[epoch], f"epoch {epoch}: another order than the reference"
        replayed += len(seen[epoch]) - N_SAMPLES
    assert_bitwise_equal(tmp_path, ref_dir)
    print(f"killed after batches {KILL_AT}; resumed from {resumed_from}; samples read again: {replayed}")
