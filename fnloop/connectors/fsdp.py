"""Fully sharded data parallel (FSDP2, Lightning's ``strategy="fsdp"``) over ``torch.distributed``.

Each rank holds ``1/world`` of every parameter and of the optimizer state that follows it: the
state's leaves are DTensors sharded on dim 0 (``Shard(0)``, torch's chunking: the first ranks
hold ``ceil(n / world)`` rows, the last may hold fewer or none) over the world's device mesh.
0-d leaves stay whole on every rank. Inside the train step (:class:`ShardedReducer`, through
``StepOptions``):

1. the local shards are all-gathered into full params for the forward and backward pass;
2. the gradients are reduce-scattered back to shards and averaged over the ranks;
3. the optimizer (elementwise) updates the local shards of params and optimizer state.

The collectives are torch's functional ones (``all_gather_single``, ``reduce_scatter_single``).
A checkpoint of a sharded state has one shard file per rank (:mod:`fnloop.checkpoint._sharded`)
and restores onto any world size.

Example:
    >>> from fnloop.connectors.strategy import resolve_strategy
    >>> resolve_strategy("fsdp")
    FSDPStrategy(process_group_backend=None, timeout_s=300.0)
    >>> chunks(5, 2), chunks(1, 2)
    ([(0, 3), (3, 5)], [(0, 1), (1, 1)])
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

from fnloop.errors import ConfigError
from fnloop.tree import tree_leaves, tree_map

__all__ = [
    "FSDPStrategy",
    "ShardedReducer",
    "chunks",
    "is_sharded",
    "local_tree",
    "full_tree",
    "sharded_like",
    "distribute_like",
    "shard_state",
    "shard_bytes",
]


def chunks(n: int, world: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of dim 0 held by each rank (torch's ``Shard(0)`` chunking)."""
    size = math.ceil(n / world) if n else 0
    return [(min(r * size, n), min((r + 1) * size, n)) for r in range(world)]


def _is_dtensor(x: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def is_sharded(tree: Any) -> bool:
    """``tree`` holds DTensor leaves (a state set up by :class:`FSDPStrategy`)."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist yet
        return False
    return any(_is_dtensor(x) for x in tree_leaves(tree))


def local_tree(tree: Any) -> Any:
    """``tree`` with every DTensor leaf replaced by this rank's shard (the same memory)."""
    return tree_map(lambda x: x.to_local() if _is_dtensor(x) else x, tree)


def full_tree(tree: Any) -> Any:
    """``tree`` with every DTensor leaf gathered whole on every rank (torch's ``full_tensor``);
    ``tree`` itself when it holds none."""
    if not is_sharded(tree):
        return tree
    return tree_map(lambda x: x.full_tensor() if _is_dtensor(x) else x, tree)


def sharded_like(local: Any, like: Any) -> Any:
    """Inverse of :func:`local_tree`: the local shards of ``local`` as DTensors placed like the
    matching leaves of ``like`` (no communication)."""
    from torch.distributed.tensor import DTensor

    def wrap(x: Any, ref: Any) -> Any:
        if not _is_dtensor(ref):
            return x
        mesh, placements = ref.device_mesh, ref.placements
        return DTensor.from_local(x, mesh, placements, run_check=False, shape=ref.shape, stride=ref.stride())

    return tree_map(wrap, local, like)


def distribute_like(tree: Any, like: Any) -> Any:
    """Full tensors of ``tree`` sliced into DTensors placed like ``like``'s DTensor leaves (each
    rank keeps its own chunk: no communication)."""
    from torch.distributed.tensor import distribute_tensor

    def place(x: Any, ref: Any) -> Any:
        if not _is_dtensor(ref):
            return x
        return distribute_tensor(x.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)

    return tree_map(place, tree, like)


def _shardable(x: Any, shapes: set[tuple[int, ...]]) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > 0 and tuple(x.shape) in shapes


def shard_state(state: Any, mesh: Any) -> Any:
    """``state`` with its params and the optimizer-state leaves shaped like a param sharded on
    dim 0 over ``mesh``; 0-d leaves, buffers and counters stay whole (replicated)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    shapes = {tuple(p.shape) for p in state.params.values() if p.dim() > 0}

    def shard(x: Any) -> Any:
        return distribute_tensor(x.detach(), mesh, [Shard(0)]) if _shardable(x, shapes) else x

    return state.replace(params=tree_map(shard, state.params), opt_state=tree_map(shard, state.opt_state))


def shard_bytes(state: Any) -> int:
    """Bytes of params and optimizer state this rank holds (local shards of DTensor leaves)."""
    leaves = tree_leaves(local_tree((state.params, state.opt_state)))
    return sum(x.numel() * x.element_size() for x in leaves if isinstance(x, torch.Tensor))


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` on dim 0, contiguous (equal-sized collective inputs)."""
    if x.shape[0] < rows:
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))
    return x.contiguous()


