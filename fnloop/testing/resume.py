"""Checking that a run interrupted and resumed ends exactly where an uninterrupted run does.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> from fnloop.testing import assert_resume_equivalent
    >>> data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(6)]
    >>> def make():  # the same initial weights on every call
    ...     torch.manual_seed(0)
    ...     return fl.TrainState.create(torch.nn.Linear(3, 1), flo.adam(lr=1e-2), seed=0)
    >>> step = fl.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    >>> trainer = fl.Trainer(max_epochs=2, enable_progress_bar=False, enable_model_summary=False)
    >>> final = assert_resume_equivalent(trainer, make, step, data, interrupt_at=[3, 8])
    >>> final.loop.status
    'finished'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from fnloop.callbacks.base import Callback
from fnloop.testing.asserts import assert_trees_equal

__all__ = ["assert_resume_equivalent"]


class _InterruptAt(Callback):
    """Raises KeyboardInterrupt after the given total batch index (an interrupted run)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> Any:
        if state.loop.total_batch_idx == self.at:
            raise KeyboardInterrupt
        return None


def _data(state: Any) -> dict[str, Any]:
    """The state's leaves by field, without its static module and optimizer (fresh objects per run)."""
    fields = ("epoch", "batch_idx", "total_batch_idx", "global_step", "samples_seen", "val_count", "stop")
    loop = {f: getattr(state.loop, f) for f in fields}
    loop["options"] = list(state.loop.options.tensors)  # an open accumulation window, skip counters
    return {"step": state.step, "params": state.params, "buffers": state.buffers, "opt_state": state.opt_state, "rng": state.rng, "loop": loop}


def assert_resume_equivalent(
    trainer: Any,
    make_state: Callable[[], Any],
    train_step: Any,
    train_data: Any,
    *,
    interrupt_at: Iterable[int],
    **fit_kwargs: Any,
) -> Any:
    """Fit once without interruption; then, for each batch count in ``interrupt_at``, fit a fresh
    state interrupted after that many training batches, resume with ``fit`` on the returned
    state, and assert every leaf of the final state (step, params, buffers, optimizer state,
    RNG, loop counters) is bitwise equal to the uninterrupted run. Returns that run's state.

    Args:
        trainer: the ``fl.Trainer`` (its callbacks are kept; an interrupting one is added).
        make_state: builds the same fresh ``TrainState`` on every call.
        train_step: the train step.
        train_data: the training data (re-iterable, deterministic order for a given seed).
        interrupt_at: total training batches after which to interrupt (each must be reached).
        **fit_kwargs: more arguments for ``fit`` (``val_step``, ``val_data``, ...).
    """
    import dataclasses

    reference = trainer.fit(make_state(), train_step, train_data, **fit_kwargs)
    for at in interrupt_at:
        interrupting = dataclasses.replace(trainer, callbacks=[*trainer.callback_list, _InterruptAt(at)])
        stopped = interrupting.fit(make_state(), train_step, train_data, **fit_kwargs)
        if stopped.loop.status != "interrupted":
            raise AssertionError(
                f"assert_resume_equivalent: the run was not interrupted at batch {at} "
                f"(it ended with status {stopped.loop.status!r} after {stopped.loop.total_batch_idx} batches)"
            )
        resumed = trainer.fit(stopped, train_step, train_data, **fit_kwargs)
        assert_trees_equal(_data(resumed), _data(reference), msg=f"resumed after an interruption at batch {at}")
    return reference
