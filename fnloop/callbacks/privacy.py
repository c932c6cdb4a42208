"""Report the privacy spent by DP-SGD (``flo.dp_sgd``) in the logs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fnloop.callbacks.base import Callback
from fnloop.errors import ConfigError

__all__ = ["PrivacyMonitor"]


class PrivacyMonitor(Callback):
    """Logs ``epsilon`` (RDP accountant, :mod:`fnloop.privacy`) at ``delta`` at every logging
    boundary, from the DP steps counted in the optimizer state and its noise multiplier.

    Args:
        sample_rate: the probability an example is in a batch (batch size / dataset size).
        delta: the delta of the (epsilon, delta) guarantee.
        key: the logged name.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.dp_sgd(lr=0.1, max_grad_norm=1.0, noise_multiplier=1.1))
        >>> fl.PrivacyMonitor(sample_rate=0.01).log(state)
        {'epsilon': 0.0}
    """

    def __init__(self, sample_rate: float, delta: float = 1e-5, key: str = "epsilon") -> None:
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"PrivacyMonitor: sample_rate must be in (0, 1], got {sample_rate!r}")
        if not 0 < delta < 1:
            raise ConfigError(f"PrivacyMonitor: delta must be in (0, 1), got {delta!r}")
        self.sample_rate, self.delta, self.key = float(sample_rate), float(delta), key

    def log(self, state: Any) -> Mapping[str, float]:
        from fnloop import privacy
        from fnloop.optim.dp import dp_state

        found = dp_state(state.opt_state)
        if found is None:
            return {}
        steps = int(found.count)
        if steps == 0:
            return {self.key: 0.0}
        return {self.key: privacy.epsilon(float(found.noise_multiplier), self.sample_rate, steps, self.delta)}
