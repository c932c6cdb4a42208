"""Deterministic data order: seed mixing, epoch permutations, rank sharding, batch limits.

Every function here is pure: the order of an epoch is a function of
``(n, seed, epoch, shuffle, rank, world_size)`` only, so a resumed run sees the very same
batches as the run it continues, and the global torch RNG is never touched.

Example:
    >>> from fnloop.connectors.data_order import epoch_order, shard
    >>> order = epoch_order(10, seed=0, epoch=3, shuffle=True)
    >>> sorted(shard(order, rank=0, world_size=2).tolist() + shard(order, rank=1, world_size=2).tolist())
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from fnloop.errors import ConfigError

__all__ = ["mix_seed", "epoch_order", "shard", "limit_batches"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an int, got the bool {value!r}.")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{what} must be an int, got {type(value).__name__} {value!r}.") from None


def mix_seed(seed: int, *words: int) -> int:
    """Mix a seed with more integers into a 63-bit seed (splitmix64 finalizer, pure Python).

    The result is a non-negative int below ``2**63``, valid for ``torch.Generator.manual_seed``
    and for an int64 tensor. Negative inputs are taken modulo ``2**64``.

    Args:
        seed: the run seed.
        *words: values to mix in (epoch, rank, step...); order matters.

    Example:
        >>> mix_seed(0, 1) == mix_seed(0, 1) != mix_seed(0, 2)
        True
        >>> 0 <= mix_seed(42) < 2**63
        True
    """
    h = _splitmix64(_int(seed, "mix_seed: seed") & _MASK64)
    for i, word in enumerate(words):
        h = _splitmix64(h ^ (_int(word, f"mix_seed: word {i}") & _MASK64))
    return h >> 1


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The int64 order of ``range(n)`` for one epoch: a seeded permutation, or the identity.

    A pure function of its arguments: it draws from a local ``torch.Generator`` seeded with
    ``mix_seed(seed, epoch)`` and leaves the global RNG alone. The permutation comes from
    ``torch.randperm``, so it is stable for a given torch version.

    Args:
        n: number of samples.
        seed: the run seed.
        epoch: the epoch (each epoch gets a different permutation).
        shuffle: when False the order is ``arange(n)``.

    Example:
        >>> epoch_order(4, seed=0, epoch=0, shuffle=False)
        tensor([0, 1, 2, 3])
        >>> bool((epoch_order(50, seed=1, epoch=0, shuffle=True).sort().values == torch.arange(50)).all())
        True
    """
    n = _int(n, "epoch_order: n")
    if n < 0:
        raise ConfigError(f"epoch_order: n must be >= 0 (the number of samples), got {n}.")
    if not shuffle:
        return torch.arange(n, dtype=torch.int64)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mix_seed(seed, _int(epoch, "epoch_order: epoch")))
    return torch.randperm(n, generator=generator, dtype=torch.int64)


def shard(indices: torch.Tensor, *, rank: int, world_size: int, drop_last: bool = False) -> torch.Tensor:
    """The indices of one rank, with the same count on every rank (``DistributedSampler`` rule).

    With ``drop_last=False`` the indices are padded by wrapping around to the next multiple of
    ``world_size`` (a few samples are then seen twice in the epoch); with ``drop_last=True`` the
    tail is dropped to the previous multiple. Rank ``r`` takes ``indices[r::world_size]``, so
    the shards are disjoint apart from padding and together cover every index.

    Args:
        indices: 1-D tensor, the epoch order.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of processes.
        drop_last: drop the tail instead of padding.

    Example:
        >>> shard(torch.arange(5), rank=1, world_size=2)
        tensor([1, 3, 0])
        >>> shard(torch.arange(5), rank=1, world_size=2, drop_last=True)
        tensor([1, 3])
    """
    world_size = _int(world_size, "shard: world_size")
    rank = _int(rank, "shard: rank")
    if world_size < 1:
        raise ConfigError(f"shard: world_size must be >= 1, got {world_size}.")
    if not 0 <= rank < world_size:
        raise ConfigError(f"shard: rank must be in [0, {world_size}) for this world_size, got {rank}.")
    if indices.dim() != 1:
        raise ConfigError(f"shard: indices must be a 1-D tensor, got shape {tuple(indices.shape)}.")
    n = indices.numel()
    if drop_last:
        total = (n // world_size) * world_size
        indices = indices[:total]
    else:
        total = math.ceil(n / world_size) * world_size
        if total > n:
            indices = indices.repeat(math.ceil(total / n))[:total]
    return indices[rank:total:world_size]


def limit_batches(n_batches: int | None, limit: int | float | None, *, flag: str) -> int | None:
    """How many batches to run under a Lightning-style ``limit_*_batches`` flag.

    * int ``k >= 0``: ``min(n_batches, k)`` (``k`` when the length is unknown);
    * float in ``[0.0, 1.0]``: ``int(n_batches * limit)``, rounded down; as in Lightning, a
      non-zero fraction that rounds to 0 batches is an error (raise the fraction to at least
      ``1 / n_batches``), and with an unknown length only ``1.0`` is accepted;
    * a float above 1 with an integral value (``5.0``) counts as the int; ``None`` means 1.0.

    Args:
        n_batches: batches in the epoch, or None when unknown.
        limit: the flag's value.
        flag: the flag's name, used in error messages (``"limit_train_batches"``).

    Returns:
        The number of batches to run, or None for "all of an epoch of unknown length".

    Example:
        >>> limit_batches(10, 0.25, flag="limit_val_batches"), limit_batches(10, 3, flag="f")
        (2, 3)
        >>> limit_batches(None, 1.0, flag="limit_train_batches") is None
        True
    """
    bad = ConfigError(
        f"{flag}={limit!r} is not valid: use an int >= 0 (a number of batches) or a float in "
        "[0.0, 1.0] (a fraction of the batches)."
    )
    if limit is None:
        limit = 1.0
    if isinstance(limit, bool) or not isinstance(limit, numbers.Real):
        raise bad
    limit = int(limit) if isinstance(limit, numbers.Integral) else float(limit)
    if isinstance(limit, float) and limit > 1.0 and limit % 1.0 == 0.0:
        limit = int(limit)
    if isinstance(limit, int):
        if limit < 0:
            raise bad
        return limit if n_batches is None else min(n_batches, limit)
    if not 0.0 <= limit <= 1.0:
        raise bad
    if n_batches is None:
        if limit == 1.0:
            return None
        raise ConfigError(
            f"{flag}={limit!r}: the data has no known length (an iterable without __len__), so a "
            "fraction cannot be taken; use an int number of batches or 1.0."
        )
    if n_batches == 0:
        return 0
    count = int(n_batches * limit)
    if count == 0 and limit > 0.0:
        raise ConfigError(
            f"{flag}={limit!r} selects {limit} * {n_batches} < 1 batch; raise {flag} to at "
            f"least {1.0 / n_batches} or use an int number of batches."
        )
    return count
