"""2-rank DDP on CPU (gloo), each rank a process started as torchrun starts it (the rank
variables in its environment); see ``_procs/ddp_worker.py``. Every test starts and stops its own
processes on a free port, under a hard timeout, and kills what is left.

What is compared:

* without dropout, the 2-rank run equals a 1-process fnloop run on the global batches (each the
  two ranks' micro-batches together) to 1e-6;
* with dropout each rank draws its own masks (the step's seed folded with the rank), so the
  1-process reference is a hand-written torch loop (``torch.optim.AdamW``,
  ``clip_grad_norm_``) that runs each rank's micro-batch under that rank's seed and averages the
  gradients: equal to 1e-6;
* both ranks hold bitwise the same params after every batch;
* SIGTERM to rank 1 mid-run: both ranks stop at the same step, rank 0 saves once, both exit 143;
  2 ranks resumed from that checkpoint end bitwise equal to the uninterrupted run;
* SIGKILL of rank 1: rank 0 exits non-zero well within 60 s, naming rank 1.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

import fnloop as fl
from fnloop.connectors.data_sources import MapSource
from fnloop.connectors.launch import free_port

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE / "_procs"))
import ddp_worker as w  # noqa: E402

TIMEOUT = 90


def launch(mode: str, out: pathlib.Path, timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Run both ranks of ``mode``; their (returncode, stdout, stderr), whatever happens."""
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = []
    try:
        for rank in range(2):
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([sys.executable, str(HERE / "_procs" / "ddp_worker.py"), mode, str(out)],
                                          env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + timeout
        results = []
        for p in procs:
            out_text, err_text = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out_text, err_text))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def shard_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s micro-batches, as fnloop's data order gives them."""
    ds = w.dataset()
    src = MapSource(ds, batch_size=w.PER_RANK_BATCH, shuffle=True, seed=w.SEED, rank=rank, world_size=2)
    return [(ds.tensors[0][i], ds.tensors[1][i]) for i in src.batch_indices(0)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-full")
    results = launch("full", out)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    return out


def load(out: pathlib.Path, name: str) -> list[dict]:
    return [torch.load(out / f"{name}-{rank}.pt") for rank in range(2)]


def test_ranks_hold_bitwise_equal_params_after_every_batch(full_run):
    for name in ("dropout", "plain"):
        r0, r1 = load(full_run, name)
        assert len(r0["seen"]) == len(r1["seen"]) == 2 * w.STEPS
        for a, b in zip(r0["seen"], r1["seen"]):
            assert torch.equal(a, b)
        assert r0["step"] == r1["step"] == w.STEPS


def test_ddp_without_dropout_equals_one_process_on_the_global_batch(full_run):
    shards = [shard_batches(0), shard_batches(1)]
    global_batches = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*shards)]
    trainer = fl.Trainer(max_steps=w.STEPS, accumulate_grad_batches=2, gradient_clip_val=0.5, enable_progress_bar=False)
    state = trainer.fit(fl.TrainState.create(w.model(0.0), w.tx(), seed=w.SEED), fl.train_step(w.loss_fn), global_batches)
    torch.testing.assert_close(load(full_run, "plain")[0]["final"], w.flat(state.params), rtol=0, atol=1e-6)


def test_ddp_with_dropout_equals_the_per_rank_mask_reference(full_run):
    module = w.model(0.1)
    params = dict(module.named_parameters())
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.01)
    shards = [shard_batches(0), shard_batches(1)]
    for j in range(2 * w.STEPS):
        for rank in range(2):
            seed = fl.rng.fold(fl.rng.fold(w.SEED, j), rank)  # the step's seed, folded with the rank
            with fl.rng.seeded(seed, []):
                (w.loss_fn(module, shards[rank][j]) / 4).backward()  # mean over 2 ranks x 2 micro-batches
        if j % 2 == 1:
            torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(load(full_run, "dropout")[0]["final"], w.flat(params), rtol=0, atol=1e-6)


def test_sigterm_to_one_rank_stops_both_and_resumes_bitwise(full_run, tmp_path):
    stopped = launch("interrupt", tmp_path)
    assert [r.returncode for r in stopped] == [143, 143], [r.stderr[-2000:] for r in stopped]
    steps = [d["step"] for d in load(tmp_path, "interrupt")]
    assert steps[0] == steps[1] < w.STEPS  # both stopped at the same step
    saved = sorted(p.name for p in (tmp_path / "ckpt-interrupt").iterdir())
    assert len(saved) == 1  # rank 0 saved once
    resumed = launch("resume", tmp_path)
    assert [r.returncode for r in resumed] == [0, 0], [r.stderr[-2000:] for r in resumed]
    expected = load(full_run, "dropout")[0]["final"]
    for d in load(tmp_path, "resume"):
        assert torch.equal(d["final"], expected)


def test_sigkill_of_one_rank_fails_the_other_with_a_message(tmp_path):
    started = time.monotonic()
    results = launch("kill", tmp_path, timeout=60)
    assert time.monotonic() - started < 60
    assert results[1].returncode == -9
    assert results[0].returncode != 0
    assert "lost rank 1" in results[0].stderr, results[0].stderr[-2000:]
