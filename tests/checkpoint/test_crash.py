"""Crash safety: a saver process SIGKILLed at random moments never leaves a bad latest checkpoint.

Starting a Python process that imports torch takes about a second, so the test starts one
server process that imports fnloop once and forks a fresh saver for every round; each
saver resumes from the latest checkpoint and saves in a loop through
``CheckpointManager(keep_last=2)`` until the test SIGKILLs it.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time

import torch

from fnloop.checkpoint import CheckpointManager, restore

ROUNDS = 20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SERVER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from fnloop.checkpoint import CheckpointManager, restore

    directory = sys.argv[2]

    def tree(step):
        return {"w": torch.full((64, 1024), float(step)), "n": torch.arange(1000) * step, "loop": {"step": step}}

    def saver():
        mgr = CheckpointManager(directory, keep_last=2)
        latest = mgr.latest()
        step = 1 if latest is None else restore(latest, like=tree(0))["loop"]["step"] + 1
        while True:
            mgr.save(tree(step), step=step)
            step += 1

    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                saver()
            finally:
                os._exit(1)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("dead", flush=True)
    """
)


class _Lines:
    """Lines from a pipe, with a deadline so a broken server fails the test instead of hanging it."""

    def __init__(self, pipe) -> None:
        self.fd = pipe.fileno()
        self.buffer = b""

    def read(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(left, 0))
            assert ready, "the saver server stopped answering"
            chunk = os.read(self.fd, 4096)
            assert chunk, "the saver server exited"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


def _committed(directory: str) -> bool:
    try:
        return any(os.path.exists(os.path.join(directory, n, "meta.json")) for n in os.listdir(directory))
    except FileNotFoundError:
        return False


def test_sigkill_at_random_moments_keeps_a_valid_latest(tmp_path):
    directory = str(tmp_path / "runs")
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    like = {"w": torch.zeros(64, 1024), "n": torch.zeros(1000, dtype=torch.int64), "loop": {"step": 0}}
    rng = random.Random(20240611)
    stderr = open(tmp_path / "server.err", "wb")
    server = subprocess.Popen(
        [sys.executable, str(script), REPO, directory], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
    )
    lines = _Lines(server.stdout)
    seen_steps, stale_seen = [], 0
    try:
        for round_ in range(ROUNDS):
            server.stdin.write(b"go\n")
            server.stdin.flush()
            pid = int(lines.read())
            if round_ == 0:
                deadline = time.monotonic() + 60
                while not _committed(directory):
                    assert time.monotonic() < deadline, (tmp_path / "server.err").read_text()
                    time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.12))
            os.kill(pid, signal.SIGKILL)
            assert lines.read() == "dead"

            stale_seen += sum(n.startswith(".tmp-") for n in os.listdir(directory))
            mgr = CheckpointManager(directory, keep_last=2)
            assert not any(n.startswith(".tmp-") for n in os.listdir(directory)), "stale folders were not removed"
            urls = mgr.all()
            latest = mgr.latest()
            assert latest is not None and urls and latest == urls[-1]
            for url in urls:
                name = os.path.basename(url)
                assert name.startswith("step-") and sorted(os.listdir(url)) == ["meta.json", "state.safetensors"]
                out = restore(url, like=like)
                step = out["loop"]["step"]
                assert name == f"step-{step:08d}"
                assert torch.all(out["w"] == float(step)) and torch.equal(out["n"], torch.arange(1000) * step)
            seen_steps.append(int(os.path.basename(latest).split("-")[1]))
    finally:
        server.kill()
        server.wait()
        server.stdin.close()
        server.stdout.close()
        stderr.close()
    assert seen_steps == sorted(seen_steps) and seen_steps[-1] > seen_steps[0], seen_steps
    print(f"latest steps after each kill: {seen_steps}; temporary folders found after kills: {stale_seen}")
