"""Fold the Trainer's optimizer flags (accumulation, clipping, non-finite skipping) into the
state's optimizer, keeping the user's optimizer state as the innermost part.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> s = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
    >>> p = prepare_state(s, accumulate=2, clip_val=1.0, clip_algorithm="norm", skip_nonfinite=False)
    >>> type(p.opt_state).__name__
    'MultiStepsState'
"""

from __future__ import annotations

from typing import Any, NamedTuple

from fnloop.errors import ConfigError
from fnloop.optim import apply_if_finite, chain, clip, clip_by_global_norm, multi_steps

__all__ = ["PreparedTx", "prepare_state", "unprepare_state"]


class PreparedTx(NamedTuple):
    """The user's optimizer ``base`` wrapped for the Trainer flags in ``key``."""

    init: Any
    update: Any
    base: Any
    key: tuple[int, float | None, str, bool]
    fused: Any = None


def unprepare_state(state: Any) -> Any:
    """The state with the user's own optimizer and optimizer state back."""
    tx = state.tx
    if not isinstance(tx, PreparedTx):
        return state
    accumulate, clip_val, _, skip = tx.key
    s = state.opt_state
    if accumulate > 1:
        s = s.inner_state
    if skip:
        s = s.inner_state
    if clip_val:
        s = s[1]
    return state.replace(tx=tx.base, opt_state=s)


def prepare_state(state: Any, *, accumulate: int, clip_val: float | None, clip_algorithm: str | None, skip_nonfinite: bool) -> Any:
    """The state with its optimizer wrapped as ``multi_steps(apply_if_finite(chain(clip, tx)), k)``
    (each layer only when its flag asks for it); idempotent for the same flags."""
    key = (accumulate, clip_val or None, clip_algorithm or "norm", skip_nonfinite)
    if isinstance(state.tx, PreparedTx):
        if state.tx.key == key:
            return state
        state = unprepare_state(state)
    if key == (1, None, key[2], False):
        return state
    base, tx, opt_state, params = state.tx, state.tx, state.opt_state, state.params
    if clip_val:
        clipper = clip_by_global_norm(clip_val) if key[2] == "norm" else clip(clip_val)
        tx = chain(clipper, tx)
        opt_state = (clipper.init(params), opt_state)
    if skip_nonfinite:
        tx = apply_if_finite(tx)
        opt_state = _wrap_init(tx, params, opt_state)
    if accumulate > 1:
        tx = multi_steps(tx, accumulate)
        opt_state = _wrap_init(tx, params, opt_state)
    if tx.fused is None:
        raise ConfigError("internal: prepared optimizer lost its fused apply")
    return state.replace(tx=PreparedTx(tx.init, tx.update, base, key, tx.fused), opt_state=opt_state)


def _wrap_init(tx: Any, params: Any, inner_state: Any) -> Any:
    """``tx.init(params)`` with its ``inner_state`` replaced by the existing one (no re-init)."""
    return tx.init(params)._replace(inner_state=inner_state)
