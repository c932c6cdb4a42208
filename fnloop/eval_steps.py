"""Pure evaluation and prediction steps: the module in eval mode, randomness seeded from the state.

What they compute is :func:`eval_core` (the weights passed functionally to an eval-mode working
copy of the template); :mod:`fnloop.execution` runs it fast (bound weights under ``no_grad``) when
nothing asks for a graph, and as it is when the caller differentiates through it.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.TrainState.create(torch.nn.Linear(3, 1), flo.sgd(lr=0.1))
    >>> fl.eval_step(lambda model, batch: model(batch).square().mean())(state, torch.ones(2, 3))
    {'loss': tensor(...)}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fnloop import execution
from fnloop.bind import working_copy
from fnloop.errors import StepError
from fnloop.state import TrainState
from fnloop.step import functional_model

__all__ = ["EvalLike", "EvalStep", "PredictStep", "eval_step", "predict_step", "eval_core"]


def eval_core(fn: Callable[..., Any], template: torch.nn.Module, finish: Callable[[Any], Any]) -> Callable[..., Any]:
    """``(params, buffers, batch) -> finish(fn(model, batch))`` with ``model`` the eval-mode
    working copy of ``template`` bound to ``params`` and ``buffers``: the meaning of an eval step."""
    traced_copy = working_copy(template, False)  # what dynamo traces; eager calls take their thread's copy

    def core(params: Any, buffers: Any, batch: Any) -> Any:
        module = traced_copy if torch.compiler.is_compiling() else working_copy(template, False)
        return finish(fn(functional_model(module, params, buffers), batch))

    return core


class EvalLike:
    """Shared driver of eval and predict steps."""

    kind = "eval_step"

    def __init__(self, fn: Callable[..., Any], *, compile_kwargs: dict[str, Any] | None = None):
        if not callable(fn):
            raise StepError(f"{self.kind}: fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.compile_kwargs = compile_kwargs
        self._run = execution.EvalExecutor(self.kind, fn, self._finish, compile_kwargs, eval_core)

    def __repr__(self) -> str:
        return f"{self.kind}({getattr(self.fn, '__qualname__', self.fn)!r})"

    def _finish(self, out: Any) -> Any:
        return out

    def __call__(self, state: TrainState, batch: Any) -> Any:
        return self._run(state, batch)

    def compiled(self, **torch_compile_kwargs: Any) -> EvalLike:
        """The same step under ``torch.compile(fullgraph=True)`` (see :func:`fnloop.compile`)."""
        return type(self)(self.fn, compile_kwargs=torch_compile_kwargs)


class EvalStep(EvalLike):
    """``(state, batch) -> metrics``: ``fn(model, batch)`` returns a loss tensor (reported as
    ``"loss"``) or a dict of scalar tensors; module in eval mode."""

    kind = "eval_step"

    def _finish(self, out: Any) -> dict[str, torch.Tensor]:
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
            out = {"loss": out[0], **out[1]}
        elif isinstance(out, torch.Tensor):
            out = {"loss": out}
        if not isinstance(out, Mapping):
            raise StepError(f"eval_step: fn must return a tensor or a dict of tensors, got {type(out).__name__}")
        for k, v in out.items():
            if not isinstance(v, torch.Tensor) or v.ndim != 0:
                raise StepError(f"eval_step: metric {k!r} must be a scalar (0-d) tensor, got {getattr(v, 'shape', type(v).__name__)}")
        return dict(out)


class PredictStep(EvalLike):
    """``(state, batch) -> outputs``: whatever ``fn(model, batch)`` returns; eval mode."""

    kind = "predict_step"


def eval_step(fn: Callable[..., Any]) -> EvalStep:
    """Build the pure eval step of ``fn(model, batch) -> loss | {"name": scalar tensor}``.

    Differentiable with respect to the state and the batch (``torch.func`` and autograd); when
    nothing requires grad it runs under ``no_grad``.

    Example:
        >>> import torch, fnloop as fl
        >>> step = fl.eval_step(lambda model, batch: {"loss": model(batch).square().mean()})
    """
    return EvalStep(fn)


def predict_step(fn: Callable[..., Any]) -> PredictStep:
    """Build the pure predict step of ``fn(model, batch) -> outputs``.

    Example:
        >>> import fnloop as fl
        >>> step = fl.predict_step(lambda model, batch: model(batch).argmax(-1))
    """
    return PredictStep(fn)
