"""Sweep 8 learning rates of AdamW on scikit-learn's digits in ONE fit: the optimizer's
hyperparameters are tensors of the state (``flo.inject_hyperparams``), so the 8 runs stack into one
state that ``Trainer.fit`` trains as one batched step; print each member's test accuracy.

    python examples/sweep_digits.py             # full run
    python examples/sweep_digits.py --quick     # a shorter run for smoke tests
    fnloop fit --config examples/sweep_digits.yaml   # the same sweep from the command line
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

import fnloop as fl
import fnloop.optim as flo
from digits import loss_fn, make_data, make_model

LRS = [1e-4, 3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 3e-2]


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, for smoke tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    train, val, test = make_data(args.seed)
    epochs = 6 if args.quick else 30
    # every member starts from the same weights (one seed) and sees the same batches
    state = fl.sweep(make_model(), flo.adamw, lr=LRS, weight_decay=1e-4, seed=args.seed)
    trainer = fl.Trainer(
        max_epochs=epochs,
        seed=args.seed,
        callbacks=[fl.EarlyStopping("val/loss", patience=5)],  # each member stops on its own record
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        logger=False,
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
    metrics = trainer.test(state, fl.eval_step(loss_fn), DataLoader(test, batch_size=256), verbose=False)
    print(f"trained {len(LRS)} learning rates in one fit: {state.loop.epoch} epochs in {seconds:.1f} s")
    accs = [metrics[f"test/acc/member_{i}"] for i in range(len(LRS))]
    for values, acc in zip(fl.sweep_values(state), accs):
        print(f"lr={values['lr']:.0e}  test accuracy: {acc:.4f}")
    best = max(range(len(LRS)), key=lambda i: accs[i])
    print(f"best: lr={LRS[best]:.0e} with test accuracy {accs[best]:.4f}")
    return accs


if __name__ == "__main__":
    main()
