"""A hand-written training loop over fnloop's pure steps (no Trainer), with a mid-run checkpoint.

The loop below is what ``Trainer.fit`` does for you, written out: it builds a ``TrainState``,
calls ``fl.train_step`` batch by batch, reduces metrics with ``fnloop.metrics``, validates with
``fl.eval_step``, saves a checkpoint half-way, restores it and checks that the restored run
continues bitwise like the one that never stopped, then reports validation accuracy.

    python examples/custom_loop.py                 # full run (a few seconds on 2 CPU cores)
    python examples/custom_loop.py --quick         # a shorter run for smoke tests
    python examples/custom_loop.py --compile       # the same steps under torch.compile(fullgraph=True)
                                                   # (compiling takes longer than the run itself)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fnloop as fl
import fnloop.optim as flo
from fnloop.metrics import Accumulator, Accuracy, Mean
from fnloop.testing import assert_trees_equal

Batch = tuple[torch.Tensor, torch.Tensor]


def make_data(seed: int = 0) -> tuple[Batch, Batch]:
    """Digits (8x8 images scaled to [0, 1], 10 classes) split 80/20 into train and validation.

    Example:
        >>> (x, y), (x_val, y_val) = make_data()
        >>> x.shape[1], int(y.max())
        (64, 9)
    """
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return (x_train, y_train), (x_val, y_val)


def make_model() -> torch.nn.Module:
    """An MLP with dropout (the dropout masks come from the state's RNG key and step)."""
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 10),
    )


