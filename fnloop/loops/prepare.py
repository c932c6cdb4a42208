"""What a fit resolves before its first batch: the train step under the Trainer's step flags,
the fit's checkpoint callback, the state restored from ``ckpt_path``, and torch's deterministic
algorithms around the loop.

Example:
    >>> import torch, fnloop as fl
    >>> with deterministic(True):
    ...     torch.are_deterministic_algorithms_enabled()
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from fnloop.errors import ConfigError
from fnloop.loops.hooks import Hooks

if TYPE_CHECKING:
    from fnloop.loops.config import LoopConfig
    from fnloop.options import StepOptions
    from fnloop.types import StepFn

__all__ = ["with_flags", "checkpoint_of", "restore", "deterministic"]


def with_flags(train_step: StepFn, flags: StepOptions) -> StepFn:
    """The train step with the Trainer's flags as its options (see fnloop.options); a step built
    with its own optimizer options keeps them when the Trainer sets none.

    Example:
        >>> import fnloop as fl
        >>> from fnloop.options import StepOptions
        >>> step = fl.train_step(lambda model, batch: model(batch).sum())
        >>> with_flags(step, StepOptions()) is step, with_flags(step, StepOptions(2)).options.accumulate_grad_batches
        (True, 2)
    """
    own = getattr(train_step, "options", None)
    if own is not None and dataclasses.replace(flags, precision="32-true", grad_reduce=None).key is None:
        flags = dataclasses.replace(own, precision=flags.precision, grad_reduce=flags.grad_reduce)
    if own == flags or (own is None and flags == type(flags)()):
        return train_step
    if not hasattr(train_step, "with_options"):
        raise ConfigError(
            "Trainer(accumulate_grad_batches / gradient_clip_val / on_nonfinite='skip' / precision / strategy): these "
            f"flags need a step from fnloop.train_step, got {type(train_step).__name__}"
        )
    if own is not None and own.key is not None and dataclasses.replace(own, precision=flags.precision, grad_reduce=flags.grad_reduce) != flags:
        raise ConfigError(
            f"Trainer.fit: the train step was built with {own} but the Trainer flags ask for {flags}; set them in one place"
        )
    return train_step.with_options(flags)


def checkpoint_of(config: LoopConfig, checkpoint: Any) -> Any:
    """The ModelCheckpoint of this fit: from ``checkpoint=`` (a ModelCheckpoint, a manager or a
    URL) or the last one among the callbacks; ``enable_checkpointing`` decides when neither gives one.

    Example:
        >>> from fnloop.loops.config import LoopConfig
        >>> checkpoint_of(LoopConfig(), None) is None, checkpoint_of(LoopConfig(), "memory://doc/fit").manager.directory
        (True, 'memory://doc/fit')
    """
    from fnloop.checkpoint.callback import ModelCheckpoint, checkpoint_of_fit

    if checkpoint is None:
        found = [c for c in config.callbacks if isinstance(c, ModelCheckpoint)]
        chosen = found[-1] if found else None  # enable_checkpointing decides
    else:
        chosen = checkpoint if isinstance(checkpoint, ModelCheckpoint) else ModelCheckpoint(checkpoint)
    return checkpoint_of_fit(chosen, enable_checkpointing=config.enable_checkpointing, root_dir=config.checkpoint_root)


def restore(state: Any, ckpt_path: str | None, checkpoint: Any, hooks: Hooks) -> Any:
    """``state``, or the checkpoint at ``ckpt_path`` (``"last"``, ``"best"``, a URL; the first two
    through the fit's ModelCheckpoint ``checkpoint``) restored into it and handed to the
    callbacks' ``on_load_checkpoint`` with its metrics.

    Example:
        >>> restore("state", None, None, Hooks([]))
        'state'
    """
    if ckpt_path is None:
        return state
    from fnloop.checkpoint._read import read_meta
    from fnloop.checkpoint.callback import resume_from

    manager = checkpoint.manager if checkpoint is not None else None
    restored = resume_from(ckpt_path, state, manager)
    if restored is not state and hooks.wants("on_load_checkpoint"):
        url = manager.resolve(ckpt_path) if manager is not None else ckpt_path
        restored = hooks("on_load_checkpoint", restored, read_meta(url).get("metrics", {}))
    return restored


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside the block when ``enabled``."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
