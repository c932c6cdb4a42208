"""fnloop's pure train step vs a hand-written PyTorch loop, side by side in one process.

Measures, on one thread, an MLP 64-256-256-10 with AdamW at batch 64 and 512:

* hand-written: ``torch.optim.AdamW(foreach=True)``, ``zero_grad(set_to_none=True)``,
  ``backward``, ``step``;
* fnloop eager: ``fl.train_step(loss_fn)`` (pure: new state every call);
* fnloop donated: ``step.donated`` (what ``Trainer.fit`` runs by default: in-place updates),
  timed against the hand-written loop in a pass of its own;
* fnloop compiled: ``fl.compile(step)`` (batch 64 only; compiling takes a while).

Timings interleave the contenders in short rounds; a process's ratio is the median over rounds
of the contender's time over the hand-written loop's time in the same round, so machine noise
hits both sides of each ratio alike. Where tensors land in memory shifts a process's ratios by a
few percent, so the timings run in several fresh processes (``--processes``) and the figures are
the medians over those (each process's ratios are printed too). Also prints the peak memory of
one eager step on a 25M-parameter MLP relative to the hand-written loop: the peak RSS of a fresh
subprocess while it trains, above its RSS before the model was built (``tracemalloc`` cannot see
torch's allocator).

    python benchmarks/step.py [--json] [--processes 3] [--rounds 30] [--no-compile]

Targets: eager / hand-written <= 1.05 at both batch sizes; compiled at least 1.3x faster than
hand-written at batch 64; peak memory of the pure eager step <= 2.0x hand-written.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

import fnloop as fl
import fnloop.optim as flo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import peak_in_child  # noqa: E402


def mlp(widths: list[int]) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def contenders(batch_size: int, compile_too: bool) -> dict[str, object]:
    torch.manual_seed(0)
    model = mlp([64, 256, 256, 10])
    x, y = torch.randn(batch_size, 64), torch.randint(0, 10, (batch_size,))
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, foreach=True)

    def hand_written() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(ref, (x, y)).backward()
        opt.step()

    out: dict[str, object] = {"hand-written": hand_written}
    step = fl.train_step(loss_fn)
    box = [fl.TrainState.create(model, flo.adamw(lr=1e-3), seed=0)]

    def eager() -> None:
        box[0], _ = step(box[0], (x, y))

    out["fnloop eager"] = eager
    dbox = [fl.TrainState.create(copy.deepcopy(model), flo.adamw(lr=1e-3), seed=0)]

    def donated() -> None:  # what Trainer.fit runs (donate=True): the optimizer updates in place
        dbox[0], _ = step.donated(dbox[0], (x, y))

    out["fnloop donated"] = donated
    if compile_too:
        fast = fl.compile(step)
        cbox = [fl.TrainState.create(model, flo.adamw(lr=1e-3), seed=0)]

        def compiled() -> None:
            cbox[0], _ = fast(cbox[0], (x, y))

        out["fnloop compiled"] = compiled
    return out


def time_side_by_side(fns: dict[str, object], rounds: int, per_round: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median time per call of each contender, and the median over rounds of each contender's
    time divided by the hand-written loop's time in the same round (paired: both saw the same
    machine load)."""
    for fn in fns.values():  # warm up (and compile)
        for _ in range(10):
            fn()  # type: ignore[operator]
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()  # type: ignore[operator]
            samples[name].append((time.perf_counter() - t0) / per_round)
    base = samples["hand-written"]
    ratios = {k: statistics.median(a / b for a, b in zip(v, base)) for k, v in samples.items()}
    return {k: statistics.median(v) for k, v in samples.items()}, ratios


