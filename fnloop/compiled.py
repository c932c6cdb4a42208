"""Compiling steps: ``fl.compile`` and the per-module cache of (compiled) step cores.

Example:
    >>> import torch, fnloop as fl
    >>> fast = fl.compile(fl.train_step(lambda model, batch: model(batch).square().mean()))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as torch_pytree

from fnloop.errors import StepError
from fnloop.tree import tree_flatten

__all__ = ["compile", "CoreCache"]


class CoreCache:
    """Per (module, tx) cores, built lazily; ``compile_kwargs`` turns them into compiled cores."""

    def __init__(self, compile_kwargs: dict[str, Any] | None):
        self.compile_kwargs = compile_kwargs
        self.cores: dict[tuple[int, int], tuple[Any, Callable[..., Any]]] = {}

    def get(self, key_objs: tuple[Any, Any], build: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
        key = (id(key_objs[0]), id(key_objs[1]))
        hit = self.cores.get(key)
        if hit is not None and hit[0][0] is key_objs[0] and hit[0][1] is key_objs[1]:
            return hit[1]
        core = build()
        if self.compile_kwargs is not None:
            core = FlatCompiled(core, self.compile_kwargs)
        self.cores[key] = (key_objs, core)
        return core


class FlatCompiled:
    """``torch.compile(fullgraph=True)`` of a core, called with a flat tuple of tensors.

    Per call it computes a cheap signature (treespec; dtype and device of the state; shape,
    stride, dtype and device of every batch leaf; grad and deterministic modes; the state's
    shapes are fixed by its module). The first call with a signature runs dynamo's guards
    (compiling if needed); later calls skip them
    (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``), which is safe because what
    those guards check for our inputs is in the signature: guard evaluation costs more than the
    kernels of a small step.

    A compiled graph draws random numbers or not, the same way on every call. The second call
    with a signature checks whether it touched the global generators; when it did not, later
    calls skip seeding and restoring them (the RNG contract holds trivially).
    """

    def __init__(self, core: Callable[..., Any], compile_kwargs: dict[str, Any]):
        self.core = core
        # static shapes: a new batch shape (a last partial batch) compiles once more instead of
        # tracing symbolic sizes, which dropout under torch.func.grad does not support
        self.compile_kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        self.by_spec: dict[Any, Callable[..., Any]] = {}
        self.calls: dict[Any, int] = {}  # signature -> calls so far
        self.rng_free: set[Any] = set()

    def _entry(self, spec: Any) -> tuple[Callable[..., Any], list[int], int]:
        """``(compiled fn, permutation from optree to torch leaf order, batch leaf count)``."""
        entry = self.by_spec.get(spec)
        if entry is None:
            # dynamo traces torch's pytree, so the compiled function rebuilds the inputs with it;
            # outside, optree flattens (C++) and its treespec hashes fast
            index_tree = spec.unflatten(range(spec.num_leaves))
            order, torch_spec = torch_pytree.tree_flatten(index_tree)
            core = self.core

            def flat(*xs: Any) -> Any:
                return core(*torch_pytree.tree_unflatten(list(xs), torch_spec))

            n_batch = spec.children()[-1].num_leaves if spec.num_children else 0
            entry = self.by_spec[spec] = (torch.compile(flat, **self.compile_kwargs), list(order), n_batch)
        return entry

    def run(self, seed: Callable[[], tuple[int | None, list[int]]], *args: Any) -> Any:
        """Call the compiled core on ``args`` (the state's parts, then the batch) under the RNG
        seeding ``seed()`` gives (``(seed, cuda devices)``), unless the graph draws no randomness."""
        from fnloop import rng as _rng

        leaves, spec = tree_flatten(args)
        fn, order, n_batch = self._entry(spec)
        ordered = [None if i is None else leaves[i] for i in order]  # torch's pytree keeps None as a leaf
        first = leaves[0] if leaves else None
        signature = (
            spec,
            torch.is_grad_enabled(),
            torch.are_deterministic_algorithms_enabled(),
            (first.dtype, first.device) if isinstance(first, torch.Tensor) else None,
            *(
                (x.shape, x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else (type(x), x)
                for x in leaves[len(leaves) - n_batch :]
            ),
        )
        calls = self.calls.get(signature, 0)
        if signature in self.rng_free:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return fn(*ordered)
        self.calls[signature] = calls + 1
        seed_value, devices = seed()
        with _rng.seeded(seed_value, devices):
            if calls == 0:  # dynamo checks its guards (and compiles)
                return fn(*ordered)
            before = _rng.generator_states(devices)
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                out = fn(*ordered)
            if calls == 1 and all(torch.equal(a, b) for a, b in zip(before, _rng.generator_states(devices))):
                self.rng_free.add(signature)
            return out


def compile(step: Any, **torch_compile_kwargs: Any) -> Any:  # noqa: A001
    """The same step with its computation under ``torch.compile(fullgraph=True)``.

    The RNG seeding and the state bookkeeping stay outside the compiled region, and every value
    that changes between steps (learning rate, counters) is a tensor input, so the step compiles
    once.

    Example:
        >>> import torch, fnloop as fl
        >>> fast = fl.compile(fl.train_step(lambda model, batch: model(batch).square().mean()))
    """
    from fnloop.eval_steps import EvalLike
    from fnloop.step import TrainStep

    if isinstance(step, TrainStep):
        return TrainStep(step.loss_fn, compile_kwargs=torch_compile_kwargs)
    if isinstance(step, EvalLike):
        return type(step)(step.fn, compile_kwargs=torch_compile_kwargs)
    raise StepError(f"compile: expected a step from fnloop.train_step/eval_step/predict_step, got {type(step).__name__}")
