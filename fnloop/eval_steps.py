"""Pure evaluation and prediction steps: eval mode, no grad, seeded RNG.

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

from fnloop import rng as _rng
from fnloop.bind import bind
from fnloop.compiled import CoreCache, FlatCompiled
from fnloop.errors import StepError
from fnloop.state import TrainState
from fnloop.step import _check_batch_device, _check_state, _cuda_devices, _functional_loss, _params_device, _set_mode

__all__ = ["EvalLike", "EvalStep", "PredictStep", "eval_step", "predict_step"]


class EvalLike:
    """Shared driver of eval and predict steps: eval mode, no grad, seeded RNG."""

    kind = "eval_step"

    def __init__(self, fn: Callable[..., Any], *, compile_kwargs: dict[str, Any] | None = None):
        if not callable(fn):
            raise StepError(f"{self.kind}: fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self._cache = CoreCache(compile_kwargs)
        self._seeds = _rng.SeedCache()  # an evaluation sees the same state (key and step) every batch

    def __repr__(self) -> str:
        return f"{self.kind}({getattr(self.fn, '__qualname__', self.fn)!r})"

    def _finish(self, out: Any) -> Any:
        return out

    def _build(self, module: torch.nn.Module) -> Callable[..., Any]:
        fn = self.fn
        compiled = self._cache.compile_kwargs is not None

        def core(params: Any, buffers: Any, batch: Any) -> Any:
            with torch.no_grad():
                if compiled:
                    return self._finish(_functional_loss(fn, module, params, buffers, batch))
                with bind(module, params, buffers) as model:
                    return self._finish(fn(model, batch))

        return core

    def __call__(self, state: TrainState, batch: Any) -> Any:
        _check_state(state, self.kind)
        device = _params_device(state.params)
        _check_batch_device(batch, device, self.kind)
        module = state.module
        _set_mode(module, False)
        core = self._cache.get((module, None), lambda: self._build(module))
        if isinstance(core, FlatCompiled):
            seed = lambda: (self._seeds(state.rng, state.step), _cuda_devices(device))  # noqa: E731
            return core.run(seed, state.params, state.buffers, batch)
        with _rng.seeded(self._seeds(state.rng, state.step), _cuda_devices(device)):
            return core(state.params, state.buffers, batch)


class EvalStep(EvalLike):
    """``(state, batch) -> metrics``: ``fn(model, batch)`` returns a loss tensor (reported as
    ``"loss"``) or a dict of scalar tensors; module in eval mode, no grad."""

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
    """``(state, batch) -> outputs``: whatever ``fn(model, batch)`` returns; eval mode, no grad."""

    kind = "predict_step"


def eval_step(fn: Callable[..., Any]) -> EvalStep:
    """Build the pure eval step of ``fn(model, batch) -> loss | {"name": scalar tensor}``.

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
