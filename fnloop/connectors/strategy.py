"""Strategies (Lightning's ``strategy`` flag) and what a process of a distributed run holds.

* :class:`DDPStrategy`: data parallel over ``torch.distributed``. Its :class:`GradReducer`
  averages the gradients across ranks *inside* the train step, in a few bucketed all-reduces
  through torch's functional collectives (traceable by ``torch.compile``), so every rank holds
  bitwise the same params after every step.
* :class:`Parallel`: this process's rank, world size and device, with the few collectives the
  driver needs at its boundaries (metric reduction, stop agreement, broadcast of a value).

The sharded strategy, :class:`fnloop.connectors.fsdp.FSDPStrategy`, plugs in the same way: a
frozen config resolved by :func:`resolve_strategy` with ``backend(device)``,
``reducer(rank, world_size)`` (what the step does with the params and gradients) and
``setup_state(state, parallel)`` (what each rank holds).

Example:
    >>> resolve_strategy("ddp")
    DDPStrategy(bucket_cap_mb=25.0, process_group_backend=None, timeout_s=300.0)
    >>> Parallel().world_size, Parallel().reducer() is None
    (1, True)
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from fnloop.errors import ConfigError, StepError

__all__ = ["STRATEGIES", "DDPStrategy", "resolve_strategy", "GradReducer", "Parallel", "RankLostError"]

STRATEGIES: tuple[str, ...] = ("auto", "ddp", "fsdp")


class RankLostError(StepError):
    """A collective failed: another rank died, hung past the timeout or the network failed."""


@dataclasses.dataclass(frozen=True)
class DDPStrategy:
    """Data parallel training: ``Trainer(strategy=DDPStrategy(...))`` for options, or ``"ddp"``.

    Attributes:
        bucket_cap_mb: gradients are all-reduced in buckets of at most this size (as
            ``DistributedDataParallel``'s ``bucket_cap_mb``).
        process_group_backend: ``"gloo"`` or ``"nccl"``; default gloo on CPU, nccl on CUDA.
        timeout_s: how long a collective waits for the other ranks before failing.
    """

    bucket_cap_mb: float = 25.0
    process_group_backend: str | None = None
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if isinstance(self.bucket_cap_mb, bool) or not isinstance(self.bucket_cap_mb, numbers.Real) or not self.bucket_cap_mb > 0:
            raise ConfigError(f"DDPStrategy(bucket_cap_mb={self.bucket_cap_mb!r}): accepted values are a number > 0")
        if self.process_group_backend not in (None, "gloo", "nccl"):
            raise ConfigError(f"DDPStrategy(process_group_backend={self.process_group_backend!r}): accepted values are 'gloo', 'nccl' or None")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, numbers.Real) or not self.timeout_s > 0:
            raise ConfigError(f"DDPStrategy(timeout_s={self.timeout_s!r}): accepted values are a number of seconds > 0")

    # --- what a strategy gives the driver (a sharded strategy, FSDP2, implements the same three) ---

    def backend(self, device: torch.device) -> str:
        """The process group backend on ``device``."""
        return self.process_group_backend or ("nccl" if device.type == "cuda" else "gloo")

    def reducer(self, rank: int, world_size: int) -> GradReducer:
        """The train step's gradient reduction (``StepOptions.grad_reduce``)."""
        return GradReducer(rank, world_size, self.bucket_cap_mb)

    def setup_state(self, state: Any, parallel: Parallel) -> Any:
        """The state as this rank holds it: replicated whole under DDP (a sharded strategy
        returns its shard, e.g. DTensor leaves)."""
        return state


def resolve_strategy(strategy: Any) -> Any:
    """``None`` for ``"auto"`` (DDP when the run has several processes), a :class:`DDPStrategy`
    for ``"ddp"``, an :class:`~fnloop.connectors.fsdp.FSDPStrategy` for ``"fsdp"``, or the one
    given; a ConfigError naming the flag otherwise."""
    from fnloop.connectors.fsdp import FSDPStrategy

    if isinstance(strategy, (DDPStrategy, FSDPStrategy)):
        return strategy
    if strategy == "auto":
        return None
    if strategy == "ddp":
        return DDPStrategy()
    if strategy == "fsdp":
        return FSDPStrategy()
    raise ConfigError(
        f"Trainer(strategy={strategy!r}): accepted values are 'auto', 'ddp', 'fsdp' or a fnloop DDPStrategy(...) / FSDPStrategy(...)"
    )


def _buckets(grads: list[torch.Tensor], cap_bytes: float, first_cap_bytes: float = 2.0**20) -> list[list[int]]:
    """Indices of ``grads`` grouped into buckets of one dtype and at most ``cap_bytes``, from the
    last parameter to the first (the order backward produces them) with a smaller first bucket,
    as ``DistributedDataParallel`` groups them: communication starts early in the backward pass."""
    out: list[list[int]] = []
    size, dtype = 0.0, None
    for i in reversed(range(len(grads))):
        g = grads[i]
        nbytes = g.numel() * g.element_size()
        cap = min(first_cap_bytes, cap_bytes) if len(out) == 1 else cap_bytes
        if not out or g.dtype != dtype or size + nbytes > cap:
            out.append([])
            size, dtype = 0.0, g.dtype
        out[-1].append(i)
        size += nbytes
    return [b for b in out if b]


@dataclasses.dataclass(frozen=True)
class GradReducer:
    """``grads -> grads`` averaged across the ranks of a process group, in buckets: one flat
    all-reduce (sum, then a division by the world size) per bucket through
    ``torch.distributed._functional_collectives``, so eager calls and ``torch.compile`` traces
    run the same collectives. Every rank gets bitwise the same result.

    Attributes:
        rank: this process's rank (the step folds it into its seed: per-rank dropout masks).
        world_size: ranks in the group.
        bucket_cap_mb: the bucket size.
        group: the process group (default: the world).
    """

    rank: int
    world_size: int
    bucket_cap_mb: float = 25.0
    group: Any = dataclasses.field(default=None, compare=False)

    def __call__(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as fc

        group = self.group if self.group is not None else dist.group.WORLD
        names = list(grads)
        tensors = [grads[n] for n in names]
        out: list[torch.Tensor | None] = [None] * len(tensors)
        pending = []
        for bucket in _buckets(tensors, self.bucket_cap_mb * 2**20):  # all buckets in flight, then wait
            flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
            pending.append((bucket, fc.all_reduce(flat, "sum", group)))
        for bucket, reduced in pending:
            mean = reduced / self.world_size
            offset = 0
            for i in bucket:
                n = tensors[i].numel()
                out[i] = mean[offset : offset + n].view_as(tensors[i])
                offset += n
        return dict(zip(names, out))  # type: ignore[arg-type]

    def flats(self, layout: list[tuple[int, torch.dtype, torch.device]]) -> list[torch.Tensor]:
        """The flat buffers of buckets of these ``(numel, dtype, device)``: allocated once and
        reused by every step (as DDP's reducer keeps its buckets), so no step pays for fresh
        memory. A step's averaged gradients are views of them until the next step."""
        cache = self.__dict__.setdefault("_flats", {})
        key = tuple(layout)
        if key not in cache:
            cache.clear()  # one layout at a time: the model's
            cache[key] = [torch.empty(n, dtype=dtype, device=device) for n, dtype, device in layout]
        return cache[key]  # type: ignore[no-any-return]

    def overlapped(self, leaves: Mapping[str, torch.Tensor]) -> _Overlap:
        """The same reduction started during the backward pass (as ``DistributedDataParallel``
        does): each bucket's all-reduce is launched as soon as autograd has produced its
        gradients, through hooks on ``leaves`` (the tensors being differentiated). Eager only;
        :meth:`_Overlap.finish` gives bitwise what ``self(grads)`` gives (same buckets, same sums)."""
        return _Overlap(self, leaves)


class _Overlap:
    """Buckets of one backward pass: each gradient is copied into its bucket's flat buffer as soon
    as autograd produces it (overlapping the rest of the backward pass, as DDP's reducer does),
    and a bucket's all-reduce starts when its last gradient lands."""

    def __init__(self, reducer: GradReducer, leaves: Mapping[str, torch.Tensor]) -> None:
        import torch.distributed as dist

        self.reducer = reducer
        self.group = reducer.group if reducer.group is not None else dist.group.WORLD
        tensors = list(leaves.values())
        self.buckets = _buckets(tensors, reducer.bucket_cap_mb * 2**20)
        self.where: dict[int, tuple[int, int, int]] = {}  # leaf -> (bucket, offset, numel)
        sizes = []
        for b, bucket in enumerate(self.buckets):
            offset = 0
            for i in bucket:
                self.where[i] = (b, offset, tensors[i].numel())
                offset += tensors[i].numel()
            sizes.append(offset)
        self.flats = reducer.flats([(n, tensors[bucket[0]].dtype, tensors[bucket[0]].device) for n, bucket in zip(sizes, self.buckets)])
        self.waiting = [len(bucket) for bucket in self.buckets]
        self.seen = [False] * len(tensors)
        self.launched: dict[int, Any] = {}
        for i, t in enumerate(tensors):
            t.register_hook(lambda g, i=i: self._ready(i, g))

    def _put(self, i: int, grad: torch.Tensor) -> None:
        b, offset, n = self.where[i]
        self.flats[b][offset : offset + n].copy_(grad.reshape(-1))
        self.seen[i] = True
        self.waiting[b] -= 1
        if self.waiting[b] == 0:
            import torch.distributed as dist

            self.launched[b] = dist.all_reduce(self.flats[b], group=self.group, async_op=True)

    def _ready(self, i: int, grad: torch.Tensor) -> None:
        if not self.seen[i]:
            self._put(i, grad)

    def finish(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The averaged ``grads`` (those no hook saw, unused parameters' zeros, join late)."""
        names = list(grads)
        for i, name in enumerate(names):
            if not self.seen[i]:
                self._put(i, grads[name])
        out: list[torch.Tensor | None] = [None] * len(names)
        for b, bucket in enumerate(self.buckets):
            self.launched[b].wait()
            mean = self.flats[b].div_(self.reducer.world_size)  # our own buffer: the same values as flat / world_size
            for i in bucket:
                _, offset, n = self.where[i]
                out[i] = mean[offset : offset + n].view_as(grads[names[i]])
        return dict(zip(names, out))  # type: ignore[arg-type]


def _failed(rank: int, world: int, what: str, err: BaseException) -> RankLostError:
    others = [r for r in range(world) if r != rank]
    lost = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others}"
    return RankLostError(
        f"rank {rank}: lost {lost} during {what} (it died, hung past the strategy's timeout_s, or the network "
        f"failed): {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class Parallel:
    """This process in a run: rank, world size, device and strategy; the driver's collectives.

    ``Parallel()`` is the single-process run: every method is then a no-op.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: Any = None  # a DDPStrategy or an FSDPStrategy

    @property
    def is_global_zero(self) -> bool:
        """Rank 0 performs the run's effects (logs, checkpoints, prints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """The state is sharded across ranks (FSDP): every rank takes part in checkpoints."""
        return self.distributed and getattr(self.strategy, "sharded", False)

    def reducer(self) -> GradReducer | None:
        """The train step's gradient reduction (None in a single-process run)."""
        if not self.distributed:
            return None
        return (self.strategy or DDPStrategy()).reducer(self.rank, self.world_size)

    def _all_reduce(self, tensor: torch.Tensor, op: Any, what: str) -> torch.Tensor:
        import torch.distributed as dist

        try:
            dist.all_reduce(tensor, op=op)
        except Exception as err:  # gloo/nccl raise RuntimeError subclasses when a peer is gone
            raise _failed(self.rank, self.world_size, what, err) from err
        return tensor

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag ORed over the ranks (one small all-reduce): the ranks decide together at a
        step boundary, so they all stop at the same step."""
        if not self.distributed:
            return tuple(bool(f) for f in flags)
        import torch.distributed as dist

        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.device)
        return tuple(bool(v) for v in self._all_reduce(t, dist.ReduceOp.MAX, "a stop agreement").tolist())

    def reduce_metrics(self, values: Mapping[str, float], weight: float) -> dict[str, float]:
        """Metrics of every rank combined: means weighted by ``weight`` (this rank's samples);
        names ending in ``_sum`` summed, ``_max``/``_min`` reduced accordingly. Every rank must
        pass the same names."""
        if not self.distributed or not values:
            return dict(values)
        import torch.distributed as dist

        keys = sorted(values)
        bases = [k.rsplit("/member_", 1)[0] for k in keys]  # a stacked run's member values reduce as their metric
        kinds = ["max" if k.endswith("_max") else "min" if k.endswith("_min") else "sum" if k.endswith("_sum") else "mean" for k in bases]
        vals = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        summed = torch.cat([torch.where(torch.tensor([k == "mean" for k in kinds]), vals * weight, vals), torch.tensor([float(weight)], dtype=torch.float64)])
        summed = self._all_reduce(summed.to(self.device), dist.ReduceOp.SUM, "a metric reduction").cpu()
        out = {}
        for i, (k, kind) in enumerate(zip(keys, kinds)):
            out[k] = summed[i].item() / summed[-1].item() if kind == "mean" else summed[i].item()
        for kind, op in (("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
            idx = [i for i, x in enumerate(kinds) if x == kind]
            if idx:
                red = self._all_reduce(vals[idx].to(self.device), op, "a metric reduction").cpu().tolist()
                out.update({keys[i]: v for i, v in zip(idx, red)})
        return {k: out[k] for k in values}

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        try:
            dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        except Exception as err:
            raise _failed(self.rank, self.world_size, "a broadcast", err) from err
        return box[0]
