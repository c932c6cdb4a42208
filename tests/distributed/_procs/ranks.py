"""Starting the two ranks of a test as torchrun would (the rank variables in each environment),
and the per-rank batches fnloop's data order gives ``ddp_worker``'s dataset."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import torch

import ddp_worker as w
from fnloop.connectors.data_sources import MapSource
from fnloop.connectors.launch import free_port

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def launch(script: str, args: list[str], timeout: float) -> list[subprocess.CompletedProcess]:
    """Run ``_procs/<script> *args`` as ranks 0 and 1 on a free port; their (returncode, stdout,
    stderr), whatever happens: what is still running at ``timeout`` is killed, everything joined."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = []
    try:
        for rank in range(2):
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([sys.executable, str(HERE / script), *args],
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