@dataclasses.dataclass(frozen=True)
class ShardedReducer:
    """What a train step does with sharded params and their gradients (``StepOptions.grad_reduce``).

    :meth:`gather` all-gathers the local shards into full params; :meth:`__call__` reduce-scatters
    full gradients into this rank's shards, averaged over the ranks. 0-d params are whole on every
    rank: their gradients are all-reduced.

    Attributes:
        rank: this process's rank (also folded into the step's seed, as under DDP).
        world_size: ranks in the group.
    """

    rank: int
    world_size: int
    group: Any = dataclasses.field(default=None, compare=False)
    sharded = True

    def _group(self) -> Any:
        import torch.distributed as dist

        return self.group if self.group is not None else dist.group.WORLD

    def gather(self, local: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        """Full params (of global ``shapes``) from this rank's shards ``local``."""
        import torch.distributed._functional_collectives as fc

        out = {}
        for name, x in local.items():
            shape = shapes[name]
            if len(shape) == 0:
                out[name] = x
                continue
            padded = _pad_rows(x, chunks(shape[0], self.world_size)[0][1])
            out[name] = fc.wait_tensor(fc.all_gather_single(padded, 0, self._group()))[: shape[0]]
        return out

    def __call__(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's shard of each full gradient, averaged over the ranks."""
        import torch.distributed._functional_collectives as fc

        group, world = self._group(), self.world_size
        pending = {}
        for name, g in grads.items():  # every collective in flight, then wait
            if g.dim() == 0:
                pending[name] = fc.all_reduce(g, "sum", group)
                continue
            rows = chunks(g.shape[0], world)
            padded = _pad_rows(g, rows[0][1] * world)
            pending[name] = (fc.reduce_scatter_single(padded, "sum", 0, group), rows[self.rank][1] - rows[self.rank][0])
        out = {}
        for name, value in pending.items():
            if isinstance(value, tuple):
                shard, rows = value
                out[name] = fc.wait_tensor(shard)[:rows] / world
            else:
                out[name] = fc.wait_tensor(value) / world
        return out

    def clip_by_global_norm(self, max_norm: float) -> Any:
        """``flo.clip_by_global_norm(max_norm)`` of the whole gradients, applied to this rank's
        shards: the squared norms of the shards are summed across ranks (0-d gradients, whole on
        every rank, count once)."""
        import torch.distributed._functional_collectives as fc

        from fnloop.optim import EmptyState, GradientTransformation
        from fnloop.optim import _foreach as fe
        from fnloop.optim.base import leaves_like

        world = self.world_size

        def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
            leaves = tree_leaves(updates)
            if not leaves:
                return updates, state
            squares = torch.stack(fe.norm(leaves)).square()
            whole = torch.tensor([x.dim() == 0 for x in leaves], device=squares.device)
            local = torch.where(whole, squares / world, squares).sum()
            norm = fc.wait_tensor(fc.all_reduce(local, "sum", self._group())).sqrt()
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            return leaves_like(updates, fe.mul(leaves, coef)), state

        return GradientTransformation(lambda params: EmptyState(), update)

    def overlapped(self, leaves: Mapping[str, torch.Tensor]) -> ShardedReducer:
        """The fast path's hook: the reduce-scatter runs after backward (:meth:`finish`)."""
        return self

    def finish(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self(grads)


@dataclasses.dataclass(frozen=True)
class FSDPStrategy:
    """Fully sharded data parallel: ``Trainer(strategy=FSDPStrategy(...))`` for options, or ``"fsdp"``.

    Attributes:
        process_group_backend: ``"gloo"`` or ``"nccl"``; default gloo on CPU, nccl on CUDA.
        timeout_s: how long a collective waits for the other ranks before failing.

    Example:
        >>> FSDPStrategy().backend(torch.device("cpu"))
        'gloo'
    """

    process_group_backend: str | None = None
    timeout_s: float = 300.0
    sharded = True

    def __post_init__(self) -> None:
        if self.process_group_backend not in (None, "gloo", "nccl"):
            raise ConfigError(
                f"FSDPStrategy(process_group_backend={self.process_group_backend!r}): accepted values are 'gloo', 'nccl' or None"
            )
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ConfigError(f"FSDPStrategy(timeout_s={self.timeout_s!r}): accepted values are a number of seconds > 0")

    def backend(self, device: torch.device) -> str:
        """The process group backend on ``device``."""
        return self.process_group_backend or ("nccl" if device.type == "cuda" else "gloo")

    def reducer(self, rank: int, world_size: int) -> ShardedReducer:
        """The train step's gather and reduce-scatter (``StepOptions.grad_reduce``)."""
        return ShardedReducer(rank, world_size)

    def setup_state(self, state: Any, parallel: Any) -> Any:
        """This rank's shard of ``state`` (DTensor leaves over the world's device mesh)."""
        if is_sharded(state):
            return state
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(parallel.device.type, (parallel.world_size,))
        return shard_state(state, mesh)
