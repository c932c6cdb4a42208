"""The trainer state: one frozen pytree record holding everything a run needs.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1), seed=0)
    >>> sorted(state.params)
    ['bias', 'weight']
    >>> int(state.step)
    0
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from fnloop.errors import ConfigError
from fnloop.tree import check_same_structure, dataclass, field
from fnloop.types import GradientTransformationLike, TensorDict

__all__ = ["LoopState", "TrainState", "Status", "CallbackStates", "OptionsState", "trainable"]


class CallbackStates(dict):  # type: ignore[type-arg]
    """Per-callback states (JSON-like values), kept as ONE pytree leaf: callbacks come and go
    between runs without changing the state's tree structure, and checkpoints store it as JSON."""


class OptionsState:
    """What a train step's options carry from call to call (an open gradient-accumulation
    window, non-finite skip counters), kept as ONE pytree leaf: the Trainer's flags never change
    the state's tree, so a checkpoint always restores into ``TrainState.create(module, tx)``.

    ``key`` names the options that wrote ``tensors`` (``None``: nothing carried); a step with
    other options starts afresh. Checkpoints store the tensors next to the others.
    """

    __slots__ = ("key", "tensors")

    def __init__(self, key: tuple[Any, ...] | None = None, tensors: tuple[torch.Tensor, ...] = ()) -> None:
        self.key = key
        self.tensors = tuple(tensors)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OptionsState):
            return NotImplemented
        return (
            self.key == other.key
            and len(self.tensors) == len(other.tensors)
            and all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(self.tensors, other.tensors))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OptionsState(key={self.key!r}, tensors={len(self.tensors)})"


class Status:
    """Values of ``LoopState.status``."""

    INITIALIZING = "initializing"
    RUNNING = "running"
    FINISHED = "finished"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


@dataclass
class LoopState:
    """Loop counters owned by the driver; every field is a pytree leaf, so a checkpoint holds them.

    Attributes:
        epoch: current epoch (0-based).
        batch_idx: batches of the current epoch already consumed.
        total_batch_idx: training batches consumed over all epochs.
        global_step: optimizer steps taken (Lightning's ``global_step``).
        samples_seen: training samples consumed in total.
        val_count: validation runs done (sanity checks excluded).
        val_pending: the last batch asked for a validation that has not run yet (an interrupted
            run runs it first when it resumes).
        stop: a stop was requested (by a callback, a signal or a policy).
        status: one of :class:`Status`.
        callbacks: per-callback state (best scores, counters), keyed by callback key.
        logger_step: the step loggers write at.
        options: what the train step's options (accumulation, clipping, non-finite skipping)
            carry between calls; one leaf whatever the options.
    """

    epoch: int = 0
    batch_idx: int = 0
    total_batch_idx: int = 0
    global_step: int = 0
    samples_seen: int = 0
    val_count: int = 0
    val_pending: bool = False
    stop: bool = False
    status: str = Status.INITIALIZING
    callbacks: CallbackStates = field(default_factory=CallbackStates)
    logger_step: int = 0
    options: OptionsState = field(default_factory=OptionsState)


def trainable(module: torch.nn.Module) -> list[str]:
    """Names of the parameters that train (``requires_grad``): the others get no gradient, no
    optimizer state and no update, as with ``torch.optim``.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1)
        >>> m.bias.requires_grad_(False)
        Parameter containing:
        tensor([...])
        >>> trainable(m)
        ['weight']
    """
    return [n for n, p in module.named_parameters() if p.requires_grad]


def _meta_template(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``module`` whose parameters and buffers live on the meta device."""
    memo: dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(module, memo)


@dataclass
class TrainState:
    """The whole trainer state.

    Leaves: ``step`` (int64 0-d CPU tensor, calls of the train step so far), ``params`` and
    ``buffers`` (dicts keyed like ``module.named_parameters()``), ``opt_state``, ``rng``
    (int64 0-d CPU tensor, the run's key) and ``loop`` (:class:`LoopState`). Static:
    ``module`` (a template on the meta device, holding no weight memory) and ``tx``.
    """

    step: torch.Tensor
    params: TensorDict
    buffers: TensorDict
    opt_state: Any
    rng: torch.Tensor
    loop: LoopState
    module: torch.nn.Module = field(static=True, compare=False)
    tx: GradientTransformationLike = field(static=True, compare=False)

    @classmethod
    def create(
        cls,
        module: torch.nn.Module,
        tx: GradientTransformationLike,
        *,
        seed: int = 0,
        params: TensorDict | None = None,
        init_from: Mapping[str, torch.Tensor] | None = None,
    ) -> TrainState:
        """Build a state from a module and an optimizer.

        The state gets its own copy of the weights; ``module`` itself is left as it was.

        Args:
            module: the model; its parameters become ``params`` and its buffers ``buffers``.
                Parameters with ``requires_grad=False`` are frozen: they get no gradient, no
                optimizer state and no update (``opt_state`` covers the trainable ones).
            tx: a ``GradientTransformation`` from :mod:`fnloop.optim`.
            seed: the run's RNG key (dropout etc. derive from it and the step).
            params: start from these weights (a dict like ``state.params``) instead of the module's.
            init_from: weights by name, params and buffers together (what
                ``fl.registry.load(root_url, name, version)`` returns); they replace the module's.

        Example:
            >>> import torch, fnloop as fl, fnloop.optim as flo
            >>> s = fl.TrainState.create(torch.nn.Linear(3, 2), flo.adam(lr=1e-3), seed=1)
            >>> s.params["weight"].shape
            torch.Size([2, 3])
        """
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"TrainState.create: module must be a torch.nn.Module, got {type(module).__name__}")
        new_params = {n: p.detach().clone() for n, p in module.named_parameters()}
        new_buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
        if init_from is not None:
            params = {n: init_from[n] for n in new_params if n in init_from}
            new_buffers.update({n: init_from[n].detach().clone() for n in new_buffers if n in init_from})
        if params is not None:
            check_same_structure(new_params, dict(params), what="TrainState.create(params=...)")
            new_params = {n: torch.as_tensor(params[n]).detach().clone() for n in new_params}
        return cls(
            step=torch.zeros((), dtype=torch.int64),
            params=new_params,
            buffers=new_buffers,
            opt_state=tx.init({n: new_params[n] for n in trainable(module)}),
            rng=torch.tensor(int(seed), dtype=torch.int64),
            loop=LoopState(),
            module=_meta_template(module),
            tx=tx,
        )
