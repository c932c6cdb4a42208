"""The accumulator of a step's metrics dict: one pure metric state per name, as the driver
reduces the metrics of a logging window or of a whole evaluation loader.

Example:
    >>> import torch
    >>> acc = Accumulator()
    >>> accs = acc.update(acc.init(), {"loss": torch.tensor(1.0)}, batch_size=3)
    >>> acc.compute(acc.update(accs, {"loss": torch.tensor(3.0)}, batch_size=1))["loss"]
    tensor(1.5000, dtype=torch.float64)
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fnloop.errors import ConfigError

from fnloop.metrics.metric import Max, Mean, MeanState, Metric, Min, Sum

__all__ = ["Accumulator", "DEFAULT_REDUCTIONS"]


DEFAULT_REDUCTIONS: Mapping[str, Metric] = {"*_max": Max(), "*_min": Min(), "*_sum": Sum()}
"""Name patterns every :class:`Accumulator` knows, after the ones it is given."""

@dataclasses.dataclass(frozen=True)
class Accumulator:
    """Reduces the ``metrics`` dict of every step into one value per name (pure and functional).

    Each name is reduced by the first rule that matches: an exact name in ``reductions``, then
    the glob patterns of ``reductions`` in order (``"val_*"``), then :data:`DEFAULT_REDUCTIONS`
    (``*_max`` -> :class:`Max`, ``*_min`` -> :class:`Min`, ``*_sum`` -> :class:`Sum`), then
    ``default``: a :class:`Mean` weighted by batch size, like Lightning's ``self.log``. Sum, Max
    and Min reduce the values as logged (weight 1). A value given as a tuple is unpacked into
    the metric's ``update`` (``{"acc": (logits, targets)}`` with an :class:`Accuracy` rule).

    States are a plain ``dict[str, state]`` pytree; a name that first appears mid-window starts
    its state at that update, and :meth:`merge` keeps names present on either side.

    Args:
        reductions: ``{name or glob pattern: Metric}``.
        default: the metric for names no rule matches.

    Example:
        >>> import torch
        >>> acc = Accumulator({"lr": Max()})
        >>> accs = acc.update(acc.init(), {"lr": torch.tensor(0.5), "x_max": torch.tensor(2.0)}, 4)
        >>> {k: v.tolist() for k, v in acc.compute(accs).items()}
        {'lr': 0.5, 'x_max': 2.0}
    """

    reductions: Mapping[str, Metric] | None = None
    default: Metric = dataclasses.field(default_factory=Mean)
    _cache: dict[str, Metric] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for key, metric in {**(self.reductions or {}), "default": self.default}.items():
            if not all(callable(getattr(metric, m, None)) for m in ("init", "update", "merge", "compute")):
                raise ConfigError(
                    f"Accumulator: the reduction for {key!r} is {metric!r}, which is not a metric; "
                    "give an object with init/update/merge/compute such as fnloop.metrics.Mean()."
                )

    def metric_for(self, name: str) -> Metric:
        """The metric that reduces ``name``.

        Example:
            >>> type(Accumulator().metric_for("grad_norm_max")).__name__
            'Max'
        """
        metric = self._cache.get(name)
        if metric is None:
            metric = self._resolve(name)
            self._cache[name] = metric
        return metric

    def _resolve(self, name: str) -> Metric:
        rules = dict(self.reductions or {})
        if name in rules:
            return rules[name]
        for table in (rules, DEFAULT_REDUCTIONS):
            for pattern, metric in table.items():
                if fnmatch.fnmatchcase(name, pattern):
                    return metric
        return self.default

    def init(self) -> dict[str, Any]:
        """An empty window: ``{}`` (states are created when a name first appears).

        Example:
            >>> Accumulator().init()
            {}
        """
        return {}

    def update(
        self, accs: Mapping[str, Any], metrics: Mapping[str, Any], batch_size: int | Tensor
    ) -> dict[str, Any]:
        """Fold one step's ``metrics`` into ``accs``; returns a new dict, ``accs`` is untouched.

        Batch-weighted means of names already present are updated with two ``torch._foreach_*``
        calls over all names at once; no value is read back to the host.

        Example:
            >>> import torch
            >>> acc = Accumulator()
            >>> accs = acc.update({}, {"loss": torch.tensor(2.0)}, batch_size=8)
            >>> acc.compute(accs)["loss"]
            tensor(2., dtype=torch.float64)
        """
        out = dict(accs)
        names: list[str] = []
        totals: list[Tensor] = []
        weights: list[Tensor] = []
        values: list[Tensor] = []
        for name, value in metrics.items():
            metric = self.metric_for(name)
            state = accs.get(name)
            batch_weighted = isinstance(metric, Mean)
            if isinstance(value, tuple):
                if state is None:
                    state = metric.init(like=value[0] if isinstance(value[0], Tensor) else None)
                out[name] = metric.update(state, *value)
                continue
            if not isinstance(value, Tensor):
                value = torch.as_tensor(value)
            if type(metric) is Mean and state is not None:
                names.append(name)
                totals.append(state.total)
                weights.append(state.weight)
                values.append(value.detach())
                continue
            if state is None:
                state = metric.init(like=value)
            out[name] = metric.update(state, value, batch_size if batch_weighted else 1)
        if names:
            new_totals, new_weights = _mean_updates(totals, weights, values, batch_size)
            for name, total, weight in zip(names, new_totals, new_weights):
                out[name] = MeanState(total, weight)
        return out

    def merge(self, a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
        """Combine two windows (e.g. from two ranks); names on one side only are kept as is.

        Example:
            >>> import torch
            >>> acc = Accumulator()
            >>> a = acc.update({}, {"loss": torch.tensor(1.0)}, 1)
            >>> b = acc.update({}, {"loss": torch.tensor(4.0)}, 3)
            >>> acc.compute(acc.merge(a, b))["loss"]
            tensor(3.2500, dtype=torch.float64)
        """
        out = dict(a)
        for name, state in b.items():
            out[name] = self.metric_for(name).merge(out[name], state) if name in out else state
        return out

    def compute(self, accs: Mapping[str, Any]) -> dict[str, Tensor]:
        """``{name: tensor}`` for every name seen in the window.

        Example:
            >>> Accumulator().compute({})
            {}
        """
        return {name: self.metric_for(name).compute(state) for name, state in accs.items()}


def _mean_updates(
    totals: list[Tensor], weights: list[Tensor], values: list[Tensor], batch_size: int | Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """``totals + values * batch_size`` and ``weights + batch_size`` over lists at once."""
    if isinstance(batch_size, Tensor):
        bs = batch_size.detach()
        new_totals = torch._foreach_add(totals, torch._foreach_mul(values, bs))
        new_weights = torch._foreach_add(weights, [bs] * len(weights))
    else:
        new_totals = torch._foreach_add(totals, values, alpha=batch_size)
        new_weights = torch._foreach_add(weights, batch_size)
    return list(new_totals), list(new_weights)
