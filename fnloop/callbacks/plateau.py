"""Step :func:`fnloop.optim.reduce_on_plateau` with a monitored validation metric.

Example:
    >>> import fnloop as fl, fnloop.optim as flo
    >>> tx = flo.chain(flo.adam(lr=1e-3), flo.reduce_on_plateau(1e-3, factor=0.5, patience=2))
    >>> trainer = fl.Trainer(callbacks=[fl.ReduceLROnPlateau("val/loss")])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fnloop.callbacks.base import Callback
from fnloop.errors import ConfigError

__all__ = ["ReduceLROnPlateau"]


class ReduceLROnPlateau(Callback):
    """After each validation run, feed ``metrics[monitor]`` to the optimizer's
    :func:`~fnloop.optim.reduce_on_plateau` (the state it returns holds the new LR), as
    Lightning steps a monitored scheduler once per validation epoch.

    Args:
        monitor: the metric, e.g. ``"val/loss"``.

    Example:
        >>> import fnloop as fl
        >>> fl.ReduceLROnPlateau("val/loss").monitor
        'val/loss'
    """

    def __init__(self, monitor: str = "val/loss") -> None:
        self.monitor = monitor

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> Any:
        from fnloop.optim.plateau import plateau_step

        if self.monitor not in metrics:
            raise ConfigError(
                f"ReduceLROnPlateau(monitor={self.monitor!r}): no such validation metric; available: {sorted(metrics)}"
            )
        return state.replace(opt_state=plateau_step(state.opt_state, metrics[self.monitor]))

    def log(self, state: Any) -> Mapping[str, float]:
        from fnloop.optim.plateau import plateau_lr

        return {"lr-plateau": float(plateau_lr(state.opt_state))}
