"""``Trainer.fit`` vs a hand-written loop over the same DataLoader (and Lightning when installed).

MLP 64-256-256-10, batch 64, AdamW, one thread, progress bar off, logging every 50 steps.
Contenders run alternately, several repeats each; a ratio is the median over repeats of the two
contenders' times in the same repeat:

* hand-written: ``for x, y in loader: zero_grad; backward; step`` (+ ``loss.item()`` every 50 steps);
* fnloop: ``Trainer(max_epochs=E, log_every_n_steps=50).fit(state, step, loader)``;
* fnloop + loggers: the same with ``TensorBoardLogger`` and ``CSVLogger`` writing every 50 steps;
* Lightning: ``lightning.pytorch.Trainer.fit`` with the same settings, when ``pytorch-lightning``
  or ``lightning`` is installed (not a dependency of fnloop).

Also the peak memory of training (peak RSS of a fresh subprocess while it trains, above its RSS
before the model was built) of fit vs the hand-written loop on a 25M-parameter MLP.

    python benchmarks/fit.py [--json] [--repeats 15] [--epochs 4]

Targets: fit / hand-written <= 1.05; fnloop at least 1.3x faster than Lightning;
fit with loggers / fit without <= 1.03; peak memory of fit <= 1.15x hand-written.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
import fnloop.optim as flo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import peak_in_child  # noqa: E402
from step import loss_fn, mlp  # noqa: E402


def make_loader(n: int = 4096, batch_size: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def hand_written(model: torch.nn.Module, loader: DataLoader, epochs: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    step = 0
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, (x, y))
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                loss.item()


def fnloop_fit(model: torch.nn.Module, loader: DataLoader, epochs: int, loggers: bool = False) -> None:
    fnloop_fit_state(fl.TrainState.create(model, flo.adamw(lr=1e-3), seed=0), loader, epochs, loggers)


def fnloop_fit_state(state: fl.TrainState, loader: DataLoader, epochs: int, loggers: bool = False) -> None:
    logger = False  # no sinks (None would be the default TensorBoard + CSV sinks)
    if loggers:
        root = tempfile.mkdtemp(prefix="fnloop-bench-")
        logger = [fl.TensorBoardLogger(root), fl.CSVLogger(root)]
    trainer = fl.Trainer(max_epochs=epochs, enable_progress_bar=False, log_every_n_steps=50, logger=logger, num_sanity_val_steps=0)
    trainer.fit(state, fl.train_step(loss_fn), loader)


def lightning_fit(model: torch.nn.Module, loader: DataLoader, epochs: int) -> None | bool:
    try:
        import lightning.pytorch as lp  # type: ignore[import-not-found]
    except ImportError:
        try:
            import pytorch_lightning as lp  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return False

    class Module(lp.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return loss_fn(self.net, batch)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.AdamW(self.parameters(), lr=1e-3, foreach=True)

    trainer = lp.Trainer(
        max_epochs=epochs, enable_progress_bar=False, log_every_n_steps=50, logger=False,
        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(Module(), loader)
    return None


def timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn(*args)
    if out is False:
        return float("nan")
    return time.perf_counter() - t0


_MEM_CHILD = r"""
import gc, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {here!r})
from fit import hand_written, fnloop_fit_state
from memory import rss, reset_peak, peak
from step import mlp
from torch.utils.data import DataLoader, TensorDataset
import fnloop as fl, fnloop.optim as flo
torch.manual_seed(0)
loader = DataLoader(TensorDataset(torch.randn(256, 2048), torch.randint(0, 10, (256,))), batch_size=64)
base = rss()
model = mlp([2048, 2048, 2048, 2048, 2048, 2048, 2048, 10])
if {which!r} == "hand-written":
    reset_peak()
    hand_written(model, loader, 1)
else:
    state = fl.TrainState.create(model, flo.adamw(lr=1e-3), seed=0)
    del model  # the state holds the weights; the module is a template
    gc.collect()
    reset_peak()
    fnloop_fit_state(state, loader, 1)
print(peak() - base)
"""


def peak_memory(which: str) -> int:
    return peak_in_child(_MEM_CHILD, which)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = mlp([64, 256, 256, 10])
    loader = make_loader()
    runs = {
        "hand-written": lambda: timed(hand_written, copy.deepcopy(base), loader, args.epochs),
        "fnloop fit": lambda: timed(fnloop_fit, copy.deepcopy(base), loader, args.epochs),
        "fnloop fit + loggers": lambda: timed(fnloop_fit, copy.deepcopy(base), loader, args.epochs, True),
        "lightning fit": lambda: timed(lightning_fit, copy.deepcopy(base), loader, args.epochs),
    }
    for run in runs.values():  # warm-up
        run()
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            samples[name].append(run())
    med = {k: statistics.median(v) for k, v in samples.items()}
    steps = args.epochs * len(loader)
    for name, t in med.items():
        if t == t:
            print(f"{name:22s} {t:7.3f} s  ({t / steps * 1e6:7.1f} us/step)  ratio to hand-written {t / med['hand-written']:.3f}")
        else:
            print(f"{name:22s} not installed")
    def paired(a: str, b: str) -> float:
        """Median over repeats of a's time over b's time in the same repeat (both saw the same load)."""
        return statistics.median(x / y for x, y in zip(samples[a], samples[b]))

    result = {
        "fit_over_handwritten": paired("fnloop fit", "hand-written"),
        "loggers_over_fit": paired("fnloop fit + loggers", "fnloop fit"),
        "lightning_over_fit": paired("lightning fit", "fnloop fit"),
    }
    hw_mem, fl_mem = peak_memory("hand-written"), peak_memory("fnloop")
    result["peak_mem_ratio_25M"] = fl_mem / hw_mem
    print(f"fit + loggers / fit: {result['loggers_over_fit']:.3f}")
    if result["lightning_over_fit"] == result["lightning_over_fit"]:
        print(f"lightning / fnloop fit: {result['lightning_over_fit']:.2f}x")
    print(f"peak memory, 25M-parameter MLP: hand-written {hw_mem / 2**20:.0f} MiB, fit {fl_mem / 2**20:.0f} MiB, ratio {fl_mem / hw_mem:.2f}")
    print("targets: fit/hand-written <= 1.05; lightning/fit >= 1.3; loggers/fit <= 1.03; memory ratio <= 1.15")
    if args.json:
        print(json.dumps({k: (round(v, 4) if v == v else None) for k, v in result.items()}))


if __name__ == "__main__":
    main()
