"""Data-parallel scaling on CPU (gloo): fnloop's DDP step against torch's DistributedDataParallel.

Two processes (``torch.multiprocessing.spawn``, gloo on a free 127.0.0.1 port, one thread each)
train an MLP 256-1024-1024-10 with AdamW at 64 samples per rank and step. Side by side, in
interleaved rounds (both ranks run every contender in lockstep; rank 0 times):

* fnloop DDP: ``fl.train_step(loss_fn)`` with the strategy's gradient reduction in the step
  (bucketed functional all-reduce), donated as the driver runs it;
* torch DDP: ``DistributedDataParallel(model)`` + ``torch.optim.AdamW(foreach=True)``
  (``zero_grad``, ``backward``, ``step``).

A process's ratio is the median over rounds of fnloop's time over torch's in the same round.
Scaling: samples/s of the fnloop step on 1 rank (this process, one thread) and on 2 ranks with the
same per-rank batch; efficiency = samples/s(2) / (2 x samples/s(1)). On a machine with fewer
free cores than ranks the efficiency measures the machine, not the engine.

    python benchmarks/scaling.py [--json] [--rounds 15] [--per-round 10]

Target: fnloop DDP / torch DDP <= 1.05.
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
from fnloop.connectors.launch import free_port
from fnloop.connectors.strategy import GradReducer
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print one JSON line with the figures")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    one = fnloop_step(0, 1)
    timed(one, 5)
    single = statistics.median(timed(one, args.per_round) for _ in range(args.rounds))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        torch.multiprocessing.spawn(worker, args=(2, free_port(), args.rounds, args.per_round, out), nprocs=2, join=True)
        with open(out) as f:
            samples = json.load(f)
    ratio = statistics.median(a / b for a, b in zip(samples["fnloop"], samples["torch"]))
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
    print(f"  fnloop DDP / torch DDP  {ratio:.3f}   (target <= 1.05)")
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in result.items()}))


if __name__ == "__main__":
    sys.exit(main())
