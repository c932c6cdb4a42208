"""Data-parallel scaling on CPU (gloo): fnloop's DDP step against torch's DistributedDataParallel.

Two processes (``torch.multiprocessing.spawn``, gloo on a free 127.0.0.1 port, one thread each)
train an MLP 256-1024-1024-10 with AdamW at 64 samples per rank and step. Side by side, in
interleaved rounds (both ranks run every contender in lockstep; rank 0 times):

* fnloop DDP: ``fl.train_step(loss_fn)`` with the strategy's gradient reduction in the step
  (bucketed functional all-reduce), donated as the driver runs it;
* torch DDP: ``DistributedDataParallel(model)`` + ``torch.optim.AdamW(foreach=True)``
  (``zero_grad``, ``backward``, ``step``).

A launch's ratio is the median over rounds of fnloop's time over torch's in the same round; the
figure is the median over ``--launches`` fresh launches (how the ranks' threads land on the CPUs
differs from one launch to the next and moves a launch's ratio by several percent).
Scaling: samples/s of the fnloop step on 1 rank (this process, one thread) and on 2 ranks with the
same per-rank batch; efficiency = samples/s(2) / (2 x samples/s(1)). On a machine with fewer
free cores than ranks the efficiency measures the machine, not the engine.

    python benchmarks/scaling.py [--json] [--rounds 15] [--per-round 10]

Target: fnloop DDP / torch DDP <= 1.05.

Memory (``--memory``): an MLP 4096-4096-4096-4096 (50.3 M parameters) with AdamW, three steps
on 1 process and under FSDP on 2 ranks; per rank, the peak over the steps of the bytes of params
and optimizer state the rank holds (the local shards of the state's leaves). The full params
the FSDP step all-gathers live only during a step; they are printed beside. Target: 2-rank FSDP
<= 0.6 x the 1-rank figure.

    python benchmarks/scaling.py --memory [--json]
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
import torch.distributed as dist

import fnloop as fl
import fnloop.optim as flo
from fnloop.connectors.fsdp import FSDPStrategy, shard_bytes
from fnloop.connectors.launch import free_port
from fnloop.connectors.strategy import GradReducer, Parallel
from fnloop.options import StepOptions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import loss_fn  # noqa: E402
from step import mlp as mlp_of  # noqa: E402

WIDTHS = [256, 1024, 1024, 10]
BATCH = 64


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return mlp_of(WIDTHS)


def data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(BATCH, WIDTHS[0], generator=g), torch.randint(0, WIDTHS[-1], (BATCH,), generator=g)


def fnloop_step(rank: int, world: int):
    reducer = GradReducer(rank, world) if world > 1 else None
    step = fl.train_step(loss_fn).with_options(StepOptions(grad_reduce=reducer))
    box = [fl.TrainState.create(mlp(), flo.adamw(lr=1e-3), seed=0)]
    batch = data(rank)

    def run() -> None:
        box[0], _ = step.donated(box[0], batch)

    return run


def torch_ddp_step(rank: int):
    model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(mlp()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    batch = data(rank)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()

    return run


def timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def worker(rank: int, world: int, port: int, rounds: int, per_round: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fns = {"fnloop": fnloop_step(rank, world), "torch": torch_ddp_step(rank)}
        for fn in fns.values():
            timed(fn, 5)  # warm up
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                dist.barrier()
                samples[name].append(timed(fn, per_round))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(samples, f)
    finally:
        dist.destroy_process_group()


MEMORY_WIDTHS = [4096, 4096, 4096, 4096]


def state_peak(rank: int, world: int) -> dict[str, int]:
    """Parameters, and the peak bytes of params + optimizer state this rank holds over three steps."""
    torch.manual_seed(0)
    module = mlp_of(MEMORY_WIDTHS)
    state = fl.TrainState.create(module, flo.adamw(lr=1e-3), seed=0)
    del module  # the user's module; the state's template is on the meta device
    n_params = sum(p.numel() for p in state.params.values())
    strategy = FSDPStrategy()
    if world > 1:
        state = strategy.setup_state(state, Parallel(rank=rank, world_size=world, strategy=strategy))
    step = fl.train_step(loss_fn).with_options(StepOptions(grad_reduce=strategy.reducer(rank, world) if world > 1 else None))
    g = torch.Generator().manual_seed(rank)
    batch = torch.randn(8, MEMORY_WIDTHS[0], generator=g), torch.randint(0, MEMORY_WIDTHS[-1], (8,), generator=g)
    peak = shard_bytes(state)
    for _ in range(3):
        state, _ = step.donated(state, batch)
        peak = max(peak, shard_bytes(state))
    return {"params": n_params, "peak_state_bytes": peak, "gathered_param_bytes": 4 * n_params if world > 1 else 0}


def memory_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        figures: list = [None] * world
        dist.all_gather_object(figures, state_peak(rank, world))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(figures, f)
    finally:
        dist.destroy_process_group()


def memory(as_json: bool) -> None:
    """Print the FSDP memory figure (see the module docstring)."""
    torch.set_num_threads(1)
    one = state_peak(0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "memory.json")
        torch.multiprocessing.spawn(memory_worker, args=(2, free_port(), out), nprocs=2, join=True)
        with open(out) as f:
            ranks = json.load(f)
    worst = max(r["peak_state_bytes"] for r in ranks)
    result = {
        "params_millions": one["params"] / 1e6,
        "state_mb_1rank": one["peak_state_bytes"] / 2**20,
        "state_mb_fsdp_2rank_max": worst / 2**20,
        "fsdp_over_1rank": worst / one["peak_state_bytes"],
        "gathered_param_mb_in_step": ranks[0]["gathered_param_bytes"] / 2**20,
    }
    print(f"MLP {'-'.join(map(str, MEMORY_WIDTHS))} ({result['params_millions']:.1f} M params), AdamW: params + optimizer state per rank")
    print(f"  1 rank          {result['state_mb_1rank']:9.1f} MiB")
    for i, r in enumerate(ranks):
        print(f"  FSDP rank {i}     {r['peak_state_bytes'] / 2**20:9.1f} MiB   (+{r['gathered_param_bytes'] / 2**20:.1f} MiB of params gathered during a step)")
    print(f"  FSDP / 1 rank   {result['fsdp_over_1rank']:.3f}   (target <= 0.6)")
    if as_json:
        print(json.dumps({k: round(v, 4) for k, v in result.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print one JSON line with the figures")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--launches", type=int, default=5, help="fresh 2-rank launches (the ratio: their median)")
    parser.add_argument("--memory", action="store_true", help="the FSDP memory figure instead of the DDP timings")
    args = parser.parse_args()
    if args.memory:
        return memory(args.json)
    torch.set_num_threads(1)
    one = fnloop_step(0, 1)
    timed(one, 5)
    single = statistics.median(timed(one, args.per_round) for _ in range(args.rounds))
    runs = []  # one launch of 2 ranks each: how the ranks' threads share the CPUs differs between launches
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.launches):
            out = os.path.join(tmp, f"times-{k}.json")
            torch.multiprocessing.spawn(worker, args=(2, free_port(), args.rounds, args.per_round, out), nprocs=2, join=True)
            with open(out) as f:
                runs.append(json.load(f))
    ratios = [statistics.median(a / b for a, b in zip(r["fnloop"], r["torch"])) for r in runs]
    ratio = statistics.median(ratios)
    samples = {k: [x for r in runs for x in r[k]] for k in runs[0]}
    two = statistics.median(samples["fnloop"])
    sps1, sps2 = BATCH / single, 2 * BATCH / two
    result = {
        "fnloop_1rank_ms": single * 1e3,
        "fnloop_ddp_2rank_ms": two * 1e3,
        "torch_ddp_2rank_ms": statistics.median(samples["torch"]) * 1e3,
        "fnloop_ddp_over_torch_ddp": ratio,
        "samples_per_s_1rank": sps1,
        "samples_per_s_2rank": sps2,
        "scaling_efficiency": sps2 / (2 * sps1),
        "cpus": os.cpu_count() or 0,
    }
    print(f"MLP {'-'.join(map(str, WIDTHS))}, AdamW, {BATCH} samples per rank, gloo, one thread per rank, {os.cpu_count()} CPUs")
    print(f"  1 rank  fnloop          {result['fnloop_1rank_ms']:8.2f} ms/step  {sps1:8.0f} samples/s")
    print(f"  2 ranks fnloop DDP      {result['fnloop_ddp_2rank_ms']:8.2f} ms/step  {sps2:8.0f} samples/s  efficiency {result['scaling_efficiency']:.2f}")
    print(f"  2 ranks torch DDP       {result['torch_ddp_2rank_ms']:8.2f} ms/step")
    print(f"  fnloop DDP / torch DDP  {ratio:.3f}   (target <= 1.05; per launch: {', '.join(f'{r:.3f}' for r in ratios)})")
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in result.items()}))


if __name__ == "__main__":
    sys.exit(main())
