"""Precision as a policy of the step (Lightning's ``precision`` flag and its meanings).

* ``"32-true"`` (default), ``"64-true"``, ``"bf16-true"``, ``"16-true"``: the params, buffers and
  optimizer state are cast to that dtype (:func:`cast_state`, done by the driver), and the step
  casts the batch's floating tensors to it.
* ``"bf16-mixed"``, ``"16-mixed"``: the forward runs under ``torch.autocast`` with fp32 master
  weights. ``16-mixed`` also scales the loss dynamically (:func:`loss_scale`): the scale and its
  growth counter are tensors carried in ``state.loop.options``, an overflowed update is skipped
  with ``torch.where`` (no host sync), and the scale follows ``torch.amp.GradScaler``'s trajectory.

Lightning's short names are accepted: ``32``, ``64``, ``16`` (``16-mixed``), ``"bf16"``
(``bf16-mixed``), ``"32"``, ``"64"``, ``"16"``.

Example:
    >>> from fnloop.connectors.precision import resolve_precision
    >>> resolve_precision(16), resolve_precision("bf16"), resolve_precision("64")
    ('16-mixed', 'bf16-mixed', '64-true')
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch

from fnloop.errors import ConfigError
from fnloop.optim import _foreach as fe
from fnloop.optim.base import GradientTransformation, from_apply, fused_apply, leaves_like
from fnloop.optim.wrappers import _select
from fnloop.tree import tree_leaves, tree_map

__all__ = [
    "PRECISIONS",
    "resolve_precision",
    "param_dtype",
    "autocast_dtype",
    "cast_state",
    "cast_batch",
    "autocast",
    "LossScaleState",
    "loss_scale",
]

PRECISIONS: tuple[str, ...] = ("32-true", "64-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed")
_ALIASES = {32: "32-true", "32": "32-true", 64: "64-true", "64": "64-true", 16: "16-mixed", "16": "16-mixed", "bf16": "bf16-mixed"}
_DTYPES = {"32": torch.float32, "64": torch.float64, "bf16": torch.bfloat16, "16": torch.float16}


def resolve_precision(value: Any, *, flag: str = "Trainer(precision") -> str:
    """The full name of a precision value (``16`` -> ``"16-mixed"``); a ConfigError naming the
    flag and the accepted values otherwise."""
    if isinstance(value, bool):
        value = None
    name = _ALIASES.get(value, value) if isinstance(value, (int, str)) else None
    if name not in PRECISIONS:
        accepted = ", ".join(repr(p) for p in (*PRECISIONS, *_ALIASES))
        raise ConfigError(f"{flag}={value!r}): accepted values are {accepted}")
    return name  # type: ignore[return-value]


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of the params (and optimizer state) under ``precision``: fp32 for ``*-mixed``."""
    return _DTYPES[precision.split("-")[0]] if precision.endswith("-true") else torch.float32


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``*-mixed``; None otherwise."""
    return _DTYPES[precision.split("-")[0]] if precision.endswith("-mixed") else None


def _cast(x: Any, dtype: torch.dtype) -> Any:
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype else x


def cast_state(state: Any, precision: str) -> Any:
    """``state`` with its floating params, buffers and optimizer state in ``precision``'s param
    dtype (``*-true``); the state itself for fp32 and ``*-mixed``. Counters and the key keep
    their dtypes; the tree is unchanged.

    Example:
        >>> s = fl.TrainState.create(torch.nn.Linear(2, 1), flo.adam(lr=0.1))
        >>> cast_state(s, "64-true").params["weight"].dtype
        torch.float64
    """
    dtype = param_dtype(precision)
    if dtype == torch.float32:
        return state
    return state.replace(
        params=tree_map(lambda x: _cast(x, dtype), state.params),
        buffers=tree_map(lambda x: _cast(x, dtype), state.buffers),
        opt_state=tree_map(lambda x: _cast(x, dtype) if x.dim() > 0 else x, state.opt_state),
    )


def cast_batch(batch: Any, precision: str | torch.dtype) -> Any:
    """The floating tensors of ``batch`` in the param dtype of a ``*-true`` precision other than
    fp32 (Lightning converts the inputs too), or in ``precision`` when it is a dtype; ``batch``
    itself otherwise."""
    dtype = precision if isinstance(precision, torch.dtype) else param_dtype(precision)
    if dtype == torch.float32:
        return batch
    return tree_map(lambda x: _cast(x, dtype), batch)


def autocast(precision: str, device: torch.device | None) -> Any:
    """``torch.autocast`` of a ``*-mixed`` precision on ``device``'s type; a null context otherwise."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type if device is not None else "cpu", dtype=dtype)


class LossScaleState(NamedTuple):
    """``scale``: the loss scale (fp32, 0-d); ``growth_tracker``: finite updates since the scale
    last changed (int32, 0-d), as in ``torch.amp.GradScaler``."""

    scale: torch.Tensor
    growth_tracker: torch.Tensor
    inner_state: Any


def loss_scale(
    inner: GradientTransformation,
    *,
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
) -> GradientTransformation:
    """Dynamic loss scaling around ``inner`` (``GradScaler``'s defaults and rules).

    The gradients it receives are those of ``loss * scale``: it multiplies them by
    ``1 / scale`` (computed as GradScaler does), applies ``inner`` when they are all finite and
    skips the update otherwise (``torch.where``, no host sync), then updates the scale: times
    ``backoff_factor`` after an overflow, times ``growth_factor`` after ``growth_interval``
    finite updates in a row.

    Example:
        >>> tx = loss_scale(flo.sgd(lr=0.1), init_scale=4.0)
        >>> p = {"w": torch.ones(1)}
        >>> new, s = fused_apply(tx)({"w": torch.full((1,), 4.0)}, tx.init(p), p)
        >>> new["w"], float(s.scale)
        (tensor([0.9000]), 4.0)
    """

    def init(params: Any) -> LossScaleState:
        leaves = tree_leaves(params)
        device = leaves[0].device if leaves else None
        return LossScaleState(
            torch.full((), init_scale, dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.int32, device=device),
            inner.init(params),
        )

    inner_apply = fused_apply(inner)

    def apply(grads: Any, state: LossScaleState, params: Any, *, donate: bool = False, consume: bool = False) -> tuple[Any, LossScaleState]:
        inv = state.scale.double().reciprocal().float()
        leaves = tree_leaves(grads)
        unscaled = leaves_like(grads, [g * inv.to(g.dtype) for g in leaves])
        finite = fe.all_finite(tree_leaves(unscaled))
        new_params, inner_state = inner_apply(unscaled, state.inner_state, params)
        successful = state.growth_tracker + 1
        grow = successful >= growth_interval
        scale = torch.where(finite, torch.where(grow, state.scale * growth_factor, state.scale), state.scale * backoff_factor)
        tracker = torch.where(finite & ~grow, successful, torch.zeros_like(successful))
        return _select(finite, new_params, params), LossScaleState(scale, tracker, _select(finite, inner_state, state.inner_state))

    return from_apply(init, apply)


def scale_of(state: Any) -> torch.Tensor | None:
    """The loss scale inside a wrapped optimizer state (the first :class:`LossScaleState` found)."""
    while state is not None:
        if isinstance(state, LossScaleState):
            return state.scale
        state = getattr(state, "inner_state", None)
    return None
