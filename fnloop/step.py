"""What a train step means, as one short pure function: bind the weights, compute the loss and
its gradients, let the optimizer turn them into new weights, return the new state.

:func:`apply_train_step` is that meaning, written for clarity; :class:`TrainStep` runs the same
computation through :mod:`fnloop.execution` (caches, in-place donation, compilation), whose
results are tested bitwise against it.

A step never mutates its inputs, performs no I/O or host syncs, and is deterministic: the same
``(state, batch)`` gives bitwise the same result. It is differentiable with respect to the state
and the batch, under ``torch.func`` transforms and plain autograd (second order included).

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

from collections.abc import Callable
from typing import Any

import torch

from fnloop import execution
from fnloop import rng as _rng
from fnloop.bind import Bound, working_copy
from fnloop.errors import ConfigError, StepError
from fnloop.loss import split_loss
from fnloop.optim.base import fused_apply
from fnloop.optim.dp import PerExampleGradientTransformation
from fnloop.options import StepOptions
from fnloop.example_grads import per_example_value_and_grad
from fnloop.state import OptionsState, TrainState

__all__ = ["TrainStep", "train_step", "apply_train_step", "train_core", "functional_model", "flush_window"]


class _Functional(Bound):
    """A bound module that calls through ``torch.func.functional_call``: nothing is written into
    the module, and every torch.func transform and dynamo can trace it."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.module, (self.params, self.buffers), args, kwargs, strict=False)


def functional_model(module: torch.nn.Module, params: Any, buffers: Any) -> Bound:
    """``module`` (a working copy of a state's template) bound to ``params`` and ``buffers``."""
    return _Functional(module, params, buffers)


def train_core(
    loss_fn: Callable[..., Any], template: torch.nn.Module, tx: Any, options: StepOptions
) -> Callable[..., Any]:
    """The step's computation ``(params, buffers, opt_state, carried, batch) -> (params, buffers,
    opt_state, carried, metrics)`` for one template and optimizer; the meaning of a step.

    ``carried`` is what the options carry between calls (:meth:`StepOptions.carried`). Only
    parameters that train (``requires_grad`` in the template) get gradients and updates.
    """
    names = [n for n, p in template.named_parameters() if p.requires_grad]
    frozen = len(names) != sum(1 for _ in template.parameters())
    traced_copy = working_copy(template, True)  # what dynamo traces; eager calls take their thread's copy
    per_example = isinstance(tx, PerExampleGradientTransformation)
    if per_example and (options.accumulate_grad_batches > 1 or options.gradient_clip_val):
        raise ConfigError(
            "train_step: accumulate_grad_batches and gradient_clip_val do not apply to a per-example optimizer "
            "(flo.dp_sgd clips each example to max_grad_norm); leave them at their defaults"
        )
    tx_run = options.wrap(tx)
    apply = fused_apply(tx_run)
    spec = options.spec_of({n: p for n, p in template.named_parameters() if p.requires_grad})

    def core(params: Any, buffers: Any, opt_state: Any, carried: Any, batch: Any) -> Any:
        buffers = {k: v.clone() for k, v in buffers.items()}  # BatchNorm & co update buffers in place
        batch = options.batch(batch)
        trainable = {n: params[n] for n in names}
        wrapped = options.join(carried, opt_state, trainable, spec) if options.key else opt_state
        scale = options.scale(wrapped)  # 16-mixed: the gradients are those of loss * scale

        def loss_of(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], data: Any) -> Any:
            module = traced_copy if torch.compiler.is_compiling() else working_copy(template, True)
            bound = functional_model(module, {**params, **p} if frozen else p, b)
            with options.forward(execution.device_of(params)):
                loss, aux = split_loss(loss_fn(bound, data), "train_step")
            return (loss if scale is None else loss * scale), (loss, aux)

        with torch.enable_grad():  # buffers are an input too: BatchNorm may update them in place
            if per_example:  # the transform privatises per-example gradients; metrics: their means
                grads, (loss, aux) = per_example_value_and_grad(lambda p, data: loss_of(p, buffers, data))(trainable, batch)
                loss, aux = loss.mean(), {k: v.mean(0) for k, v in aux.items()}
            else:
                grads, (loss, aux) = torch.func.grad(loss_of, has_aux=True)(trainable, buffers, batch)
        new, wrapped = apply(options.reduce(grads), wrapped, trainable)
        carried, opt_state = options.split(wrapped, trainable, spec) if options.key else (carried, wrapped)
        return {**params, **new} if frozen else new, buffers, opt_state, carried, {"loss": loss, **aux}

    return core