_MEM_CHILD = r"""
import gc, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {here!r})
from step import mlp, loss_fn
from memory import rss, reset_peak, peak
import fnloop as fl, fnloop.optim as flo
torch.manual_seed(0)
x, y = torch.randn(64, 2048), torch.randint(0, 10, (64,))
base = rss()
model = mlp([2048, 2048, 2048, 2048, 2048, 2048, 2048, 10])
if {which!r} == "hand-written":
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    reset_peak()
    for _ in range(3):
        opt.zero_grad(set_to_none=True); loss_fn(model, (x, y)).backward(); opt.step()
else:
    state = fl.TrainState.create(model, flo.adamw(lr=1e-3), seed=0)
    del model  # the state holds the weights; the module is a template
    gc.collect()
    step = fl.train_step(loss_fn)
    reset_peak()
    for _ in range(3):
        state, _ = step(state, (x, y))
print(peak() - base)
"""


def peak_memory(which: str) -> int:
    return peak_in_child(_MEM_CHILD, which)


def measure(rounds: int, compile_too: bool) -> dict[str, float]:
    """The timing figures of this process."""
    torch.set_num_threads(1)
    result: dict[str, float] = {}
    for batch_size in (64, 512):
        fns = contenders(batch_size, compile_too=batch_size == 64 and compile_too)
        donated = {"hand-written": fns["hand-written"], "fnloop donated": fns.pop("fnloop donated")}
        per_round = 20 if batch_size == 64 else 5
        times, ratios = time_side_by_side(fns, rounds, per_round)
        # a pass of its own: a third contender in the rounds would change what the others find in the caches
        donated_times, donated_ratios = time_side_by_side(donated, rounds, per_round)
        times["fnloop donated"] = donated_times["fnloop donated"]
        result[f"eager_over_handwritten_b{batch_size}"] = ratios["fnloop eager"]
        result[f"donated_over_handwritten_b{batch_size}"] = donated_ratios["fnloop donated"]
        if "fnloop compiled" in ratios:
            result["handwritten_over_compiled_b64"] = 1.0 / ratios["fnloop compiled"]
        for name, t in times.items():
            result[f"{name.replace(' ', '_').replace('-', '')}_us_b{batch_size}"] = t * 1e6
    return result


def in_processes(n: int, rounds: int, compile_too: bool) -> list[dict[str, float]]:
    """:func:`measure` in ``n`` fresh processes, one after the other."""
    import subprocess

    argv = [sys.executable, os.path.abspath(__file__), "--worker", "--rounds", str(rounds)]
    if not compile_too:
        argv.append("--no-compile")
    runs = []
    for i in range(n):
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"benchmark process {i + 1} failed:\n{out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  process {i + 1}/{n} done", file=sys.stderr, flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print one JSON line with the figures")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes to time in (figures: their medians)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled contender")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one process's timings, as JSON
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.rounds, not args.no_compile)))
        return
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    runs = in_processes(args.processes, args.rounds, not args.no_compile)
    result = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    for batch_size in (64, 512):
        print(f"batch {batch_size} (median over {len(runs)} processes; per process in brackets):")
        for name in ("hand-written", "fnloop eager", "fnloop donated", "fnloop compiled"):
            key = f"{name.replace(' ', '_').replace('-', '')}_us_b{batch_size}"
            if key in result:
                print(f"  {name:16s} {result[key]:9.1f} us/step")
        for key, label in (
            ("eager_over_handwritten", "eager / hand-written"),
            ("donated_over_handwritten", "donated / hand-written"),
            ("handwritten_over_compiled", "hand-written / compiled"),
        ):
            key = f"{key}_b{batch_size}"
            if key in result:
                each = ", ".join(f"{r[key]:.3f}" for r in runs)
                print(f"  {label:24s} {result[key]:.3f}   [{each}]")
    hw_mem, fl_mem = peak_memory("hand-written"), peak_memory("fnloop")
    result["peak_mem_ratio_25M"] = fl_mem / hw_mem
    print(f"peak memory, 25M-parameter MLP: hand-written {hw_mem / 2**20:.0f} MiB, fnloop eager {fl_mem / 2**20:.0f} MiB, ratio {fl_mem / hw_mem:.2f}")
    print("targets: eager/hand-written <= 1.05 (both batches); hand-written/compiled >= 1.3 (b64); memory ratio <= 2.0")
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in result.items()}))


if __name__ == "__main__":
    main()
