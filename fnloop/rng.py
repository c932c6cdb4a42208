"""Randomness derived from the state: ``state.rng`` folded with ``state.step``.

A step runs with the global torch generators seeded from ``(rng, step)`` and restores them
afterwards, so dropout is reproducible and the caller's RNG stream is left as it was.

Example:
    >>> import torch, fnloop as fl
    >>> before = torch.get_rng_state()
    >>> with fl.rng.seeded(fl.rng.fold(7, 3), []):
    ...     a = torch.rand(1)
    >>> with fl.rng.seeded(fl.rng.fold(7, 3), []):
    ...     b = torch.rand(1)
    >>> bool(a == b) and bool((torch.get_rng_state() == before).all())
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["fold", "seeded", "seed_", "state_seed", "SeedCache", "generator_states"]

_MASK = (1 << 64) - 1
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def fold(key: int, *data: int) -> int:
    """Fold integers into a key: a deterministic 63-bit mix (splitmix64).

    Example:
        >>> import fnloop as fl
        >>> fl.rng.fold(0, 1) != fl.rng.fold(0, 2)
        True
    """
    x = key & _MASK
    for d in data:
        x = _splitmix64(x ^ _splitmix64(d & _MASK))
    return x >> 1


def state_seed(rng: torch.Tensor, step: torch.Tensor) -> int | None:
    """The seed of a step, or None under ``torch.func`` transforms (``vmap``'s ``randomness``
    argument then decides) and while compiling (the seed is set outside the compiled region)."""
    if _traced(rng, step):
        return None
    return fold(int(rng), int(step))


def _traced(rng: torch.Tensor, step: torch.Tensor) -> bool:
    """Compiling, or under ``torch.func`` transforms: no seed from the host side."""
    return torch.compiler.is_compiling() or _is_wrapped(rng) or _is_wrapped(step)


class SeedCache:
    """:func:`state_seed` that remembers the Python ints of the key and step tensors it last saw.

    Each ``int(tensor)`` is a host read, slow right after the numeric work of a step. Between
    the steps of a loop the key is the same tensor object and the step is the tensor the
    previous call produced (:meth:`advance`), so neither needs reading; a tensor is recognised by
    identity and version counter, so one changed in place is read again.
    """

    __slots__ = ("_key", "_step")

    def __init__(self) -> None:
        self._key: tuple[Any, int, int] = (None, -1, 0)
        self._step: tuple[Any, int, int] = (None, -1, 0)

    @staticmethod
    def _int(x: torch.Tensor, known: tuple[Any, int, int]) -> tuple[Any, int, int]:
        if known[0] is x and known[1] == x._version:
            return known
        return (x, x._version, int(x))

    def __call__(self, rng: torch.Tensor, step: torch.Tensor) -> int | None:
        if _traced(rng, step):
            return None
        self._key = self._int(rng, self._key)
        self._step = self._int(step, self._step)
        return fold(self._key[2], self._step[2])

    def advance(self, step: torch.Tensor, new_step: torch.Tensor) -> None:
        """``new_step`` holds ``step + 1``; remembered when ``step`` is the step last seen."""
        if self._step[0] is step and self._step[1] == step._version:
            self._step = (new_step, new_step._version, self._step[2] + 1)


def generator_states(cuda_devices: Sequence[int]) -> list[torch.Tensor]:
    """States of the CPU generator and those of ``cuda_devices``."""
    gens = [torch.default_generator] + [torch.cuda.default_generators[d] for d in cuda_devices]
    return [g.get_state() for g in gens]


def seed_(seed: int | None, cuda_devices: Sequence[int]) -> Callable[[], None]:
    """Seed the CPU generator (and those of ``cuda_devices``) in place; return the function that
    puts their previous states back (the context manager :func:`seeded` without its overhead)."""
    gens = [torch.default_generator] + [torch.cuda.default_generators[d] for d in cuda_devices]
    saved = [g.get_state() for g in gens]
    if seed is not None:
        for g in gens:
            g.manual_seed(seed)

    def restore() -> None:
        for g, s in zip(gens, saved):
            g.set_state(s)

    return restore


@contextlib.contextmanager
def seeded(seed: int | None, cuda_devices: Sequence[int]) -> Iterator[None]:
    """Seed the CPU generator (and those of ``cuda_devices``) inside the block; restore after.

    Example:
        >>> import torch, fnloop as fl
        >>> with fl.rng.seeded(1, []):
        ...     x = torch.rand(2)
    """
    restore = seed_(seed, cuda_devices)
    try:
        yield
    finally:
        restore()
