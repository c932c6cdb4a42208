"""One rank of a 2-rank DDP run: the subject of tests/distributed/test_ddp.py.

Usage: ``python ddp_worker.py MODE OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set (as torchrun sets them).

It trains ``MLP(dropout)`` with AdamW, ``gradient_clip_val=0.5``, ``accumulate_grad_batches=2``
over a shuffled map-style dataset (4 samples per rank and batch) for ``STEPS`` optimizer steps,
saving through a ``ModelCheckpoint`` into ``OUT_DIR/ckpt-<MODE>``. Modes:

* ``full``: the run with dropout 0.1, then a fresh one without dropout; writes
  ``OUT_DIR/<run>-<rank>.pt``: the flat params after every batch and the final params;
* ``interrupt``: rank 1 sends itself SIGTERM after the batch that reaches global step 7;
* ``resume``: continues ``ckpt-interrupt`` (``ckpt_path="last"``);
* ``kill``: rank 1 sends itself SIGKILL after global step 5.

Exit codes: 0 finished, 143 interrupted (a checkpoint was saved), 1 an fnloop error (printed).
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
import fnloop.optim as flo

STEPS = 20
PER_RANK_BATCH = 4
N_SAMPLES = 2 * PER_RANK_BATCH * 2 * STEPS  # one epoch: 2 ranks x 2 micro-batches x STEPS
SEED = 0


def model(dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1))


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, 6, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


def loss_fn(m, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(m(x), y)


def tx() -> flo.GradientTransformation:
    return flo.adamw(lr=1e-2, weight_decay=0.01)


def flat(params: dict) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params.values()])


class Record(fl.Callback):
    """The flat params after every batch; a signal to this process at a chosen step."""

    def __init__(self, signum: int | None = None, at: int = -1) -> None:
        self.seen: list[torch.Tensor] = []
        self.signum, self.at = signum, at

    def on_train_batch_end(self, state, metrics):
        self.seen.append(flat(state.params))
        if self.signum is not None and state.loop.global_step == self.at:
            os.kill(os.getpid(), self.signum)


def fit(out: str, mode: str, dropout: float, record: Record, ckpt_path: str | None = None) -> fl.TrainState:
    trainer = fl.Trainer(
        max_steps=STEPS, accumulate_grad_batches=2, gradient_clip_val=0.5, strategy="ddp", devices=2,
        accelerator="cpu", enable_progress_bar=False, callbacks=[record],
    )
    manager = fl.CheckpointManager(os.path.join(out, f"ckpt-{mode}"), keep_last=1)
    state = fl.TrainState.create(model(dropout), tx(), seed=SEED)
    data = DataLoader(dataset(), batch_size=PER_RANK_BATCH, shuffle=True)
    return trainer.fit(state, fl.train_step(loss_fn), data, checkpoint=fl.ModelCheckpoint(manager), ckpt_path=ckpt_path)


def main(mode: str, out: str) -> int:
    rank = int(os.environ["RANK"])
    runs = {"full": [("dropout", 0.1), ("plain", 0.0)], "interrupt": [("interrupt", 0.1)], "resume": [("resume", 0.1)], "kill": [("kill", 0.1)]}
    for name, dropout in runs[mode]:
        signum = {"interrupt": signal.SIGTERM, "kill": signal.SIGKILL}.get(mode) if rank == 1 else None
        record = Record(signum, at=7 if mode == "interrupt" else 5)
        ckpt = "last" if mode == "resume" else None
        state = fit(out, "interrupt" if mode == "resume" else mode, dropout, record, ckpt)
        torch.save({"seen": record.seen, "final": flat(state.params), "step": state.loop.global_step}, os.path.join(out, f"{name}-{rank}.pt"))
        if state.loop.status == fl.Status.INTERRUPTED:
            return 143
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1], sys.argv[2])
    except fl.FnloopError as err:
        print(f"ddp_worker: error: {err}", file=sys.stderr, flush=True)
        code = 1
    sys.exit(code)
