"""Joining (or starting) the processes of a distributed run; the engine is ``torch.distributed``.

* Under ``torchrun`` (any ``--nnodes``), or any launcher that sets ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, :func:`connect` reads the environment and
  joins the default process group (gloo on CPU, nccl on CUDA).
* Without one, ``Trainer(strategy="ddp", devices=2)`` starts the other local ranks itself, as
  Lightning's subprocess launcher does: this process becomes rank 0 and the others run the same
  command (``sys.argv``) with the rank variables set, started and watched through torch's elastic
  multiprocessing API (``torch.distributed.elastic.multiprocessing.start_processes``). Several
  nodes need ``torchrun`` on every node.

The process group lives as long as the process: fit, then test, reuse it.

Example:
    >>> from fnloop.connectors.launch import launched_by_env
    >>> import os
    >>> launched_by_env({"RANK": "1", "WORLD_SIZE": "2"}), launched_by_env({})
    (True, False)
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from fnloop.connectors.device import parse_devices, process_device, resolve_accelerator
from fnloop.connectors.strategy import DDPStrategy, Parallel, resolve_strategy
from fnloop.errors import ConfigError

__all__ = ["launched_by_env", "plan", "connect", "free_port", "worker_command"]

_CURRENT: list[Parallel] = []  # the process group this process joined (one per process)
_WORKERS: list[Any] = []  # the elastic PContext of the ranks this process started


def launched_by_env(env: Mapping[str, str] | None = None) -> bool:
    """A launcher (torchrun, SLURM through torchrun, fnloop's own) set this process's rank."""
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plan(trainer: Any) -> tuple[str, Any, int, DDPStrategy | None]:
    """``(accelerator, devices, world size, strategy)`` of a trainer's flags (see
    :func:`connect`); a ConfigError naming the flag when they disagree with the launcher."""
    accelerator = resolve_accelerator(trainer.accelerator)
    devices = parse_devices(trainer.devices, accelerator)
    per_node = len(devices) if isinstance(devices, list) else devices
    strategy = resolve_strategy(trainer.strategy)
    if launched_by_env():
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if trainer.devices != "auto" and per_node * trainer.num_nodes != world and not (per_node == local and trainer.num_nodes == 1):
            raise ConfigError(
                f"Trainer(devices={trainer.devices!r}, num_nodes={trainer.num_nodes}): the launcher started {world} processes "
                f"({local} on this node); set devices to the processes per node and num_nodes to the nodes"
            )
        if accelerator == "cuda" and isinstance(devices, list) and len(devices) < local:
            devices = list(range(local))
    else:
        world = per_node * trainer.num_nodes
        if trainer.num_nodes > 1:
            raise ConfigError(
                f"Trainer(num_nodes={trainer.num_nodes}): several nodes need a launcher on every node, e.g. "
                f"torchrun --nnodes {trainer.num_nodes} --nproc_per_node {per_node} --rdzv_endpoint HOST:PORT script.py"
            )
    if world > 1 and strategy is None:
        strategy = DDPStrategy()
    return accelerator, devices, world, strategy


def worker_command() -> list[str]:
    """The command that runs this program again (``python -m pkg`` or ``python script``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return [sys.executable, "-m", name, *sys.argv[1:]]
    return [sys.executable, *sys.argv]


def _start_workers(world: int, port: int) -> None:
    """Ranks ``1..world-1`` of this node, running this program again with the rank variables."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, start_processes

    command = worker_command()
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0"}
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: ranks sharing the cores do not oversubscribe them
        threads = max(1, (os.cpu_count() or 1) // world)
        base["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(min(torch.get_num_threads(), threads))
    envs = {i - 1: {**base, "RANK": str(i), "LOCAL_RANK": str(i)} for i in range(1, world)}
    args = {i - 1: tuple(command[1:]) for i in range(1, world)}
    logs = DefaultLogsSpecs(log_dir=tempfile.mkdtemp(prefix="fnloop-ranks-"))
    _WORKERS.append(start_processes("fnloop", command[0], args, envs, logs, start_method="spawn"))
    atexit.register(_join_workers)


def _join_workers() -> None:
    """At exit of the launching process: wait for the ranks it started (they finish the same
    program); a rank that failed is reported."""
    while _WORKERS:
        ctx = _WORKERS.pop()
        result = ctx.wait(timeout=600)
        if result is None:
            ctx.close()
        elif result.is_failed():
            for i, failure in result.failures.items():
                print(f"fnloop: rank {i + 1} exited with code {failure.exitcode}", file=sys.stderr, flush=True)


def connect(trainer: Any) -> Parallel:
    """This process's place in the run the trainer's flags describe, joining (or starting) the
    process group when the run has several processes. Idempotent within a process."""
    accelerator, devices, world, strategy = plan(trainer)
    if world == 1:
        return Parallel(device=process_device(accelerator, devices, 0), strategy=strategy)
    if _CURRENT:
        return _CURRENT[0]
    import torch.distributed as dist

    if not launched_by_env():
        port = free_port()
        _start_workers(world, port)
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        os.environ.update(env)  # this process is rank 0 of the run it started
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    device = process_device(accelerator, devices, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    assert strategy is not None
    if not dist.is_initialized():
        dist.init_process_group(
            strategy.backend(device), timeout=datetime.timedelta(seconds=strategy.timeout_s), device_id=device if device.type == "cuda" else None
        )
    here = Parallel(rank=rank, world_size=world, local_rank=local_rank, device=device, strategy=strategy)
    _CURRENT.append(here)
    atexit.register(_leave)
    return here


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()  # no rank tears the group down while another still uses it
        except Exception:  # a rank is gone: nothing to wait for
            pass
        dist.destroy_process_group()
    _CURRENT.clear()
