"""The learning-rate finder (Lightning's ``Tuner.lr_find``): train on copies of the state while
the LR grows from ``min_lr`` to ``max_lr``, record the smoothed loss, suggest the LR where it
falls fastest. The caller's state is never changed.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> data = [(torch.randn(16, 3), torch.randn(16, 1)) for _ in range(4)]
    >>> state = fl.TrainState.create(torch.nn.Linear(3, 1), flo.sgd(lr=0.1))
    >>> loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
    >>> result = lr_find(state, loss, data, optimizer=lambda lr: flo.sgd(lr=lr), num_training=20)
    >>> len(result.lrs) == len(result.losses) <= 20, result.lrs[0]
    (True, 1e-08)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from fnloop.errors import ConfigError
from fnloop.types import LossFn

__all__ = ["LRFinderResult", "lr_find"]


@dataclasses.dataclass(frozen=True)
class LRFinderResult:
    """The sweep: the LR of every step, the smoothed loss after it, and the suggested LR (None
    when the curve is too short)."""

    lrs: list[float]
    losses: list[float]
    suggestion: float | None

    def plot(self, path: str, *, show_suggestion: bool = True) -> str:
        """Save loss against LR (log scale) as a PNG with matplotlib (``pip install matplotlib``).

        Example:
            >>> LRFinderResult([1e-3], [1.0], None).plot  # doctest: +ELLIPSIS
            <bound method LRFinderResult.plot of ...>
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ConfigError("LRFinderResult.plot needs matplotlib: pip install matplotlib") from None
        fig, ax = plt.subplots()
        try:
            ax.plot(self.lrs, self.losses)
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("loss (smoothed)")
            if show_suggestion and self.suggestion is not None:
                i = self.lrs.index(self.suggestion)
                ax.plot([self.suggestion], [self.losses[i]], "o", color="red", label=f"suggested {self.suggestion:.3g}")
                ax.legend()
            fig.savefig(path, format="png")
        finally:
            plt.close(fig)
        return path


def _suggest(lrs: list[float], losses: list[float], skip_begin: int, skip_end: int) -> float | None:
    """The LR at the steepest descent of the loss (``argmin`` of its gradient), as Lightning picks it."""
    kept = [(lr, loss) for lr, loss in list(zip(lrs, losses))[skip_begin : len(losses) - skip_end] if math.isfinite(loss)]
    if len(kept) < 2:
        return None
    (grad,) = torch.gradient(torch.tensor([loss for _, loss in kept], dtype=torch.float64))
    return kept[int(grad.argmin())][0]


def lr_find(
    state: Any,
    loss_fn: LossFn,
    data: Any,
    *,
    optimizer: Callable[[Any], Any],
    min_lr: float = 1e-8,
    max_lr: float = 1.0,
    num_training: int = 100,
    mode: str = "exponential",
    early_stop_threshold: float | None = 4.0,
    beta: float = 0.98,
    skip_begin: int = 10,
    skip_end: int = 1,
) -> LRFinderResult:
    """Sweep the learning rate over ``num_training`` train steps on a copy of ``state``.

    Args:
        state: a :class:`fnloop.TrainState`; its weights are the starting point, it is not changed.
        loss_fn: as for :func:`fnloop.train_step`.
        data: batches (a list, a DataLoader or any re-iterable); cycled when shorter than the sweep.
        optimizer: ``lr -> GradientTransformation`` (e.g. ``lambda lr: flo.adamw(lr=lr)``); it is
            given the sweep as a schedule.
        min_lr: the first LR.
        max_lr: the last LR.
        num_training: steps in the sweep.
        mode: ``"exponential"`` or ``"linear"`` growth.
        early_stop_threshold: stop once the smoothed loss exceeds this multiple of the best one
            (None: never).
        beta: smoothing of the loss (``avg = beta * avg + (1 - beta) * loss``, bias-corrected).
        skip_begin: points ignored at the start when suggesting.
        skip_end: points ignored at the end when suggesting.
    """
    import fnloop.optim as flo
    from fnloop.step import train_step

    if mode not in ("exponential", "linear"):
        raise ConfigError(f"lr_find(mode={mode!r}): accepted values are 'exponential' and 'linear'")
    if not 0 < min_lr < max_lr:
        raise ConfigError(f"lr_find(min_lr={min_lr}, max_lr={max_lr}): need 0 < min_lr < max_lr")
    if num_training < 2:
        raise ConfigError(f"lr_find(num_training={num_training}): need at least 2 steps")
    last = num_training - 1
    if mode == "exponential":
        schedule = flo.exponential(min_lr, (max_lr / min_lr) ** (1 / last))
    else:
        schedule = flo.linear(min_lr, max_lr, last)
    tx = optimizer(schedule)
    trainable = {n: state.params[n] for n in _trainable(state)}
    probe = state.replace(step=torch.zeros_like(state.step), opt_state=tx.init(trainable), tx=tx)
    step = train_step(loss_fn)
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    batches = _cycle(data)
    for i in range(num_training):
        lrs.append(float(schedule(i)))
        probe, metrics = step(probe, next(batches))
        avg = beta * avg + (1 - beta) * float(metrics["loss"])
        smoothed = avg / (1 - beta ** (i + 1))
        losses.append(smoothed)
        best = min(best, smoothed)
        if early_stop_threshold is not None and i > 0 and (not math.isfinite(smoothed) or smoothed > early_stop_threshold * best):
            break
    return LRFinderResult(lrs, losses, _suggest(lrs, losses, skip_begin, skip_end))


def _trainable(state: Any) -> list[str]:
    from fnloop.state import trainable

    return trainable(state.module)


def _cycle(data: Any) -> Any:
    from fnloop.connectors.data import as_source

    source = as_source(data, name="data")
    epoch = 0
    while True:
        empty = True
        for batch in source.batches(epoch, 0):
            empty = False
            yield batch
        if empty:
            raise ConfigError("lr_find: the data has no batches")
        epoch += 1
