"""Randomness derived from the state: ``state.rng`` folded with ``state.step``.

A step runs with the global torch generators seeded from ``fold(rng, step)``
(:func:`fnloop.execution.state_seed`) and restores them afterwards, so dropout is reproducible
and the caller's RNG stream is left as it was.

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
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["fold", "seeded", "seed_", "generator_states"]

_MASK = (1 << 64) - 1
# the global generators are process-wide: a seeded block holds them until it puts them back
_GENERATORS = threading.RLock()


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


def generator_states(cuda_devices: Sequence[int]) -> list[torch.Tensor]:
    """States of the CPU generator and those of ``cuda_devices``."""
    gens = [torch.default_generator] + [torch.cuda.default_generators[d] for d in cuda_devices]
    return [g.get_state() for g in gens]


def seed_(seed: int | None, cuda_devices: Sequence[int]) -> Callable[[], None]:
    """Seed the CPU generator (and those of ``cuda_devices``) in place; return the function that
    puts their previous states back (the context manager :func:`seeded` without its overhead).

    Until then no other thread can seed: threads stepping at once each draw from their own seed.
    """
    gens = [torch.default_generator] + [torch.cuda.default_generators[d] for d in cuda_devices]
    _GENERATORS.acquire()
    try:
        saved = [g.get_state() for g in gens]
        if seed is not None:
            for g in gens:
                g.manual_seed(seed)
    except BaseException:
        _GENERATORS.release()
        raise

    def restore() -> None:
        try:
            for g, s in zip(gens, saved):
                g.set_state(s)
        finally:
            _GENERATORS.release()

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
