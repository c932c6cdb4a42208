"""Pure metrics: ``init`` / ``update`` / ``merge`` / ``compute`` over tensor states.

A metric is a small frozen object with pure methods; its accumulator state is a NamedTuple
of tensors (a pytree), so it can be merged across processes, checkpointed or carried inside
a compiled function. ``init``, ``update`` and ``merge`` never read a value back to the host.

Example:
    >>> import torch
    >>> from fnloop.metrics import Mean
    >>> m = Mean()
    >>> m.compute(m.update(m.init(), torch.tensor(2.0), weight=3))
    tensor(2., dtype=torch.float64)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from fnloop.errors import ConfigError

__all__ = ["Metric", "MeanState", "SumState", "ExtremumState", "AccuracyState", "Mean", "Sum", "Max", "Min", "Accuracy"]


@runtime_checkable
class Metric(Protocol):
    """A pure accumulator: ``init``, ``update(acc, value, weight) -> acc``, ``merge``, ``compute``."""

    def init(self, like: Tensor | None = None) -> Any: ...

    def update(self, acc: Any, value: Tensor, weight: Tensor | int | float = 1) -> Any: ...

    def merge(self, a: Any, b: Any) -> Any: ...

    def compute(self, acc: Any) -> Tensor: ...


class MeanState(NamedTuple):
    """Weighted sum of the values and sum of the weights."""

    total: Tensor
    weight: Tensor


class SumState(NamedTuple):
    """Running sum."""

    total: Tensor


class ExtremumState(NamedTuple):
    """Running maximum (or minimum)."""

    value: Tensor


class AccuracyState(NamedTuple):
    """Number of correct predictions and number of targets (int64)."""

    correct: Tensor
    total: Tensor


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _device(like: Tensor | None) -> torch.device:
    return like.device if isinstance(like, Tensor) else torch.device("cpu")


def _as_value(value: Any, dtype: torch.dtype | None = None) -> Tensor:
    """The value as a detached tensor in the accumulation dtype of its device."""
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value)
    value = value.detach()
    return value.to(dtype or _acc_dtype(value.device))


def _full(fill: float, like: Tensor | None) -> Tensor:
    device = _device(like)
    return torch.full((), fill, dtype=_acc_dtype(device), device=device)


@dataclasses.dataclass(frozen=True)
class Mean:
    """Weighted mean ``sum(value * weight) / sum(weight)``; 0/0 (no weight yet) is ``nan``.

    Example:
        >>> import torch
        >>> m = Mean()
        >>> acc = m.update(m.update(m.init(), torch.tensor(2.0), 1), torch.tensor(5.0), 2)
        >>> m.compute(acc)
        tensor(4., dtype=torch.float64)
    """

    def init(self, like: Tensor | None = None) -> MeanState:
        """Zero state on ``like``'s device (CPU when ``like`` is None)."""
        return MeanState(_full(0.0, like), _full(0.0, like))

    def update(self, acc: MeanState, value: Tensor, weight: Tensor | int | float = 1) -> MeanState:
        """Add ``value * weight`` to the total and ``weight`` to the weight."""
        v = _as_value(value, acc.total.dtype)
        if isinstance(weight, Tensor):
            w = weight.detach().to(acc.weight.dtype)
            return MeanState(acc.total + v * w, acc.weight + w)
        return MeanState(torch.add(acc.total, v, alpha=weight), acc.weight + weight)

    def merge(self, a: MeanState, b: MeanState) -> MeanState:
        """Combine two states as if every update had gone into one."""
        return MeanState(a.total + b.total, a.weight + b.weight)

    def compute(self, acc: MeanState) -> Tensor:
        """The weighted mean."""
        return acc.total / acc.weight


@dataclasses.dataclass(frozen=True)
class Sum:
    """Sum of ``value * weight`` (``weight`` counts how many times the value occurs).

    Example:
        >>> import torch
        >>> s = Sum()
        >>> s.compute(s.update(s.update(s.init(), torch.tensor(2.0)), torch.tensor(3.0)))
        tensor(5., dtype=torch.float64)
    """

    def init(self, like: Tensor | None = None) -> SumState:
        """Zero state on ``like``'s device (CPU when ``like`` is None)."""
        return SumState(_full(0.0, like))

    def update(self, acc: SumState, value: Tensor, weight: Tensor | int | float = 1) -> SumState:
        """Add ``value * weight``."""
        v = _as_value(value, acc.total.dtype)
        if isinstance(weight, Tensor):
            return SumState(acc.total + v * weight.detach().to(acc.total.dtype))
        return SumState(torch.add(acc.total, v, alpha=weight))

    def merge(self, a: SumState, b: SumState) -> SumState:
        """Sum of both."""
        return SumState(a.total + b.total)

    def compute(self, acc: SumState) -> Tensor:
        """The sum."""
        return acc.total


