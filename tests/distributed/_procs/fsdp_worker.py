"""One rank of a 2-rank run: the subject of tests/distributed/test_fsdp.py.

Usage: ``python fsdp_worker.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set (as torchrun sets them).

In one process group, on ``ddp_worker``'s model (dropout 0.1), data and AdamW, gradients clipped
to a global norm of 0.5, 4 samples per rank and batch, ``STEPS`` steps each:

1. ``strategy="ddp"``: the final params;
2. ``strategy="fsdp"``, saving a sharded checkpoint at the end into ``OUT_DIR/ckpt-fsdp``: the
   final params and optimizer state (gathered whole), the bytes of params and optimizer state
   this rank holds, and those of the whole state;
3. ``trainer.validate`` of both final states (the FSDP step gathers the params), and one more
   step of the FSDP state through the fast path and through ``apply_train_step`` (the meaning);
4. ``strategy="fsdp"`` without dropout, resumed from ``OUT_DIR/one-rank`` (a 1-process
   checkpoint the test wrote) for ``STEPS`` more steps: the final params;
5. ``strategy="fsdp"`` where rank 1 sends itself SIGTERM after step 3, saving into
   ``OUT_DIR/ckpt-interrupt``: the status, step and params it stopped with.

Writes ``OUT_DIR/fsdp-<rank>.pt``. Exit codes: 0 finished, 1 an fnloop error (printed).
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch.utils.data import DataLoader

import fnloop as fl
from fnloop.connectors.fsdp import ShardedReducer, shard_bytes
from fnloop.options import StepOptions
from fnloop.step import apply_train_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddp_worker as w  # noqa: E402

STEPS = 6


def full(tree):
    """``tree`` with DTensor leaves gathered whole (torch's ``full_tensor``)."""
    return fl.tree_map(lambda x: x.full_tensor() if hasattr(x, "full_tensor") else x, tree)


class Interrupt(fl.Callback):
    """Rank 1 sends itself SIGTERM after global step 3."""

    def on_train_batch_end(self, state, metrics):
        if os.environ["RANK"] == "1" and state.loop.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)


def fit(strategy: str, max_steps: int, *, dropout: float = 0.1, ckpt: str | None = None, ckpt_path: str | None = None, callbacks=()) -> fl.TrainState:
    trainer = fl.Trainer(
        max_steps=max_steps, strategy=strategy, devices=2, accelerator="cpu", gradient_clip_val=0.5, enable_progress_bar=False,
        logger=None, callbacks=list(callbacks),
    )
    state = fl.TrainState.create(w.model(dropout), w.tx(), seed=w.SEED)
    data = DataLoader(w.dataset(), batch_size=w.PER_RANK_BATCH, shuffle=True)
    checkpoint = fl.ModelCheckpoint(fl.CheckpointManager(ckpt, keep_last=1)) if ckpt else None
    return trainer.fit(state, fl.train_step(w.loss_fn), data, checkpoint=checkpoint, ckpt_path=ckpt_path)


def validate(strategy: str, state: fl.TrainState) -> dict[str, float]:
    trainer = fl.Trainer(strategy=strategy, devices=2, accelerator="cpu", enable_progress_bar=False, logger=None)
    return trainer.validate(state, fl.eval_step(lambda m, b: {"loss": w.loss_fn(m, b)}), DataLoader(w.dataset(), batch_size=8))


def fast_equals_pure(state: fl.TrainState, rank: int) -> bool:
    step = fl.train_step(w.loss_fn).with_options(StepOptions(gradient_clip_val=0.5, grad_reduce=ShardedReducer(rank, 2)))
    batch = (w.dataset().tensors[0][rank * 4 : rank * 4 + 4], w.dataset().tensors[1][rank * 4 : rank * 4 + 4])
    fast, _ = step(state, batch)
    pure, _ = apply_train_step(w.loss_fn, state, batch, step.options)
    pairs = zip(fl.tree_leaves((fast.params, fast.opt_state)), fl.tree_leaves((pure.params, pure.opt_state)))
    return all(type(a) is type(b) and torch.equal(a.to_local() if hasattr(a, "to_local") else a, b.to_local() if hasattr(b, "to_local") else b) for a, b in pairs)


def restores_on_two_ranks(state: fl.TrainState, folder: str) -> bool:
    """The sharded checkpoint of ``state`` read back on the same 2 ranks: bitwise each rank's shards."""
    (name,) = os.listdir(folder)
    restored = fl.restore(os.path.join(folder, name), like=state)
    pairs = zip(fl.tree_leaves(restored), fl.tree_leaves(state))
    local = lambda x: x.to_local() if hasattr(x, "to_local") else x  # noqa: E731
    return all(type(a) is type(b) and (torch.equal(local(a), local(b)) if isinstance(a, torch.Tensor) else a == b) for a, b in pairs)


def main(out: str) -> int:
    rank = int(os.environ["RANK"])
    ddp = fit("ddp", STEPS)
    fsdp = fit("fsdp", STEPS, ckpt=os.path.join(out, "ckpt-fsdp"))
    whole = fl.TrainState.create(w.model(0.1), w.tx(), seed=w.SEED)
    resumed = fit("fsdp", 2 * STEPS, dropout=0.0, ckpt_path=os.path.join(out, "one-rank"))
    interrupted = fit("fsdp", STEPS, ckpt=os.path.join(out, "ckpt-interrupt"), callbacks=[Interrupt()])
    torch.save(
        {
            "ddp": w.flat(ddp.params),
            "fsdp": w.flat(full(fsdp.params)),
            "fsdp_opt": fl.tree_leaves(full(fsdp.opt_state)),
            "rank_bytes": shard_bytes(fsdp),
            "whole_bytes": shard_bytes(whole),
            "local_shapes": {k: tuple(v.to_local().shape) for k, v in fsdp.params.items()},
            "resumed": w.flat(full(resumed.params)),
            "val": (validate("ddp", ddp), validate("fsdp", fsdp)),
            "fast_equals_pure": fast_equals_pure(fsdp, rank),
            "restores_on_two_ranks": restores_on_two_ranks(fsdp, os.path.join(out, "ckpt-fsdp")),
            "resumed_step": resumed.loop.global_step,
            "interrupted": (interrupted.loop.status, interrupted.loop.global_step, w.flat(full(interrupted.params))),
        },
        os.path.join(out, f"fsdp-{rank}.pt"),
    )
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1])
    except fl.FnloopError as err:
        print(f"fsdp_worker: error: {err}", file=sys.stderr, flush=True)
        code = 1
    sys.exit(code)
