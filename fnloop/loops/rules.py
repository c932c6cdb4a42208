"""Lightning's loop rules as pure functions of counters (no trainer, no state).

They decide when an optimizer step happens under gradient accumulation, when validation runs,
and when fit is done; tests pin them against tables computed by hand from Lightning's
documented behaviour.

Example:
    >>> val_check_batch(10, 0.5, check_val_every_n_epoch=1)
    5
    >>> should_validate(4, total_batch_idx=4, epoch=0, n_batches=10, check_batch=5, check_val_every_n_epoch=1)
    True
"""

from __future__ import annotations

import math

from fnloop.errors import ConfigError

__all__ = ["val_check_batch", "should_validate", "optimizer_steps_in", "is_optimizer_step", "fit_done", "can_stop_early"]


def val_check_batch(n_batches: int | None, val_check_interval: int | float, *, check_val_every_n_epoch: int | None) -> int | float:
    """Training batches between validation runs (``math.inf``: only at the end of the epoch).

    A float is a fraction of the epoch (``max(1, int(n * f))``); an int counts batches within
    the epoch, or across epochs when ``check_val_every_n_epoch`` is None.
    """
    if isinstance(val_check_interval, float):
        if n_batches is None:
            if val_check_interval != 1.0:
                raise ConfigError(
                    f"val_check_interval={val_check_interval} is a fraction of an epoch, but the train data has "
                    "no length; use an int number of batches"
                )
            return math.inf
        return max(1, int(n_batches * val_check_interval))
    if check_val_every_n_epoch is not None and n_batches is not None and val_check_interval > n_batches:
        raise ConfigError(
            f"val_check_interval={val_check_interval} is larger than the {n_batches} training batches of an epoch; "
            "lower it, or set check_val_every_n_epoch=None to count batches across epochs"
        )
    return val_check_interval


def should_validate(
    batch_idx: int,
    *,
    total_batch_idx: int,
    epoch: int,
    n_batches: int | None,
    check_batch: int | float,
    check_val_every_n_epoch: int | None,
) -> bool:
    """Whether validation runs after batch ``batch_idx`` (0-based, within ``epoch``)."""
    if check_val_every_n_epoch is not None and (epoch + 1) % check_val_every_n_epoch != 0:
        return False
    is_last = n_batches is not None and batch_idx + 1 == n_batches
    if check_batch == math.inf:
        return is_last
    current = total_batch_idx if check_val_every_n_epoch is None else batch_idx
    return (current + 1) % int(check_batch) == 0


def is_optimizer_step(batch_idx: int, *, n_batches: int | None, accumulate: int) -> bool:
    """Whether the batch ends an accumulation window (or is the last batch of the epoch)."""
    return (batch_idx + 1) % accumulate == 0 or (n_batches is not None and batch_idx + 1 == n_batches)


def optimizer_steps_in(n_batches: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of ``n_batches``: ``ceil(n / accumulate)``."""
    return math.ceil(n_batches / accumulate)


def can_stop_early(*, epoch: int, global_step: int, min_epochs: int | None, min_steps: int | None) -> bool:
    """Whether a requested stop may happen now (min_epochs and min_steps are met)."""
    return (min_epochs is None or epoch >= min_epochs) and (min_steps is None or global_step >= min_steps)


def fit_done(*, epoch: int, global_step: int, max_epochs: int, max_steps: int) -> bool:
    """Whether the epoch or step budget is spent (``max_steps=-1``: no step limit)."""
    return (max_steps != -1 and global_step >= max_steps) or (max_epochs != -1 and epoch >= max_epochs)