@dataclasses.dataclass(frozen=True)
class _Extremum:
    """Running elementwise extremum; ``weight`` is ignored."""

    _fill: ClassVar[float]
    _op: ClassVar[Callable[[Tensor, Tensor], Tensor]]

    def init(self, like: Tensor | None = None) -> ExtremumState:
        """The neutral value (``-inf`` for Max, ``+inf`` for Min) on ``like``'s device."""
        return ExtremumState(_full(self._fill, like))

    def update(self, acc: ExtremumState, value: Tensor, weight: Tensor | int | float = 1) -> ExtremumState:
        """Extremum of the state and ``value``."""
        return ExtremumState(type(self)._op(acc.value, _as_value(value, acc.value.dtype)))

    def merge(self, a: ExtremumState, b: ExtremumState) -> ExtremumState:
        """Extremum of both."""
        return ExtremumState(type(self)._op(a.value, b.value))

    def compute(self, acc: ExtremumState) -> Tensor:
        """The extremum."""
        return acc.value


@dataclasses.dataclass(frozen=True)
class Max(_Extremum):
    """Running maximum (elementwise); ``weight`` is ignored; ``-inf`` before any update.

    Example:
        >>> import torch
        >>> m = Max()
        >>> m.compute(m.update(m.update(m.init(), torch.tensor(2.0)), torch.tensor(-1.0)))
        tensor(2., dtype=torch.float64)
    """

    _fill = float("-inf")
    _op = torch.maximum


@dataclasses.dataclass(frozen=True)
class Min(_Extremum):
    """Running minimum (elementwise); ``weight`` is ignored; ``+inf`` before any update.

    Example:
        >>> import torch
        >>> m = Min()
        >>> m.compute(m.update(m.update(m.init(), torch.tensor(2.0)), torch.tensor(-1.0)))
        tensor(-1., dtype=torch.float64)
    """

    _fill = float("inf")
    _op = torch.minimum


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """Fraction of correct predictions: ``update(acc, logits_or_preds, targets)``.

    When the first argument has one more dimension than ``targets`` it holds logits (or
    probabilities) and the prediction is ``argmax(-1)``; otherwise it holds predictions and is
    compared to ``targets`` elementwise (for binary logits pass ``logits > 0``). Counts are
    int64; ``compute`` returns ``correct / total`` in float64 (``nan`` before any update).

    Example:
        >>> import torch
        >>> a = Accuracy()
        >>> acc = a.update(a.init(), torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        >>> a.compute(acc)
        tensor(0.5000, dtype=torch.float64)
    """

    def init(self, like: Tensor | None = None) -> AccuracyState:
        """Zero counts on ``like``'s device (CPU when ``like`` is None)."""
        device = _device(like)
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return AccuracyState(zero, zero)

    def update(self, acc: AccuracyState, preds: Tensor, targets: Tensor) -> AccuracyState:
        """Count ``preds == targets`` (after ``argmax(-1)`` when ``preds`` are logits)."""
        preds, targets = preds.detach(), targets.detach()
        if preds.dim() == targets.dim() + 1:
            preds = preds.argmax(-1)
        elif preds.shape != targets.shape:
            raise ConfigError(
                f"Accuracy.update: predictions of shape {tuple(preds.shape)} do not match targets of "
                f"shape {tuple(targets.shape)}; pass logits with one extra last dimension or "
                "predictions of the targets' shape."
            )
        correct = (preds == targets).sum()
        return AccuracyState(acc.correct + correct, acc.total + targets.numel())

    def merge(self, a: AccuracyState, b: AccuracyState) -> AccuracyState:
        """Add the counts."""
        return AccuracyState(a.correct + b.correct, a.total + b.total)

    def compute(self, acc: AccuracyState) -> Tensor:
        """``correct / total``."""
        return acc.correct.to(torch.float64) / acc.total