def apply_train_step(
    loss_fn: Callable[..., Any], state: TrainState, batch: Any, options: StepOptions | None = None
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """The meaning of ``fl.train_step(loss_fn, **options)(state, batch)``, with no caches or
    in-place updates: randomness seeded from ``(state.rng, state.step)``, the core, the new state.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> s = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
        >>> loss = lambda m, b: m(b).square().mean()
        >>> a, _ = apply_train_step(loss, s, torch.ones(3, 2))
        >>> fl.testing.assert_trees_equal(a.params, fl.train_step(loss)(s, torch.ones(3, 2))[0].params)
    """
    core = train_core(loss_fn, state.module, state.tx, options or StepOptions())
    options = options or StepOptions()
    carried = options.carried(state.loop.options)
    with _rng.seeded(options.seed(execution.state_seed(state.rng, state.step)), execution.cuda_devices(state.params)):
        params, buffers, opt_state, carried, metrics = core(state.params, state.buffers, state.opt_state, carried, batch)
    loop = state.loop.replace(options=OptionsState(options.key, carried)) if options.key else state.loop
    return state.replace(step=state.step + 1, params=params, buffers=buffers, opt_state=opt_state, loop=loop), metrics


def flush_window(state: TrainState, options: StepOptions) -> TrainState:
    """``state`` with an open gradient-accumulation window of ``options`` applied now (its
    gradient sum divided by ``accumulate_grad_batches``, as Lightning steps on a partial window
    at the end of an epoch); ``state`` itself when no window is open. Eager only."""
    carried = options.carried(state.loop.options) if options.accumulate_grad_batches > 1 else ()
    if not carried:
        return state
    execution.check_state(state, "train_step.flush")
    names = [n for n, p in state.module.named_parameters() if p.requires_grad]
    trainable = {n: state.params[n] for n in names}
    wrapped = options.join(carried, state.opt_state, trainable)
    new, wrapped = options.flush(options.wrap(state.tx), wrapped, trainable)
    if new is trainable:
        return state
    carried, opt_state = options.split(wrapped, trainable)
    loop = state.loop.replace(options=OptionsState(options.key, carried))
    return state.replace(params={**state.params, **new}, opt_state=opt_state, loop=loop)


class TrainStep:
    """``(state, batch) -> (state, metrics)``: one gradient step of ``loss_fn``.

    Metrics are ``{"loss": loss, **aux}``. Calls run through :mod:`fnloop.execution`: the same
    values as :func:`apply_train_step`, faster.
    """

    kind = "train_step"

    def __init__(
        self, loss_fn: Callable[..., Any], options: StepOptions | None = None, *, compile_kwargs: dict[str, Any] | None = None
    ):
        if not callable(loss_fn):
            raise StepError(f"train_step: loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.options = options or StepOptions()
        self.compile_kwargs = compile_kwargs
        self._run = execution.TrainExecutor(loss_fn, self.options, compile_kwargs, train_core)

    def __repr__(self) -> str:
        return f"train_step({getattr(self.loss_fn, '__qualname__', self.loss_fn)!r})"

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        return self._run(state, batch, donate=False)

    def donated(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """The same step, allowed to update ``state``'s tensors in place (the driver's path: it
        never looks at the old state again). Results are bitwise equal to the pure call; the
        object ``state`` is refused by every fnloop entry point afterwards, since its tensors now
        alias the result's. A compiled step runs its pure path."""
        return self._run(state, batch, donate=True)

    def flush(self, state: TrainState) -> TrainState:
        """Apply an open accumulation window now (Lightning's partial window at the end of an
        epoch); the state unchanged when none is open."""
        return flush_window(state, self.options)

    def with_options(self, options: StepOptions) -> TrainStep:
        """The same step (compiled or not) with other options."""
        return self if options == self.options else TrainStep(self.loss_fn, options, compile_kwargs=self.compile_kwargs)

    def compiled(self, **torch_compile_kwargs: Any) -> TrainStep:
        """The same step under ``torch.compile(fullgraph=True)`` (see :func:`fnloop.compile`)."""
        return TrainStep(self.loss_fn, self.options, compile_kwargs=torch_compile_kwargs)


def train_step(
    loss_fn: Callable[..., Any],
    *,
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: str | None = None,
    skip_nonfinite: bool = False,
    precision: str | int = "32-true",
) -> TrainStep:
    """Build the pure train step of ``loss_fn(model, batch) -> loss | (loss, {"acc": ...})``.

    ``model`` is the state's module bound to its params and buffers (callable like the module,
    plus ``.params`` and ``.buffers``). The step computes the gradients of the trainable params,
    applies ``state.tx`` and returns the new state (step + 1, new params, buffers and optimizer
    state) and the metrics. The options (see :class:`fnloop.options.StepOptions`) are what the
    Trainer's flags of the same names set; they never change the state's tree.

    Example:
        >>> import torch, fnloop as fl
        >>> step = fl.train_step(lambda model, batch: model(batch).square().mean())
    """
    options = StepOptions(accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm, skip_nonfinite, precision)  # type: ignore[arg-type]
    return TrainStep(loss_fn, options)
