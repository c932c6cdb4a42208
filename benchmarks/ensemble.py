"""Ensembles and per-example gradients, side by side in one process, on one thread.

* N MLPs 64-32-32-10 at batch 64 with AdamW (N = 4, 32, 128): N sequential hand-written torch
  loops (``torch.optim.AdamW(foreach=True)``, ``zero_grad``, ``backward``, ``step``) against one
  stacked step, ``fl.vmap(fl.train_step(loss_fn))``, eager and under ``fl.compile``.
* per-example gradients of a batch of 64 (``fl.per_example_grads``) against a loop of 64
  single-example backward passes on the same MLP.

Timings interleave the contenders in short rounds; a ratio is the median over rounds of the
sequential time over the contender's time in the same round (paired: both saw the same load).

    python benchmarks/ensemble.py [--json] [--rounds 15] [--sizes 4 32 128] [--no-compile]

Targets: at N = 32, compiled >= 3x faster than sequential and eager no slower than sequential;
per-example gradients >= 10x faster than the loop.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

import fnloop as fl
import fnloop.optim as flo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import loss_fn  # noqa: E402
from step import mlp as step_mlp  # noqa: E402

WIDTHS = [64, 32, 32, 10]


def mlp() -> torch.nn.Module:
    return step_mlp(WIDTHS)


def ensemble_contenders(n: int, compile_too: bool) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    models = [mlp() for _ in range(n)]
    batch = (torch.randn(64, WIDTHS[0]), torch.randint(0, WIDTHS[-1], (64,)))
    refs = [copy.deepcopy(m) for m in models]
    opts = [torch.optim.AdamW(r.parameters(), lr=1e-3, foreach=True) for r in refs]

    def sequential() -> None:
        for ref, opt in zip(refs, opts):
            opt.zero_grad(set_to_none=True)
            loss_fn(ref, batch).backward()
            opt.step()

    out: dict[str, Callable[[], None]] = {"sequential": sequential}
    step = fl.train_step(loss_fn)
    stacked = fl.stack([fl.TrainState.create(m, flo.adamw(lr=1e-3), seed=i) for i, m in enumerate(models)])
    for name, batched in (("stacked eager", fl.vmap(step)), ("stacked compiled", fl.compile(fl.vmap(step)))):
        if name == "stacked compiled" and not compile_too:
            continue
        box = [stacked]

        def run(batched=batched, box=box) -> None:
            box[0], _ = batched(box[0], batch)

        out[name] = run
    return out


def per_example_contenders() -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(64, WIDTHS[0]), torch.randint(0, WIDTHS[-1], (64,))

    def sequential() -> None:
        grads = []
        for j in range(64):
            model.zero_grad(set_to_none=True)
            loss_fn(model, (x[j : j + 1], y[j : j + 1])).backward()
            grads.append([p.grad for p in model.parameters()])

    state = fl.TrainState.create(model, flo.sgd(lr=0.1))
    grads = fl.per_example_grads(loss_fn)
    compiled = torch.compile(grads)  # the library function under torch.compile (graph breaks at its host reads)
    return {
        "sequential": sequential,
        "per_example_grads": lambda: grads(state, (x, y)) and None,
        "torch.compile of it": lambda: compiled(state, (x, y)) and None,
    }


def side_by_side(fns: dict[str, Callable[[], None]], rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of each contender, and the median over rounds of the sequential
    time over the contender's time (its speed-up)."""
    for fn in fns.values():  # warm up (and compile)
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    base = samples["sequential"]
    speedups = {k: statistics.median(b / a for a, b in zip(v, base)) for k, v in samples.items() if k != "sequential"}
    return {k: statistics.median(v) for k, v in samples.items()}, speedups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print one JSON line with the figures")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 32, 128])
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled contender")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict[str, float] = {}
    for n in args.sizes:
        times, speedups = side_by_side(ensemble_contenders(n, not args.no_compile), args.rounds)
        print(f"{n} MLPs {'-'.join(map(str, WIDTHS))}, batch 64, AdamW:")
        for name, t in times.items():
            extra = f"   {speedups[name]:.2f}x faster than sequential" if name in speedups else ""
            print(f"  {name:18s} {t * 1e3:8.2f} ms/step{extra}")
            result[f"{name.replace(' ', '_')}_ms_n{n}"] = t * 1e3
        for name, s in speedups.items():
            result[f"{name.replace(' ', '_')}_speedup_n{n}"] = s
    times, speedups = side_by_side(per_example_contenders(), args.rounds)
    print("per-example gradients, batch 64:")
    for name, t in times.items():
        extra = f"   {speedups[name]:.1f}x faster than the loop" if name in speedups else ""
        print(f"  {name:18s} {t * 1e3:8.2f} ms{extra}")
    result["per_example_speedup_b64"] = speedups["per_example_grads"]
    result["per_example_compiled_speedup_b64"] = speedups["torch.compile of it"]
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
