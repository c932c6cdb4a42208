"""Pure steps: ``train_step``, ``eval_step``, ``predict_step`` and ``compile``.

A step never mutates its inputs, never performs I/O or host syncs, and is deterministic:
the same ``(state, batch)`` gives bitwise the same result.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.TrainState.create(torch.nn.Linear(3, 1), flo.sgd(lr=0.1), seed=0)
    >>> def loss_fn(model, batch):
    ...     x, y = batch
    ...     return torch.nn.functional.mse_loss(model(x), y)
    >>> step = fl.train_step(loss_fn)
    >>> state, metrics = step(state, (torch.ones(4, 3), torch.zeros(4, 1)))
    >>> int(state.step), sorted(metrics)
    (1, ['loss'])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fnloop import rng as _rng
from fnloop.bind import Bound, bind
from fnloop.compiled import CoreCache, FlatCompiled
from fnloop.errors import StepError, TreeMismatchError
from fnloop.optim.base import fused_apply
from fnloop.state import TrainState
from fnloop.tree import check_same_structure, tree_leaves, tree_structure

__all__ = ["TrainStep", "train_step", "mark_donated", "check_not_donated"]


def _set_mode(module: torch.nn.Module, training: bool) -> None:
    if module.training != training:
        module.train(training)


def _params_device(params: Mapping[str, torch.Tensor]) -> torch.device | None:
    for p in params.values():
        return p.device
    return None


def _cuda_devices(device: torch.device | None) -> list[int]:
    """The CUDA generators a step on ``device`` (the params' device) seeds."""
    return [device.index or 0] if device is not None and device.type == "cuda" else []


def _check_batch_device(batch: Any, device: torch.device | None, name: str) -> None:
    if device is None:
        return
    # the common (inputs, targets) tuple without a tree walk
    leaves = batch if type(batch) in (tuple, list) and all(type(b) is torch.Tensor for b in batch) else tree_leaves(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.device != device:
            raise StepError(
                f"{name}: a batch tensor is on {leaf.device} but the params are on {device}; "
                f"move the batch with fnloop.to_device(batch, {str(device)!r}) (the Trainer does this)"
            )


_DONATED = "_fnloop_donated"


def mark_donated(state: Any) -> None:
    """Mark a state whose tensors were given to an in-place update; steps refuse it afterwards."""
    object.__setattr__(state, _DONATED, True)


def check_not_donated(state: Any, name: str) -> None:
    """Raise if ``state`` was donated (its tensors may have been overwritten)."""
    if state.__dict__.get(_DONATED, False):
        raise StepError(
            f"{name}: this state was donated to Trainer.fit (its tensors were updated in place); use the state "
            "fit returned, or Trainer(donate=False) to keep the input state"
        )


def _check_state(state: Any, name: str) -> None:
    if not isinstance(state, TrainState):
        raise StepError(f"{name}: expected a fnloop.TrainState as first argument, got {type(state).__name__}")
    check_not_donated(state, name)


def _check_shapes(shapes: Mapping[str, torch.Size], params: Mapping[str, torch.Tensor]) -> None:
    wrong = [f"{k}: {tuple(params[k].shape)}, the module's is {tuple(s)}" for k, s in shapes.items() if params[k].shape != s]
    if wrong:
        raise TreeMismatchError("state.params vs the module's parameters: shapes differ.\n  " + "\n  ".join(wrong))


def _split_loss(out: Any, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    aux: dict[str, torch.Tensor] = {}
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise StepError(f"{name}: loss_fn must return a loss or (loss, {{'metric': tensor, ...}}), got a tuple of {len(out)}")
        out, aux = out[0], dict(out[1])
    if not isinstance(out, torch.Tensor) or out.ndim != 0 or not out.is_floating_point():
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise StepError(f"{name}: loss_fn must return a scalar (0-d) floating-point tensor, got {shape}; reduce it with .mean()")
    return out, aux


class TrainStep:
    """``(state, batch) -> (state, metrics)``: one gradient step of ``loss_fn``.

    Metrics are ``{"loss": loss, **aux}`` as detached tensors.
    """

    def __init__(self, loss_fn: Callable[..., Any], *, compile_kwargs: dict[str, Any] | None = None):
        if not callable(loss_fn):
            raise StepError(f"train_step: loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self._cache = CoreCache(compile_kwargs)
        self._checked: tuple[Any, Any] | None = None
        self._produced: tuple[Any, Any] = (None, None)  # the (params, optimizer state) this step returned last
        self._seeds = _rng.SeedCache()

    def __repr__(self) -> str:
        return f"train_step({getattr(self.loss_fn, '__qualname__', self.loss_fn)!r})"

    def _build(self, module: torch.nn.Module, tx: Any) -> Callable[..., Any]:
        loss_fn = self.loss_fn
        compiled = self._cache.compile_kwargs is not None
        apply = fused_apply(tx)

        def grads_eager(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], batch: Any) -> Any:
            with torch.enable_grad():
                leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                with bind(module, leaves, buffers) as model:
                    loss, aux = _split_loss(loss_fn(model, batch), "train_step")
                grads_list = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            grads = {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in zip(leaves, grads_list)}
            return grads, loss, aux

        def grads_traced(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], batch: Any) -> Any:
            def loss_of(p: dict[str, torch.Tensor]) -> Any:
                loss, aux = _split_loss(_functional_loss(loss_fn, module, p, buffers, batch), "train_step")
                return loss, (loss, aux)

            with torch.enable_grad():
                grads, (loss, aux) = torch.func.grad(loss_of, has_aux=True)(params)
            return grads, loss, aux

        def compute_grads(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], batch: Any) -> Any:
            # torch.func transforms (vmap) and dynamo need the functional path; eager autograd is faster.
            first = next(iter(params.values()), None)
            traced = compiled or torch.compiler.is_compiling() or (first is not None and _rng._is_wrapped(first))
            return (grads_traced if traced else grads_eager)(params, buffers, batch)

        def core(
            params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], opt_state: Any, batch: Any, donate: bool = False
        ) -> Any:
            # BatchNorm & co. update buffers in place: always on copies (small), so an exception in
            # loss_fn leaves even a donated state intact; only the optimizer apply works in place
            new_buffers = {k: v.clone() for k, v in buffers.items()}
            grads, loss, aux = compute_grads(params, new_buffers, batch)
            # the grads dict is the step's own: the optimizer may free each gradient after its last read
            new_params, new_opt_state = apply(grads, opt_state, params, donate=donate, consume=True)
            metrics = {"loss": loss.detach(), **{k: v.detach() for k, v in aux.items()}}
            return new_params, new_buffers, new_opt_state, metrics

        return core

    def _validate(self, state: TrainState) -> None:
        """Params must match the module's (names and shapes) and the optimizer state must have
        ``tx.init``'s structure: checked fully once per module/optimizer, then by treespec
        equality and shapes (~3 us), and not at all for what this step returned last."""
        key = (state.module, state.tx)
        if self._checked is not None and self._checked[0] is key[0] and self._checked[1] is key[1]:
            if state.params is self._produced[0] and state.opt_state is self._produced[1]:
                return  # this step built both: they are right
            if state.params.keys() == self._shapes.keys() and tree_structure(state.opt_state) == self._opt_spec:
                _check_shapes(self._shapes, state.params)
                return
        expected = {n: p for n, p in state.module.named_parameters()}
        check_same_structure(expected, state.params, what="state.params vs the module's parameters")
        shapes = {k: v.shape for k, v in expected.items()}
        _check_shapes(shapes, state.params)
        meta = {k: torch.empty_like(v, device="meta") for k, v in state.params.items()}
        reference = state.tx.init(meta)  # structure only: no memory
        check_same_structure(reference, state.opt_state, what="state.opt_state vs tx.init(state.params)")
        self._checked = key
        self._shapes = shapes
        self._opt_spec = tree_structure(reference)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        return self._run(state, batch, donate=False)

    def donated(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """The same step, allowed to update ``state``'s params, buffers and optimizer state in
        place (the driver's path: it never looks at the old state again). Results are bitwise
        equal to the pure call; ``state`` is marked donated and refused by later steps.
        A compiled step runs its pure path."""
        return self._run(state, batch, donate=self._cache.compile_kwargs is None)

    def _run(self, state: TrainState, batch: Any, donate: bool) -> tuple[TrainState, dict[str, torch.Tensor]]:
        _check_state(state, "train_step")
        self._validate(state)
        device = _params_device(state.params)
        _check_batch_device(batch, device, "train_step")
        module = state.module
        _set_mode(module, True)
        core = self._cache.get((module, state.tx), lambda: self._build(module, state.tx))
        if isinstance(core, FlatCompiled):  # compiled: never donates; seeds only if the graph draws randomness
            seed = lambda: (self._seeds(state.rng, state.step), _cuda_devices(device))  # noqa: E731
            params, buffers, opt_state, metrics = core.run(seed, state.params, state.buffers, state.opt_state, batch)
        else:
            restore = _rng.seed_(self._seeds(state.rng, state.step), _cuda_devices(device))
            try:
                if donate:
                    mark_donated(state)
                    params, buffers, opt_state, metrics = core(state.params, state.buffers, state.opt_state, batch, True)
                else:
                    params, buffers, opt_state, metrics = core(state.params, state.buffers, state.opt_state, batch)
            finally:
                restore()
        self._produced = (params, opt_state)
        new_step = state.step + 1
        self._seeds.advance(state.step, new_step)
        return state.replace(step=new_step, params=params, buffers=buffers, opt_state=opt_state), metrics


class _Functional(Bound):
    """A bound module that calls through ``torch.func.functional_call`` (what dynamo traces)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.module, (self.params, self.buffers), args, kwargs, strict=False)


def _functional_loss(loss_fn: Callable[..., Any], module: torch.nn.Module, params: Any, buffers: Any, batch: Any) -> Any:
    """``loss_fn`` with the module called through ``torch.func.functional_call`` (traceable)."""
    return loss_fn(_Functional(module, params, buffers), batch)


def train_step(loss_fn: Callable[..., Any]) -> TrainStep:
    """Build the pure train step of ``loss_fn(model, batch) -> loss | (loss, {"acc": ...})``.

    ``model`` is the state's module bound to its params and buffers (callable like the module,
    plus ``.params`` and ``.buffers``). The step computes the gradients, applies ``state.tx`` and
    returns the new state (step + 1, new params, buffers and optimizer state) and the metrics.

    Example:
        >>> import torch, fnloop as fl
        >>> step = fl.train_step(lambda model, batch: model(batch).square().mean())
    """
    return TrainStep(loss_fn)