def loss_fn(model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy and batch accuracy; used by the train step and the eval step."""
    x, y = batch
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def logits_fn(model: Any, x: torch.Tensor) -> torch.Tensor:
    """The model's logits (the predict step)."""
    return model(x)


def epoch_batches(data: Batch, *, batch_size: int, seed: int, epoch: int) -> list[Batch]:
    """The shuffled batches of one epoch: a pure function of ``(seed, epoch)``.

    The permutation comes from its own ``torch.Generator``, so a resumed run sees the same
    batches as an uninterrupted one and the global RNG is never touched.

    Example:
        >>> data = (torch.arange(10.0)[:, None], torch.arange(10))
        >>> [len(b[1]) for b in epoch_batches(data, batch_size=4, seed=0, epoch=0)]
        [4, 4, 2]
    """
    x, y = data
    generator = torch.Generator().manual_seed(fl.rng.fold(seed, epoch))
    order = torch.randperm(len(y), generator=generator)
    return [(x[idx], y[idx]) for idx in order.split(batch_size)]


def train_epoch(state: fl.TrainState, step: Callable[..., Any], batches: list[Batch]) -> tuple[fl.TrainState, float]:
    """Run ``step`` over ``batches``; returns the new state and the epoch's mean train loss.

    The running mean stays a tensor until the end of the epoch: one host sync per epoch.
    """
    mean = Mean()
    loss = mean.init()
    for batch in batches:
        state, metrics = step(state, batch)
        loss = mean.update(loss, metrics["loss"], len(batch[1]))
    state = state.replace(loop=state.loop.replace(epoch=state.loop.epoch + 1))  # counters live in the state too
    return state, float(mean.compute(loss))


def validate(
    state: fl.TrainState, val_step: Callable[..., Any], data: Batch, batch_size: int = 128
) -> dict[str, float]:
    """``val_step``'s metrics over ``data``, as batch-size weighted means."""
    x, y = data
    acc = Accumulator()
    accs = acc.init()
    for start in range(0, len(y), batch_size):
        batch = (x[start:start + batch_size], y[start:start + batch_size])
        accs = acc.update(accs, val_step(state, batch), len(batch[1]))
    return {f"val/{k}": float(v) for k, v in acc.compute(accs).items()}


def accuracy(state: fl.TrainState, predict: Callable[..., Any], data: Batch, batch_size: int = 128) -> float:
    """Accuracy of the predicted classes over ``data`` (exact counts with ``metrics.Accuracy``)."""
    x, y = data
    metric = Accuracy()
    counts = metric.init()
    for start in range(0, len(y), batch_size):
        counts = metric.update(counts, predict(state, x[start:start + batch_size]), y[start:start + batch_size])
    return float(metric.compute(counts))


def run_steps(state: fl.TrainState, step: Callable[..., Any], batches: list[Batch]) -> fl.TrainState:
    """``state`` after one ``step`` per batch."""
    for batch in batches:
        state, _ = step(state, batch)
    return state


def save_restore_and_check(
    state: fl.TrainState, step: Callable[..., Any], next_batches: list[Batch], url: str
) -> fl.TrainState:
    """Save ``state`` at ``url``, restore it, and check that both continue bitwise equally.

    Returns the restored state (training goes on from it).

    Raises:
        AssertionError: naming every key path where the two continuations differ.
    """
    fl.save(state, url, overwrite=True)  # a rerun with the same --ckpt-dir replaces it
    restored = fl.restore(url, like=state)
    assert_trees_equal(restored, state, msg=f"restored from {url}")
    assert_trees_equal(
        run_steps(restored, step, next_batches),
        run_steps(state, step, next_batches),
        msg=f"{len(next_batches)} steps after restoring {url}",
    )
    return restored


def main(argv: list[str] | None = None) -> float:
    """Parse ``argv``, train with the hand-written loop; returns the final validation accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, for smoke tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default: 20 (6 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="run the steps under fl.compile")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend with --compile")
    parser.add_argument("--ckpt-dir", default=None, help="folder of the mid-run checkpoint (default: a temporary one)")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (6 if args.quick else 20)
    if epochs < 2:
        parser.error(f"--epochs={epochs}: the mid-run checkpoint needs at least 2 epochs")

    train, val = make_data(args.seed)
    steps_per_epoch = -(-len(train[1]) // args.batch_size)
    schedule = flo.warmup_cosine(3e-3, warmup_steps=steps_per_epoch, decay_steps=epochs * steps_per_epoch)
    tx = flo.adamw(schedule, weight_decay=1e-4)
    state = fl.TrainState.create(make_model(), tx, seed=args.seed)
    step, val_step, predict = fl.train_step(loss_fn), fl.eval_step(loss_fn), fl.predict_step(logits_fn)
    if args.compile:
        # dynamic=False: one graph per batch shape (the last batch of an epoch is smaller)
        step, val_step, predict = (
            fl.compile(s, backend=args.backend, dynamic=False) for s in (step, val_step, predict)
        )

    def batches_of(epoch: int) -> list[Batch]:
        return epoch_batches(train, batch_size=args.batch_size, seed=args.seed, epoch=epoch)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fnloop-custom-loop-") as tmp:
        ckpt_dir = args.ckpt_dir or tmp
        while state.loop.epoch < epochs:
            epoch = state.loop.epoch
            state, train_loss = train_epoch(state, step, batches_of(epoch))
            metrics = validate(state, val_step, val)
            print(
                f"epoch {epoch + 1:2d}/{epochs}  step {int(state.step):4d}  "
                f"lr {float(flo.learning_rate(state.opt_state)):.2e}  "
                f"train/loss {train_loss:.4f}  val/loss {metrics['val/loss']:.4f}  val/acc {metrics['val/acc']:.4f}"
            )
            if state.loop.epoch == epochs // 2:
                url = f"{ckpt_dir}/ckpt-{int(state.step):05d}"
                state = save_restore_and_check(state, step, batches_of(state.loop.epoch)[:2], url)
                print(f"saved and restored {url}: the restored run matches bitwise for 2 more steps")
    seconds = time.perf_counter() - start

    acc = accuracy(state, predict, val)
    print(f"trained {state.loop.epoch} epochs ({int(state.step)} steps) in {seconds:.1f} s")
    print(f"validation accuracy: {acc:.4f}")
    return acc


if __name__ == "__main__":
    main()
