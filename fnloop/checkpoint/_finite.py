"""Whether a checkpoint's tensors hold nan or inf: one fast reduction per tensor, exact.

A sum is the fastest one-pass reduction, and it is finite whenever the tensor is, but for an
overflow of large finite values; only tensors whose sum is not finite are looked at again, by
their min and max (a nan propagates to both).

Example:
    >>> import torch
    >>> big = torch.full((4,), torch.finfo(torch.float32).max)
    >>> non_finite({"params/big": big, "params/bad": torch.tensor([0.0, float("inf")])})
    ['params/bad']
"""

from __future__ import annotations

import torch

__all__ = ["non_finite"]


def non_finite(tensors: dict[str, torch.Tensor], limit: int = 5) -> list[str]:
    """Key paths (at most ``limit``) of the floating tensors holding nan or inf; ``buffers/``
    are left out (masks hold -inf on purpose).

    Example:
        >>> import torch
        >>> non_finite({"params/w": torch.tensor([1.0, float("nan")]), "buffers/m": torch.tensor([-float("inf")])})
        ['params/w']
    """
    local = ((p, t.to_local() if hasattr(t, "to_local") else t) for p, t in tensors.items())  # DTensor: this rank's shard
    checked = [
        (p, t) for p, t in local if (t.is_floating_point() or t.is_complex()) and not p.startswith("buffers/") and t.numel()
    ]
    sums = [_sum(t.detach()) for _, t in checked]  # finite exactly when the tensor is, but for an overflow
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for s in sums:
        by_device.setdefault(s.device, []).append(s if not s.is_complex() else torch.view_as_real(s).sum())
    if all(bool(torch.isfinite(torch.stack([s.double() for s in v])).all()) for v in by_device.values()):
        return []
    suspects = [(p, t) for (p, t), s in zip(checked, sums) if not bool(torch.isfinite(s))]
    return [p for p, t in suspects if not bool(torch.isfinite(torch.stack(_extremes(t.detach()))).all())][:limit]


def _sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` (float32 at least): a nan or an infinity makes it non-finite, and so can
    only an overflow (then :func:`_extremes` decides). The fastest one-pass reduction there is."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.sum(dtype=torch.float32)
    if t.is_floating_point() and t.element_size() < 2:  # float8: no sum kernel
        return t.float().sum()
    return t.sum()


def _extremes(t: torch.Tensor) -> list[torch.Tensor]:
    """Values of ``t`` that are finite exactly when all of ``t`` is: its min and max (one pass, no
    tensor-sized temporary; a nan propagates to both), as float64 0-d tensors."""
    flat = torch.view_as_real(t.resolve_conj()) if t.is_complex() else t  # no reshape: expanded views stay views
    try:
        low, high = torch.aminmax(flat)
    except (RuntimeError, NotImplementedError):  # a dtype without aminmax (float8): through float32
        low, high = torch.aminmax(flat.float())
    return [low.double(), high.double()]
