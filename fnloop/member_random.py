"""Per-member randomness inside ``torch.func.vmap``: member i draws what state i draws alone.

A step run alone seeds the global generators from ``fold(state.rng, state.step)`` and its random
functions (dropout, ``torch.rand``...) draw from them. Under :func:`fnloop.vmap` the numerics are
one batched computation, but the random tensors are not: :class:`MemberRandom`, a
``TorchFunctionMode`` entered inside the vmapped function, catches each random function, draws
the per-member tensor N times, each from that member's own stream (:class:`Streams`, the global
generator seeded like the member's own step and advanced only by its draws), stacks them and
hands the stack to the batched computation. So the random values are bitwise those of the
member's own run; everything else is vectorized.

Dropout draws its mask by calling the same function on ones (``dropout(ones) == mask / (1 - p)``,
with the arithmetic of the member's own call), then multiplies: ``x * mask / (1 - p)`` exactly as
the solo step does. For the compiled path the draws of a call are made before the compiled
region and replayed inside it (``replay``), in the order they were recorded.

Random functions whose values depend on tensor inputs (``torch.bernoulli(probs)``,
``torch.multinomial``, ``torch.normal(mean_tensor, ...)``) are not split: vmap's
``randomness="error"`` then raises, rather than draw the same or unrelated values.

Example:
    >>> import torch
    >>> streams = Streams([3, 4])
    >>> a = streams.run(0, torch.device("cpu"), lambda: torch.rand(2))
    >>> torch.manual_seed(3) is not None and torch.equal(a, torch.rand(2))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fnloop.errors import StepError

__all__ = ["Streams", "MemberRandom", "Draw"]

_functorch = torch._C._functorch

# functions that create a random tensor from sizes and numbers only
_FACTORIES = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal}
# functions of a tensor whose random values depend only on its shape, dtype and device
_LIKE = {torch.rand_like, torch.randn_like, torch.randint_like, torch.bernoulli}
# in-place random fills
_FILLS = {
    torch.Tensor.bernoulli_,
    torch.Tensor.uniform_,
    torch.Tensor.normal_,
    torch.Tensor.random_,
    torch.Tensor.exponential_,
    torch.Tensor.geometric_,
    torch.Tensor.log_normal_,
    torch.Tensor.cauchy_,
}
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}


class Streams:
    """Member i's random stream: the global generator of a device seeded with ``seeds[i]`` (as
    the member's own step seeds it) and advanced by that member's draws only."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = list(seeds)
        self.states: list[dict[Any, torch.Tensor]] = [{} for _ in self.seeds]

    def run(self, i: int, device: torch.device, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``draw()`` with the generator of ``device`` in member i's state; the generator is put
        back after (the caller holds :data:`fnloop.rng._GENERATORS`)."""
        if device.type == "cuda":
            gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        else:
            gen = torch.default_generator
        saved = gen.get_state()
        known = self.states[i].get(device)
        if known is None:
            gen.manual_seed(self.seeds[i])
        else:
            gen.set_state(known)
        try:
            return draw()
        finally:
            self.states[i][device] = gen.get_state()
            gen.set_state(saved)

    def draw_all(self, draw: Draw) -> torch.Tensor:
        """``[N, *shape]``: ``draw`` made by every member from its own stream."""
        with _functorch_off():
            return torch.stack([self.run(i, draw.device, draw.fn) for i in range(len(self.seeds))])


def _functorch_off() -> Any:
    return torch._C._DisableFuncTorch()


class Draw:
    """One random draw of a step: ``fn()`` makes a member's tensor (on ``device``); ``use(noise)``
    turns the batched tensor of all members' draws into what the random function returns."""

    __slots__ = ("func", "fn", "device", "use")

    def __init__(self, func: Any, fn: Callable[[], torch.Tensor], device: torch.device, use: Callable[[torch.Tensor], Any]):
        self.func, self.fn, self.device, self.use = func, fn, device, use


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _has_tensor(values: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in values)


def _blank(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    shape, dtype, device = tuple(x.shape), x.dtype, x.device
    return lambda: torch.empty(shape, dtype=dtype, device=device)


def plan(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Draw | None:
    """How to draw ``func(*args, **kwargs)`` per member; None when it draws nothing or is not split."""
    if kwargs.get("generator") is not None:
        return None  # the caller's own generator: not the state's randomness
    if func in _DROPOUTS:
        x, p = args[0], _arg(args, kwargs, 1, "p", 0.5)
        training, inplace = _arg(args, kwargs, 2, "training", True), _arg(args, kwargs, 3, "inplace", False)
        if not training or p == 0 or isinstance(p, torch.Tensor):
            return None
        ones = _blank(x)
        return Draw(func, lambda: func(ones().fill_(1), p, True), x.device, lambda m: x.mul_(m) if inplace else x * m)
    if func in _FACTORIES:
        if _has_tensor(args) or _has_tensor(kwargs.values()):
            return None
        device = torch.device(kwargs["device"]) if kwargs.get("device") is not None else torch.get_default_device()
        return Draw(func, lambda: func(*args, **kwargs), device, lambda m: m)
    if func in _LIKE or func in _FILLS:
        x, rest = args[0], args[1:]
        if _has_tensor(rest) or _has_tensor(kwargs.values()) or (func is torch.bernoulli and _arg(args, kwargs, 1, "p", None) is None):
            return None
        blank = _blank(x)
        use = (lambda m: _fill(x, m)) if func in _FILLS else (lambda m: m)
        return Draw(func, lambda: func(blank(), *rest, **kwargs), x.device, use)
    return None


def _fill(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    if _functorch.maybe_get_level(x) < 0:
        raise StepError(
            "fl.vmap: an in-place random fill of a tensor that is the same for every member (made by torch.empty "
            "inside the step); make it from a member's tensor (torch.empty_like(x)) or use torch.rand/randn"
        )
    return x.copy_(noise)


class MemberRandom(TorchFunctionMode):
    """Entered inside ``torch.func.vmap`` at ``level``: random functions draw per member from
    ``streams`` (eager), or take the next tensor of ``replay`` (the compiled path, whose draws
    were made outside). Every draw is appended to ``record``."""

    def __init__(self, level: int | None, streams: Streams | None = None, replay: Sequence[torch.Tensor] | None = None):
        super().__init__()
        self.level = level
        self.streams = streams
        self.replay = replay
        self.record: list[Draw] = []
        self.replayed = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in _SPLIT:
            return func(*args, **kwargs)
        draw = plan(func, args, kwargs)
        if draw is None:
            return func(*args, **kwargs)
        if self.replay is not None:  # nothing recorded: a traced graph returns no Python objects
            k = self.replayed
            if k >= len(self.replay):
                raise StepError(f"fl.vmap: the compiled step drew more random tensors than when it was recorded ({func.__name__})")
            self.replayed = k + 1
            return draw.use(self.replay[k])
        assert self.streams is not None and self.level is not None
        self.record.append(draw)
        return draw.use(_functorch._add_batch_dim(self.streams.draw_all(draw), 0, self.level))


_SPLIT = _FACTORIES | _LIKE | _FILLS | _DROPOUTS
