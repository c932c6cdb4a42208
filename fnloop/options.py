"""Options of a train step: gradient accumulation, gradient clipping and non-finite skipping.

The Trainer's flags of the same names become :class:`StepOptions`. They wrap the state's
optimizer inside the step only (``multi_steps(apply_if_finite(chain(clip, tx)), k)``, each layer
when asked for); what the wrappers carry between calls (the open accumulation window, skip
counters) lives in ``state.loop.options``, one leaf whatever the options. So ``state.tx`` and
``state.opt_state`` stay exactly what ``TrainState.create(module, tx)`` made, a checkpoint always
restores into that template, and a run resumes under other flags.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
    >>> step = fl.train_step(lambda m, b: m(b).square().mean(), accumulate_grad_batches=2, gradient_clip_val=1.0)
    >>> new, _ = step(state, torch.ones(4, 2))
    >>> fl.tree_structure(new) == fl.tree_structure(state), new.tx is state.tx
    (True, True)
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import optree
import torch

from fnloop.errors import ConfigError
from fnloop.optim import GradientTransformation, apply_if_finite, chain, clip, clip_by_global_norm, multi_steps
from fnloop.optim.wrappers import multi_steps_flush
from fnloop.state import OptionsState
from fnloop.tree import NAMESPACE

__all__ = ["StepOptions"]

_INNER = object()  # stands for the user's optimizer state inside the wrappers' state
_CLIP = ("norm", "value")


def _placeholder() -> GradientTransformation:
    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        raise AssertionError("placeholder transform is never applied")

    return GradientTransformation(lambda params: _INNER, update)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The optimizer-side options of a train step (Lightning's flag names and meanings).

    Attributes:
        accumulate_grad_batches: sum the gradients of this many calls and update on the last
            one with their mean (the other calls leave params and optimizer state unchanged).
        gradient_clip_val: clip the (accumulated) gradients to this global norm (or value).
        gradient_clip_algorithm: ``"norm"`` (default) or ``"value"``.
        skip_nonfinite: an update whose gradients hold a NaN or an infinity is skipped (no host sync).
    """

    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    skip_nonfinite: bool = False
    key: tuple[Any, ...] | None = dataclasses.field(init=False, repr=False, compare=False)
    """What identifies these options in ``state.loop.options``; ``None`` when none is on."""

    def __post_init__(self) -> None:
        k = self.accumulate_grad_batches
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ConfigError(f"accumulate_grad_batches={k!r}: accepted values are an int >= 1")
        c = self.gradient_clip_val
        if c is not None and (isinstance(c, bool) or not isinstance(c, numbers.Real) or not c >= 0):
            raise ConfigError(f"gradient_clip_val={c!r}: accepted values are a number >= 0 or None")
        if self.gradient_clip_algorithm not in (None, *_CLIP):
            raise ConfigError(f"gradient_clip_algorithm={self.gradient_clip_algorithm!r}: accepted values are 'norm', 'value' or None")
        if not isinstance(self.skip_nonfinite, bool):
            raise ConfigError(f"skip_nonfinite={self.skip_nonfinite!r}: accepted values are True or False")
        clip_val = float(c) if c else None
        key = (int(k), clip_val, self.gradient_clip_algorithm or "norm", self.skip_nonfinite)
        object.__setattr__(self, "key", None if key[0] == 1 and clip_val is None and not self.skip_nonfinite else key)
        object.__setattr__(self, "_specs", {})

    def wrap(self, tx: GradientTransformation) -> GradientTransformation:
        """``multi_steps(apply_if_finite(chain(clip, tx)), k)``, each layer only when asked for."""
        if self.gradient_clip_val:
            alg = self.gradient_clip_algorithm or "norm"
            tx = chain(clip_by_global_norm(self.gradient_clip_val) if alg == "norm" else clip(self.gradient_clip_val), tx)
        if self.skip_nonfinite:
            tx = apply_if_finite(tx)
        if self.accumulate_grad_batches > 1:
            tx = multi_steps(tx, self.accumulate_grad_batches)
        return tx

    def _spec(self, params: Any) -> optree.PyTreeSpec:
        """The wrappers' state structure with the user's optimizer state as one leaf (the last)."""
        pspec = optree.tree_structure(params, namespace=NAMESPACE)
        spec = self._specs.get(pspec)  # type: ignore[attr-defined]
        if spec is None:
            meta = pspec.unflatten([torch.empty_like(p, device="meta") for p in optree.tree_leaves(params, namespace=NAMESPACE)])
            wrapped = self.wrap(_placeholder()).init(meta)
            spec = self._specs[pspec] = optree.tree_structure(wrapped, is_leaf=lambda x: x is _INNER, namespace=NAMESPACE)  # type: ignore[attr-defined]
        return spec  # type: ignore[no-any-return]

    def carried(self, state_options: OptionsState) -> tuple[torch.Tensor, ...]:
        """The tensors these options carry in ``state.loop.options`` (none when other options, or
        none, wrote it: a window of other options is dropped)."""
        return state_options.tensors if state_options.key == self.key else ()

    def join(self, carried: tuple[torch.Tensor, ...], opt_state: Any, params: Any) -> Any:
        """The wrappers' state around ``opt_state``, from what :meth:`split` carried (or fresh)."""
        if carried:
            extras = list(carried)
        else:
            fresh = self.wrap(_placeholder()).init(params)
            extras = optree.tree_leaves(fresh, is_leaf=lambda x: x is _INNER, namespace=NAMESPACE)[:-1]
        return self._spec(params).unflatten([*extras, opt_state])

    def split(self, wrapped_state: Any, params: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
        """Inverse of :meth:`join`: ``(the tensors to carry, the user's optimizer state)``."""
        parts = self._spec(params).flatten_up_to(wrapped_state)
        return tuple(parts[:-1]), parts[-1]

    def flush(self, wrapped: GradientTransformation, wrapped_state: Any, params: Any) -> tuple[Any, Any]:
        """Apply a partial accumulation window now (Lightning updates at the end of an epoch whose
        batch count is not a multiple of ``accumulate_grad_batches``)."""
        if self.accumulate_grad_batches == 1:
            return params, wrapped_state
        return multi_steps_flush(wrapped, wrapped_state, params)
