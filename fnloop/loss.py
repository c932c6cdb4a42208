"""The contract of a loss function: ``loss_fn(model, batch) -> loss | (loss, {"name": tensor})``.

Example:
    >>> import torch
    >>> loss, aux = split_loss((torch.tensor(1.0), {"acc": torch.tensor(0.5)}), "train_step")
    >>> float(loss), sorted(aux)
    (1.0, ['acc'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fnloop.errors import StepError

__all__ = ["split_loss"]


def split_loss(out: Any, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, aux metrics)`` of what a loss function returned; ``name`` names the step in errors.

    Example:
        >>> import torch
        >>> split_loss(torch.tensor(2.0), "train_step")
        (tensor(2.), {})
    """
    aux: dict[str, torch.Tensor] = {}
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise StepError(f"{name}: loss_fn must return a loss or (loss, {{'metric': tensor, ...}}), got a tuple of {len(out)}")
        out, aux = out[0], dict(out[1])
    if not isinstance(out, torch.Tensor) or out.ndim != 0 or not out.is_floating_point():
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise StepError(f"{name}: loss_fn must return a scalar (0-d) floating-point tensor, got {shape}; reduce it with .mean()")
    return out, aux
