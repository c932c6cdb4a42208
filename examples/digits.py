"""Train an MLP on scikit-learn's bundled digits data with fnloop and report test accuracy.

    python examples/digits.py                 # full run (a few seconds on 2 CPU cores)
    python examples/digits.py --quick         # a shorter run for smoke tests
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
import fnloop.optim as flo


def make_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Digits (8x8 images, 10 classes) split 70/15/15, scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    return TensorDataset(x_train, y_train), TensorDataset(x_val, y_val), TensorDataset(x_test, y_test)


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )


def loss_fn(model, batch):
    """Cross-entropy plus accuracy; used for training and evaluation."""
    x, y = batch
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, for smoke tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    train, val, test = make_data(args.seed)
    epochs = 8 if args.quick else 40
    steps_per_epoch = -(-len(train) // 32)
    tx = flo.adamw(flo.warmup_cosine(3e-3, warmup_steps=steps_per_epoch, decay_steps=epochs * steps_per_epoch), weight_decay=1e-4)
    state = fl.TrainState.create(make_model(), tx, seed=args.seed)
    trainer = fl.Trainer(
        max_epochs=epochs,
        callbacks=[fl.EarlyStopping("val/loss", patience=5)],
        enable_progress_bar=False,
        log_every_n_steps=50,
    )
    start = time.perf_counter()
    state = trainer.fit(
        state,
        fl.train_step(loss_fn),
        DataLoader(train, batch_size=32, shuffle=True),
        val_step=fl.eval_step(loss_fn),
        val_data=DataLoader(val, batch_size=256),
    )
    seconds = time.perf_counter() - start
    metrics = trainer.test(state, fl.eval_step(loss_fn), DataLoader(test, batch_size=256))
    print(f"trained {state.loop.epoch} epochs ({state.loop.global_step} steps) in {seconds:.1f} s, status {state.loop.status}")
    print(f"test accuracy: {metrics['test/acc']:.4f}")
    return metrics["test/acc"]


if __name__ == "__main__":
    main()
