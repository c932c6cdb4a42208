"""A training run that resumes from its own checkpoints: the subject of the cross-process tests.

Usage: ``python resume_worker.py RUN_DIR [--sleep SECONDS]``.

It trains a Dropout + BatchNorm1d model with AdamW on a warmup-cosine schedule over shuffled
map-style data (100 samples in batches of 8: 13 batches per epoch, the last one of 4),
``accumulate_grad_batches=2``, 3 epochs, through
``fit(..., checkpoint=CheckpointManager(RUN_DIR/ckpt, keep_last=2, every_n_steps=3), ckpt_path="last")``.
Every run of the same ``RUN_DIR`` continues the last committed checkpoint.

``RUN_DIR/events.log`` receives one line per event, each written by one ``os.write`` on an
``O_APPEND`` descriptor (so a SIGKILL never leaves half a line and never loses a written one):

* ``start <pid> <epoch> <batch_idx> <global_step>``: fit started, after the resume;
* ``sample <epoch> <index>``: the dataset served sample ``index`` during ``epoch``;
* ``batch <epoch> <batch_idx> <global_step> <total_batch_idx>``: a training batch is done;
* ``end <status> <global_step> <total_batch_idx>``: fit returned.

A finished run saves its final state with ``fl.save`` to ``RUN_DIR/final`` and exits 0; an
interrupted one (SIGTERM, SIGUSR1, SIGINT) exits 143 after fit saved its checkpoint. The
process sleeps ``--sleep`` seconds after each batch so a signal lands mid-run.

:func:`main` is also called in processes forked from ``fork_server.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import fnloop as fl
import fnloop.optim as flo

N_SAMPLES = 100
BATCH_SIZE = 8
N_BATCHES = 13  # ceil(100 / 8)
EPOCHS = 3
ACCUMULATE = 2
EVERY_N_STEPS = 3
OPTIMIZER_STEPS = EPOCHS * 7  # ceil(13 / 2) per epoch
TOTAL_BATCHES = EPOCHS * N_BATCHES
INTERRUPTED_EXIT = 143
FEATURES = 5


class EventLog:
    """Appends whole lines to ``path`` with one ``os.write`` each (``O_APPEND``: atomic, unbuffered)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, *words: Any) -> None:
        os.write(self.fd, (" ".join(str(w) for w in words) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


class LoggedSamples(Dataset):
    """Seeded regression samples; every ``__getitem__`` is logged with the epoch being served."""

    def __init__(self, log: EventLog) -> None:
        g = torch.Generator().manual_seed(11)
        self.x = torch.randn(N_SAMPLES, FEATURES, generator=g)
        self.y = (self.x.sum(dim=1, keepdim=True) > 0).to(torch.float32) + 0.1 * torch.randn(N_SAMPLES, 1, generator=g)
        self.log = log
        self.epoch = -1

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.log.write("sample", self.epoch, int(i))
        return self.x[i], self.y[i]


class Progress(fl.Callback):
    """Tells the dataset the epoch, logs fit start and each batch, and sleeps after each batch."""

    def __init__(self, dataset: LoggedSamples, events: EventLog, sleep: float) -> None:
        self.dataset = dataset
        self.events = events  # not ``log``: that name is a Callback hook
        self.sleep = sleep

    def on_fit_start(self, state: Any) -> None:
        loop = state.loop
        self.events.write("start", os.getpid(), loop.epoch, loop.batch_idx, loop.global_step)

    def on_train_epoch_start(self, state: Any) -> None:
        self.dataset.epoch = state.loop.epoch

    def on_train_batch_end(self, state: Any, metrics: Any) -> None:
        loop = state.loop
        self.events.write("batch", loop.epoch, loop.batch_idx, loop.global_step, loop.total_batch_idx)
        if self.sleep:
            time.sleep(self.sleep)


def make_model() -> torch.nn.Module:
    """``Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear`` with seeded weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return torch.nn.Sequential(
            torch.nn.Linear(FEATURES, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.3),
            torch.nn.Linear(16, 1),
        )


def loss_fn(model: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def main(argv: list[str] | None = None) -> int:
    """Run (or continue) the training of ``RUN_DIR``; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("run_dir")
    parser.add_argument("--sleep", type=float, default=0.02)
    parser.add_argument("--async_save", action="store_true", help="save checkpoints in the background")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    log = EventLog(os.path.join(args.run_dir, "events.log"))
    dataset = LoggedSamples(log)
    tx = flo.adamw(lr=flo.warmup_cosine(1e-2, warmup_steps=4, decay_steps=OPTIMIZER_STEPS), weight_decay=0.01)
    state = fl.TrainState.create(make_model(), tx, seed=5)
    trainer = fl.Trainer(
        max_epochs=EPOCHS,
        accumulate_grad_batches=ACCUMULATE,
        log_every_n_steps=2,
        enable_progress_bar=False,
        callbacks=[Progress(dataset, log, args.sleep)],
    )
    manager = fl.CheckpointManager(
        os.path.join(args.run_dir, "ckpt"), keep_last=2, every_n_steps=EVERY_N_STEPS, async_save=args.async_save
    )
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"ckpt_path='last': no checkpoint", category=UserWarning)
        state = trainer.fit(state, fl.train_step(loss_fn), loader, checkpoint=manager, ckpt_path="last")
    loop = state.loop
    log.write("end", loop.status, loop.global_step, loop.total_batch_idx)
    if loop.status == "interrupted":
        return INTERRUPTED_EXIT
    if loop.status != "finished":
        return 1
    fl.save(state, os.path.join(args.run_dir, "final"), overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
