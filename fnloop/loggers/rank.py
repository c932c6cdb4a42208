"""The global rank of this process, read once per call from the launcher's environment.

Only the process of global rank 0 writes logs; every sink asks :func:`is_global_zero`
before it creates a folder or a file.

Example:
    >>> from fnloop.loggers.rank import global_rank
    >>> global_rank() >= 0
    True
"""

from __future__ import annotations

import os

from fnloop.errors import ConfigError

__all__ = ["RANK_ENV_VARS", "global_rank", "is_global_zero"]

RANK_ENV_VARS: tuple[str, ...] = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK")
"""Environment variables holding the rank, in the order they are read: torchrun, SLURM, LSF,
then the node-local rank as a last resort (equal to the global rank on one node)."""


def global_rank() -> int:
    """The global rank of this process; 0 when no launcher set one.

    ``torch.distributed`` wins when a process group is initialized; otherwise the first of
    :data:`RANK_ENV_VARS` that is set gives the rank.

    Returns:
        The rank, an int >= 0.

    Raises:
        ConfigError: a rank variable holds something other than a non-negative integer.

    Example:
        >>> import os
        >>> os.environ.get("RANK") is not None or global_rank() == 0
        True
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in RANK_ENV_VARS:
        raw = os.environ.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            rank = int(raw)
        except ValueError:
            rank = -1
        if rank < 0:
            raise ConfigError(
                f"environment variable {var}={raw!r} is not a rank: set it to a non-negative "
                "integer (the launcher normally does) or unset it"
            )
        return rank
    return 0


def is_global_zero() -> bool:
    """Whether this process is global rank 0, the only one that writes logs.

    Example:
        >>> isinstance(is_global_zero(), bool)
        True
    """
    return global_rank() == 0
