"""Options of a train step: gradient accumulation, gradient clipping, non-finite skipping,
precision (:mod:`fnloop.connectors.precision`) and the cross-rank gradient reduction of a
distributed strategy (:mod:`fnloop.connectors.strategy`).

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
from typing import Any, NamedTuple

import optree
import torch
import torch.utils._pytree as torch_pytree

from fnloop import rng as _rng
from fnloop.connectors.precision import autocast, cast_batch, loss_scale, resolve_precision, scale_of
from fnloop.errors import ConfigError
from fnloop.optim import GradientTransformation, apply_if_finite, chain, clip, clip_by_global_norm, multi_steps
from fnloop.optim.wrappers import multi_steps_flush
from fnloop.state import OptionsState
from fnloop.tree import NAMESPACE

__all__ = ["StepOptions"]

_INNER = object()  # stands for the user's optimizer state inside the wrappers' state
_CLIP = ("norm", "value")


class _Specs(NamedTuple):
    """The wrappers' state structure: optree's spec (eager), and torch's pytree spec with
    ``order[i]``, the optree leaf index of torch's leaf ``i`` (None: a None torch keeps as a leaf)."""

    tree: optree.PyTreeSpec
    order: list[Any]
    torch_spec: Any


def _flatten_up_to(spec: Any, tree: Any) -> list[Any]:
    if spec.is_leaf():
        return [tree]
    children, _ = torch_pytree.SUPPORTED_NODES[torch_pytree._get_node_type(tree)].flatten_fn(tree)
    return [leaf for child, child_spec in zip(children, spec.children()) for leaf in _flatten_up_to(child_spec, child)]


def _traced_split(spec: _Specs, wrapped_state: Any) -> list[Any]:
    """``spec.tree.flatten_up_to(wrapped_state)`` in a form dynamo traces."""
    parts: list[Any] = [None] * spec.tree.num_leaves
    for i, leaf in zip(spec.order, _flatten_up_to(spec.torch_spec, wrapped_state)):
        if i is not None:
            parts[i] = leaf
    return parts


def _traced_join(spec: _Specs, carried: tuple[torch.Tensor, ...], fresh: Any, opt_state: Any) -> Any:
    """:meth:`StepOptions.join` in a form dynamo traces."""
    leaves = [*carried, opt_state] if carried else [*_traced_split(spec, fresh)[:-1], opt_state]
    return torch_pytree.tree_unflatten([None if i is None else leaves[i] for i in spec.order], spec.torch_spec)


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
        precision: Lightning's precision name (see :mod:`fnloop.connectors.precision`): autocast
            for ``*-mixed``, dynamic loss scaling for ``16-mixed``, batch cast for ``*-true``.
        grad_reduce: ``grads -> grads`` averaged across ranks (a strategy's reducer, e.g.
            :class:`fnloop.connectors.strategy.GradReducer`); it also folds its ``rank`` into the
            step's seed, so each rank draws its own dropout masks.
    """

    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    skip_nonfinite: bool = False
    precision: str = "32-true"
    grad_reduce: Any = None
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
        object.__setattr__(self, "precision", resolve_precision(self.precision, flag="StepOptions(precision"))
        clip_val = float(self.gradient_clip_val) if self.gradient_clip_val else None
        key = (int(self.accumulate_grad_batches), clip_val, self.gradient_clip_algorithm or "norm", self.skip_nonfinite)
        if self.precision == "16-mixed":
            key = (*key, "16-mixed")  # the loss scale and its growth counter are carried
        elif key[0] == 1 and clip_val is None and not self.skip_nonfinite:
            key = None
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "_specs", {})

    def wrap(self, tx: GradientTransformation) -> GradientTransformation:
        """``multi_steps(loss_scale(apply_if_finite(chain(clip, tx))), k)``, each layer only when
        asked for (``loss_scale`` under ``16-mixed``: accumulated scaled gradients are unscaled,
        checked and clipped once per optimizer step, as with ``GradScaler``)."""
        if self.gradient_clip_val:
            alg = self.gradient_clip_algorithm or "norm"
            tx = chain(clip_by_global_norm(self.gradient_clip_val) if alg == "norm" else clip(self.gradient_clip_val), tx)
        if self.skip_nonfinite:
            tx = apply_if_finite(tx)
        if self.precision == "16-mixed":
            tx = loss_scale(tx)
        if self.accumulate_grad_batches > 1:
            tx = multi_steps(tx, self.accumulate_grad_batches)
        return tx

    def spec_of(self, params: Any) -> _Specs | None:
        """The wrappers' state structure over ``params`` (None when no option carries anything),
        also as torch's pytree spec, which a compiled core can trace."""
        if not self.key:
            return None
        tree = self._spec(params)
        order, torch_spec = torch_pytree.tree_flatten(tree.unflatten(range(tree.num_leaves)))
        return _Specs(tree, order, torch_spec)

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

    def join(self, carried: tuple[torch.Tensor, ...], opt_state: Any, params: Any, spec: Any = None) -> Any:
        """The wrappers' state around ``opt_state``, from what :meth:`split` carried (or fresh);
        ``spec``: :meth:`spec_of` the params, computed ahead (a compiled core cannot hash it)."""
        if torch.compiler.is_compiling():  # optree's specs are opaque to dynamo: torch's pytree instead
            return _traced_join(spec, carried, self.wrap(_placeholder()).init(params), opt_state)
        if carried:
            extras = list(carried)
        else:
            fresh = self.wrap(_placeholder()).init(params)
            extras = optree.tree_leaves(fresh, is_leaf=lambda x: x is _INNER, namespace=NAMESPACE)[:-1]
        return (spec.tree if spec is not None else self._spec(params)).unflatten([*extras, opt_state])

    def split(self, wrapped_state: Any, params: Any, spec: Any = None) -> tuple[tuple[torch.Tensor, ...], Any]:
        """Inverse of :meth:`join`: ``(the tensors to carry, the user's optimizer state)``."""
        if torch.compiler.is_compiling():
            parts = _traced_split(spec, wrapped_state)
        else:
            parts = (spec.tree if spec is not None else self._spec(params)).flatten_up_to(wrapped_state)
        return tuple(parts[:-1]), parts[-1]

    def flush(self, wrapped: GradientTransformation, wrapped_state: Any, params: Any) -> tuple[Any, Any]:
        """Apply a partial accumulation window now (Lightning updates at the end of an epoch whose
        batch count is not a multiple of ``accumulate_grad_batches``)."""
        if self.accumulate_grad_batches == 1:
            return params, wrapped_state
        return multi_steps_flush(wrapped, wrapped_state, params)

    # --- hooks of the step's core (precision and distribution) -------------------------------

    def batch(self, batch: Any) -> Any:
        """The batch as the step computes on it (cast under a ``*-true`` precision)."""
        return cast_batch(batch, self.precision)

    def forward(self, device: torch.device | None) -> Any:
        """The context of the forward pass: autocast under ``*-mixed``."""
        return autocast(self.precision, device)

    def scale(self, wrapped_state: Any) -> torch.Tensor | None:
        """The loss scale the gradients are computed with (``16-mixed``); None otherwise."""
        return scale_of(wrapped_state) if self.precision == "16-mixed" else None

    def reduce(self, grads: Any) -> Any:
        """The gradients averaged across ranks (the identity without a reducer)."""
        return grads if self.grad_reduce is None else self.grad_reduce(grads)

    def seed(self, seed: int | None) -> int | None:
        """The step's seed for this rank: ``seed`` folded with the reducer's rank."""
        return seed if seed is None or self.grad_reduce is None else _rng.fold(seed, self.grad_reduce.rank)
