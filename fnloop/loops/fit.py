"""The fit loop: pure steps composed with Lightning's loop rules; every counter in ``state.loop``.

The loop reads top to bottom like a hand-written one: ``run_fit`` resolves the run, ``_fit``
runs epochs between the fit's hooks, ``_epoch`` runs batches, ``_batch`` runs one step between
its hooks, ``_agreed`` decides with the other ranks whether to go on. Effects (logging, progress,
checkpoint files, signals) happen here and nowhere else; the steps stay pure.

The state flows as a value: ``_epoch`` and ``_batch`` return the last state they reached with how
they ended (an exception included), so that ``_fit``'s one handler finishes an interrupted fit,
or reports a failure to ``on_exception``, with the newest state.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from fnloop.connectors.datamodule import resolve_datamodule
from fnloop.connectors.device import device_of
from fnloop.errors import ConfigError, FnloopError, StepError
from fnloop.execution import check_not_donated, mark_donated
from fnloop.loops import rules
from fnloop.loops.data import batches_on, data_seed, limited, make_source, require
from fnloop.loops.evaluate import eval_loaders
from fnloop.loops.hooks import guarded
from fnloop.loops.prepare import checkpoint_of, deterministic, restore, with_flags
from fnloop.loops.ranks import params_dtype
from fnloop.loops.run import FitRun, with_loop
from fnloop.optim.grad_norms import grad_norms
from fnloop.state import Status

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from fnloop.loops.config import LoopConfig
    from fnloop.state import TrainState
    from fnloop.types import EvalStepFn, StepFn

__all__ = ["run_fit"]

_STOP, _INTERRUPT, _EMPTY = "stop", "interrupt", "empty"
"""How an epoch or a batch ended early: a stop (``max_steps``, ``max_time``, a callback's request),
a stop signal, an epoch without batches. An exception raised inside one is returned as well."""


def run_fit(
    config: LoopConfig,
    state: TrainState,
    train_step: StepFn,
    train_data: Any,
    *,
    val_step: EvalStepFn | Sequence[EvalStepFn] | Mapping[str, EvalStepFn] | None = None,
    val_data: Any = None,
    datamodule: Any = None,
    ckpt_path: str | None = None,
    checkpoint: Any = None,
) -> Any:
    """``Trainer.fit`` under the values of ``config`` (``Trainer.config``): see ``Trainer.fit``."""
    from fnloop.connectors.accelerator import setup
    from fnloop.connectors.signals import stop_signals
    from fnloop.state import TrainState

    if not isinstance(state, TrainState):
        raise ConfigError(f"Trainer.fit: state must be a fnloop.TrainState, got {type(state).__name__}")
    check_not_donated(state, "Trainer.fit")
    from fnloop.loops.members import for_state  # a stacked state: steps over its members (fl.vmap)

    train_step = for_state(state, train_step, what="Trainer.fit")
    val_step = for_state(state, val_step, what="Trainer.fit(val_step)")
    parallel, state, options = setup(config, state, train_step)
    train_step = with_flags(train_step, options)
    seed = data_seed(config.seed, state)

    def sources() -> tuple[Any, list[Any]]:
        """The train source and val loaders, from the datamodule again when asked."""
        wanted = train_data is None or (val_step is not None and val_data is None)
        built = resolve_datamodule(datamodule, "fit") if datamodule is not None and wanted else {}
        train = require(
            train_data if train_data is not None else built.get("train_data"),
            "train_data", "pass train_data= or a datamodule with train_data()",
        )
        val = (val_data if val_data is not None else built.get("val_data")) if val_step is not None else None
        shard = dict(parallel=parallel, shard=config.use_distributed_sampler)
        train_src = make_source(train, seed=seed, stage="train", no_shuffle=bool(config.overfit_batches), **shard)
        return train_src, (eval_loaders(val, val_step, seed=seed, stage="val", **shard) if val is not None else [])

    train_src, val_loaders = sources()
    run = FitRun(config, train_step, val_loaders, train_src, checkpoint_of(config, checkpoint), parallel)
    reloadable = datamodule is not None and train_data is None and config.reload_dataloaders_every_n_epochs > 0
    run.reload = sources if reloadable else None
    with stop_signals(config.stop_signals) as signals, deterministic(config.deterministic):
        return _fit(run, state, signals, ckpt_path)


def _fit(run: FitRun, state: Any, signals: Any, ckpt_path: str | None) -> Any:
    """Setup, restore, sanity check, then epochs of batches; an interruption finishes cleanly
    (``on_fit_end`` saves), a failure calls ``on_exception`` with the last state reached."""
    hooks = run.hooks
    caller = state if ckpt_path is None else None  # a donating fit updates the caller's tensors in place
    hooks.notify("on_fit_configured", run.config.max_epochs, run.train_src)  # what StochasticWeightAveraging needs of the fit
    state = restore(hooks("setup", state, "fit"), ckpt_path, run.checkpoint, hooks)
    train = _train_of(run, state, caller)
    fresh = state.loop.global_step == 0 and state.loop.batch_idx == 0 and state.loop.epoch == 0
    try:
        state = with_loop(state, status=Status.RUNNING)
        run.logger.log_hparams(run.hparams())
        state = hooks("on_fit_start", state)
        if fresh and run.val_loaders:
            state = run.sanity_check(state)
        state = hooks("on_train_start", state)
        if state.loop.val_pending and run.val_loaders:  # interrupted right before a validation
            state = run.validate(state)
        while not run.done(state):
            if state.loop.stop and run.can_stop(state, state.loop.epoch):
                break
            state, end = _epoch(run, train, state, signals)
            if isinstance(end, BaseException):
                raise end  # here, where the handlers below hold the state the epoch reached
            if end is _INTERRUPT:  # the step is done: save (ModelCheckpoint.on_fit_end) and return
                return _finish(run, with_loop(state, status=Status.INTERRUPTED))
            if end is not None:  # a stop, or an epoch without batches (no epoch would make progress)
                break
        state = hooks("on_train_end", with_loop(state, status=Status.FINISHED))
        return _finish(run, state)
    except KeyboardInterrupt:
        return _finish(run, with_loop(state, status=Status.INTERRUPTED))
    except BaseException as exc:
        _fail(run, state, exc)
        raise


def _epoch(run: FitRun, train: _Train, state: Any, signals: Any) -> tuple[Any, Any]:
    """One epoch (or its rest, on resume): its batches, then its end when they all ran. Never
    raises: returns the last state reached and how the epoch ended: None (it ran to its end or
    the data ended), ``_STOP``, ``_INTERRUPT``, ``_EMPTY`` (no batches), or the exception raised."""
    end: Any = None
    try:
        plan = _plan(run, state.loop.epoch)
        state = run.hooks("on_train_epoch_start", state)
        batch_idx = first = state.loop.batch_idx
        t0 = time.perf_counter()
        for batch in batches_on(run.train_src, plan.epoch, first, plan.n, train.device, train.dtype):
            run.times["data"] += time.perf_counter() - t0
            state, end = _batch(run, train, plan, state, batch, batch_idx, signals)
            batch_idx += 1
            if end is _STOP:
                break
            if end is not None:
                return state, end
            t0 = time.perf_counter()
        if (plan.n is None and end is None) or (plan.n is not None and batch_idx >= plan.n):  # the epoch is complete
            state = run.flush_window(state, epoch_end=True)
            state = run.hooks("on_train_epoch_end", state)
            state = with_loop(state, epoch=plan.epoch + 1, batch_idx=0)
        if batch_idx == first == 0 and end is None:  # an epoch without batches
            return state, _INTERRUPT if signals.requested else _EMPTY
        return state, end
    except BaseException as exc:
        return state, exc


def _batch(run: FitRun, train: _Train, plan: _Plan, state: Any, batch: Any, batch_idx: int, signals: Any) -> tuple[Any, Any]:
    """One training batch: the step between its hooks, the counters, logging and validation when
    due, then the ranks' agreement on stopping. Never raises: returns the state reached and None
    (go on), ``_STOP``, ``_INTERRUPT`` or the exception raised."""
    hooks, t1 = run.hooks, time.perf_counter()
    try:
        if train.batch_start:
            state = hooks("on_train_batch_start", state, batch, batch_idx)
        signals.defer = train.donating  # a Ctrl-C must not cut an in-place update short
        state, metrics = _step(train.step, state, batch, batch_idx, plan.epoch)
        signals.defer = False
        if train.caller is not None:  # its tensors now belong to the new state
            mark_donated(train.caller)
        run.times["step"] += time.perf_counter() - t1
        size = run.train_src.batch_size_of(batch)
        stepped = rules.is_optimizer_step(batch_idx, n_batches=plan.n, accumulate=run.accumulate)
        if stepped and train.flush is not None and plan.n is not None and batch_idx + 1 == plan.n:
            state = train.flush(state)  # Lightning steps on a partial accumulation window
        if stepped and train.before_opt:
            state = hooks("on_before_optimizer_step", state, grad_norms(state.opt_state))
        loop = state.loop
        validate = plan.validates_after(batch_idx, loop.total_batch_idx)
        state = with_loop(
            state, batch_idx=batch_idx + 1, global_step=loop.global_step + stepped, samples_seen=loop.samples_seen + size,
            total_batch_idx=loop.total_batch_idx + 1, val_pending=validate,
        )
        if signals.deferred_interrupt:  # a second Ctrl-C arrived during the in-place step
            raise KeyboardInterrupt
        run.window.add(metrics, size, loop.global_step, plan.epoch)
        signals.defer = True  # the batch counts as done: a second Ctrl-C waits for its hooks
        state = hooks("on_train_batch_end", state, metrics)
        signals.defer = False
        if signals.deferred_interrupt:
            raise KeyboardInterrupt
        if stepped and state.loop.global_step % run.config.log_every_n_steps == 0:
            state = run.flush_window(state)
        if validate:
            state = run.validate(state)
        return _agreed(run, state, signals, plan.epoch)
    except BaseException as exc:
        return state, exc


def _agreed(run: FitRun, state: Any, signals: Any, epoch: int) -> tuple[Any, str | None]:
    """Whether fit goes on after this batch. The ranks decide together (one small all-reduce when
    distributed), so all stop at the same step: on a stop signal (``_INTERRUPT``), a spent budget
    or a stop a callback requested once ``min_epochs``/``min_steps`` allow it (``_STOP``)."""
    requested, budget, stop = run.parallel.agree(signals.requested, run.out_of_budget(state), state.loop.stop)
    if stop and not state.loop.stop:
        state = with_loop(state, stop=True)
    if requested:
        return state, _INTERRUPT
    if budget or (state.loop.stop and run.can_stop(state, epoch)):
        return state, _STOP
    return state, None


class _Train(NamedTuple):
    """What every training batch of one fit uses, resolved once."""

    step: StepFn  # the train step; its in-place form when the fit donates
    donating: bool
    caller: Any  # the caller's state, refused once a donated step updated its tensors (None: nothing to refuse)
    flush: Any  # closes a partial accumulation window (None: the step accumulates nothing)
    device: torch.device
    dtype: torch.dtype | None
    batch_start: bool  # a callback has on_train_batch_start
    before_opt: bool  # a callback has on_before_optimizer_step


def _train_of(run: FitRun, state: Any, caller: Any) -> _Train:
    """The batches' step (donating under ``Trainer(donate=True)``) and what they look up."""
    donating = run.config.donate and hasattr(run.train_step, "donated")
    # the first donated step updates the tensors the caller's state holds: refuse that object afterwards
    refused = caller if donating and caller is not None and caller.params is state.params else None
    return _Train(
        run.train_step.donated if donating else run.train_step, donating, refused, getattr(run.train_step, "flush", None),
        device_of(state.params), params_dtype(state),
        run.hooks.wants("on_train_batch_start"), run.hooks.wants("on_before_optimizer_step"),
    )


class _Plan(NamedTuple):
    """One epoch's batches and when validation runs in it."""

    epoch: int
    n: int | None  # batches of the epoch (None: until the data ends)
    check: int | float | None  # training batches between validation runs (None: no validation)
    every_n_epochs: int | None  # check_val_every_n_epoch

    def validates_after(self, batch_idx: int, total_batch_idx: int) -> bool:
        return self.check is not None and rules.should_validate(
            batch_idx, total_batch_idx=total_batch_idx, epoch=self.epoch, n_batches=self.n,
            check_batch=self.check, check_val_every_n_epoch=self.every_n_epochs,
        )


def _plan(run: FitRun, epoch: int) -> _Plan:
    """The plan of ``epoch``, on new data when ``reload_dataloaders_every_n_epochs`` asks."""
    config = run.config
    if run.reload is not None and epoch > 0 and epoch % config.reload_dataloaders_every_n_epochs == 0:
        run.train_src, run.val_loaders = run.reload()
    n = limited(run.train_src, epoch, config.limit("train"), "train")
    every = config.check_val_every_n_epoch
    check = rules.val_check_batch(n, config.val_check_interval, check_val_every_n_epoch=every) if run.val_batches(epoch) != 0 else None
    if run.bar is not None:
        run.bar.total = n
    return _Plan(epoch, n, check, every)


_PLAIN = (RuntimeError, ValueError, TypeError, IndexError, KeyError)
"""Errors of these exact classes raised by a step (a wrong-shaped batch, a dtype mismatch) become a
StepError naming the batch; other exceptions (a user's own class, out of memory) keep their type."""


def _step(step: StepFn, state: Any, batch: Any, batch_idx: int, epoch: int) -> tuple[Any, Any]:
    """``step(state, batch)``; its failure names the batch, epoch and global step."""
    try:
        return step(state, batch)
    except FnloopError:
        raise
    except Exception as err:
        where = f"training batch {batch_idx} of epoch {epoch} (global step {state.loop.global_step})"
        if type(err) in _PLAIN:
            raise StepError(
                f"{where}: {type(err).__name__}: {err}; check this batch's shapes, dtypes and devices against the model"
            ) from err
        if hasattr(err, "add_note"):  # Python 3.11+
            err.add_note(f"fnloop: raised by the train step at {where}")
        raise


def _finish(run: FitRun, state: Any) -> Any:
    """Close the logging window, ``on_fit_end`` (which saves), the profile, ``teardown``."""
    state = run.flush_window(state)
    state = run.hooks("on_fit_end", state)
    last = run.checkpoint.manager.latest() if run.checkpoint is not None and run.parallel.is_global_zero else None
    if last is not None:
        run.logger.log_checkpoint(last)
    run.logger.log_metrics(run.profile(), step=state.loop.global_step)
    state = run.hooks("teardown", state, "fit")
    run.logger.finalize(state.loop.status if state.loop.status in ("finished", "interrupted") else "finished")
    return state


def _fail(run: FitRun, state: Any, exc: BaseException) -> None:
    """Every ``on_exception`` handler, then the logger's finalize: each runs even when one before
    it fails (noted on ``exc``, which fit then raises unchanged)."""
    run.hooks.on_exception(with_loop(state, status=Status.FAILED), exc)
    guarded(exc, "the logger's finalize", run.logger.finalize, "failed")
