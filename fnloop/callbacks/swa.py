"""Stochastic Weight Averaging (Izmailov et al., 2018): Lightning's ``StochasticWeightAveraging``
callback, with everything it tracks kept in the state.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.swa_params(flo.sgd(lr=0.1)))
    >>> trainer = fl.Trainer(max_epochs=10, callbacks=[fl.StochasticWeightAveraging(swa_lrs=0.05)])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fnloop.callbacks.base import Callback, callback_state, with_callback_state
from fnloop.errors import ConfigError

__all__ = ["StochasticWeightAveraging"]


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check(
    swa_lrs: Any, swa_epoch_start: Any, annealing_epochs: Any, annealing_strategy: Any, avg_fn: Any, bn_forward: Any
) -> None:
    where = "StochasticWeightAveraging"
    lrs = list(swa_lrs) if isinstance(swa_lrs, (list, tuple)) else [swa_lrs]
    if not lrs or not all(_positive(lr) for lr in lrs):
        raise ConfigError(
            f"{where}(swa_lrs={swa_lrs!r}): accepted values are a positive float, or a list of positive floats "
            "(one per learning rate of the optimizer)"
        )
    start_ok = (
        isinstance(swa_epoch_start, int) and not isinstance(swa_epoch_start, bool) and swa_epoch_start >= 1
    ) or (isinstance(swa_epoch_start, float) and 0.0 <= swa_epoch_start <= 1.0)
    if not start_ok:
        raise ConfigError(
            f"{where}(swa_epoch_start={swa_epoch_start!r}): accepted values are an int >= 1 "
            "(the epoch, counted from 1) or a float in [0, 1] (a fraction of max_epochs)"
        )
    if isinstance(annealing_epochs, bool) or not isinstance(annealing_epochs, int) or annealing_epochs < 0:
        raise ConfigError(f"{where}(annealing_epochs={annealing_epochs!r}): accepted values are an int >= 0")
    if annealing_strategy not in ("cos", "linear"):
        raise ConfigError(f"{where}(annealing_strategy={annealing_strategy!r}): accepted values are 'cos' and 'linear'")
    for name, fn in (("avg_fn", avg_fn), ("bn_forward", bn_forward)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"{where}({name}={fn!r}): expected a function or None")


class StochasticWeightAveraging(Callback):
    """Average the weights of the last epochs and train them with SWA's learning rate, as
    Lightning's ``StochasticWeightAveraging`` (arguments of the same names and meaning).

    From epoch ``swa_start`` on (``swa_epoch_start`` counted from 1, or a fraction of
    ``max_epochs``: epoch ``int(swa_epoch_start * max_epochs)``), at the start of each epoch the
    learning rate in force (``ScaleByLearningRateState.lr`` in the optimizer state) takes the
    value ``torch.optim.swa_utils.SWALR`` gives it (:func:`fnloop.optim.swalr`: it anneals to
    ``swa_lrs`` over ``annealing_epochs`` epochs, then stays there; an optimizer whose ``lr`` is
    a schedule is set back to it after each update, as SWALR replaces the scheduler), and at the
    end of each epoch the params are folded into the average (:func:`fnloop.optim.swa_average`).
    When fit finishes all its epochs (or any time it finishes without ``max_epochs``), the
    averaged weights become the params and BatchNorm statistics are recomputed with one pass
    over the train data (:func:`fnloop.update_bn`).

    Everything lives in the state, so checkpoints hold it and a run resumes bitwise: the
    average and the number averaged in the optimizer state (build it with
    ``flo.swa_params(tx)``), SWA's learning rate and the epochs done in
    ``state.loop.callbacks["StochasticWeightAveraging"]``.

    Unlike Lightning, whose callback averages at the start of each epoch from ``swa_start``
    (the weights before that epoch, never those of the last one), the average is taken at the
    end of epochs ``swa_start`` to the last, as in torch's SWA recipe; and the BatchNorm pass
    needs no extra epoch.

    Args:
        swa_lrs: SWA's learning rate, or one per learning rate of the optimizer (per group of
            ``flo.multi_transform``, in :func:`fnloop.optim.learning_rates` order).
        swa_epoch_start: an int >= 1 (the epoch, counted from 1) or a float in [0, 1].
        annealing_epochs: epochs of annealing towards ``swa_lrs``.
        annealing_strategy: ``"cos"`` or ``"linear"``.
        avg_fn: ``avg_fn(averaged, current, num_averaged) -> Tensor``; default the equal average.
        bn_forward: ``bn_forward(model, batch)`` for the BatchNorm pass; default torch's
            ``model(batch[0])`` (or ``model(batch)`` for a batch that is not a list or tuple).

    Example:
        >>> import fnloop as fl
        >>> fl.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=3).swa_start(max_epochs=10)
        2
    """

    def __init__(
        self,
        swa_lrs: float | Sequence[float],
        swa_epoch_start: int | float = 0.8,
        annealing_epochs: int = 10,
        annealing_strategy: str = "cos",
        avg_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        bn_forward: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        _check(swa_lrs, swa_epoch_start, annealing_epochs, annealing_strategy, avg_fn, bn_forward)
        self.swa_lrs = [float(x) for x in swa_lrs] if isinstance(swa_lrs, (list, tuple)) else float(swa_lrs)
        self.swa_epoch_start = swa_epoch_start
        self.annealing_epochs = annealing_epochs
        self.annealing_strategy = annealing_strategy
        self.avg_fn = avg_fn
        self.bn_forward = bn_forward
        self._max_epochs: int | None = None  # what the fit loop reports (on_fit_configured)
        self._train_source: Any = None

    # --- the epochs, from the fit's max_epochs ---------------------------------------------------

    def swa_start(self, max_epochs: int | None) -> int:
        """The first SWA epoch (0-based), as Lightning computes it.

        Example:
            >>> StochasticWeightAveraging(0.1).swa_start(max_epochs=10)
            7
        """
        start = self.swa_epoch_start
        if isinstance(start, float):
            if max_epochs is None or max_epochs < 0:
                raise ConfigError(
                    f"StochasticWeightAveraging(swa_epoch_start={start!r}): a fraction of max_epochs needs "
                    "Trainer(max_epochs=...); give the epoch as an int instead"
                )
            start = int(max_epochs * start)
        return max(start - 1, 0)

    def swa_end(self, max_epochs: int | None) -> float:
        """The last SWA epoch (0-based; infinity without ``max_epochs``)."""
        return math.inf if max_epochs is None or max_epochs < 0 else max_epochs - 1

    def on_fit_configured(self, max_epochs: int, train_source: Any) -> None:
        """Called by the fit loop before ``setup`` with the fit's ``max_epochs`` and train source."""
        self._max_epochs, self._train_source = max_epochs, train_source

    def _in_swa(self, epoch: int) -> bool:
        return self.swa_start(self._max_epochs) <= epoch <= self.swa_end(self._max_epochs)

    # --- hooks -------------------------------------------------------------------------------------

    def on_fit_start(self, state: Any) -> Any:
        from fnloop.batch_norm import batch_norm_names
        from fnloop.optim.swa import learning_rates, swa_state

        where = "StochasticWeightAveraging"
        try:
            swa_state(state.opt_state)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        count = len(learning_rates(state.opt_state))
        wanted = len(self.swa_lrs) if isinstance(self.swa_lrs, list) else 1
        if count == 0 or (isinstance(self.swa_lrs, list) and wanted != count):
            raise ConfigError(
                f"{where}(swa_lrs={self.swa_lrs!r}): the optimizer state holds {count} learning rate(s) "
                "(flo.learning_rates); give one float, or one per learning rate"
            )
        self.swa_start(self._max_epochs)  # a fraction without max_epochs fails now, not mid-run
        if batch_norm_names(state.module) and self._train_source is None:
            raise ConfigError(
                f"{where}: the model has BatchNorm layers and this fit did not report its train data for the "
                "statistics pass (Trainer.fit calls on_fit_configured); run fl.update_bn(state, data) yourself"
            )
        return None

    def _target(self, state: Any) -> list[float] | None:
        record = callback_state(state, self.state_key, {})
        return record["lrs"] if record.get("lr_epoch") == state.loop.epoch else None

    def _sync(self, state: Any, lrs: list[float]) -> Any:
        """The state with its learning rates set to ``lrs`` (the same state when they already are)."""
        from fnloop.optim.swa import learning_rates, with_learning_rates

        if [float(lr) for lr in learning_rates(state.opt_state)] == lrs:
            return state
        return state.replace(opt_state=with_learning_rates(state.opt_state, lrs))

    def on_train_epoch_start(self, state: Any) -> Any:
        from fnloop.optim.swa import learning_rates, swalr

        epoch = state.loop.epoch
        if not self._in_swa(epoch):
            return None
        record = callback_state(state, self.state_key, {})
        if record.get("lr_epoch", -1) < epoch:  # SWALR's step of this epoch (0 at swa_start)
            step = record["lr_step"] + 1 if "lrs" in record else 0
            current = record["lrs"] if "lrs" in record else [float(lr) for lr in learning_rates(state.opt_state)]
            swa = self.swa_lrs if isinstance(self.swa_lrs, list) else [self.swa_lrs] * len(current)
            lrs = [
                swalr(lr, s, step, anneal_epochs=self.annealing_epochs, anneal_strategy=self.annealing_strategy)
                for lr, s in zip(current, swa)
            ]
            record.update(lrs=lrs, lr_epoch=epoch, lr_step=step)
            state = with_callback_state(state, self.state_key, record)
        return self._sync(state, record["lrs"])

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> Any:
        lrs = self._target(state)
        return None if lrs is None else self._sync(state, lrs)

    def on_train_epoch_end(self, state: Any) -> Any:
        from fnloop.optim.swa import swa_average

        epoch = state.loop.epoch
        record = callback_state(state, self.state_key, {})
        if not self._in_swa(epoch) or record.get("avg_epoch", -1) >= epoch:
            return None
        record["avg_epoch"] = epoch
        state = state.replace(opt_state=swa_average(state.opt_state, state.params, avg_fn=self.avg_fn))
        return with_callback_state(state, self.state_key, record)

    def on_train_end(self, state: Any) -> Any:
        from fnloop.batch_norm import update_bn
        from fnloop.optim.swa import swa_state

        found = swa_state(state.opt_state)
        done = state.loop.epoch > self.swa_end(self._max_epochs) or self._max_epochs is None or self._max_epochs < 0
        if not done or int(found.n_averaged) == 0:
            return None
        params = {**state.params, **{k: v.detach().clone() for k, v in found.avg.items()}}
        state = state.replace(params=params)
        if self._train_source is not None:
            state = update_bn(state, self._train_source, forward=self.bn_forward, epoch=state.loop.epoch)
        return state
