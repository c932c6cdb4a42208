"""The fit loop: pure steps composed with Lightning's loop rules; every counter in ``state.loop``.

The loop reads top to bottom like a hand-written one. Effects (logging, progress, checkpoint
files, signals) happen here and nowhere else; the steps stay pure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from fnloop.connectors.datamodule import resolve_datamodule
from fnloop.connectors.device import device_of
from fnloop.errors import ConfigError, FnloopError, StepError
from fnloop.loops import rules
from fnloop.loops.data import batches_on, data_seed, limited, make_source, require
from fnloop.loops.evaluate import eval_loaders
from fnloop.loops.hooks import guarded
from fnloop.loops.ranks import params_dtype
from fnloop.loops.run import FitRun, with_loop
from fnloop.optim.grad_norms import grad_norms
from fnloop.state import Status

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from fnloop.state import TrainState
    from fnloop.trainer import Trainer
    from fnloop.types import EvalStepFn, StepFn

__all__ = ["run_fit"]


def run_fit(
    trainer: Trainer,
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
    """``Trainer.fit``: see its docstring."""
    from fnloop.execution import check_not_donated
    from fnloop.state import TrainState

    if not isinstance(state, TrainState):
        raise ConfigError(f"Trainer.fit: state must be a fnloop.TrainState, got {type(state).__name__}")
    check_not_donated(state, "Trainer.fit")
    from fnloop.loops.members import for_state  # a stacked state: steps over its members (fl.vmap)

    train_step = for_state(state, train_step, what="Trainer.fit")
    val_step = for_state(state, val_step, what="Trainer.fit(val_step)")
    from fnloop.connectors.accelerator import setup

    parallel, state, options = setup(trainer, state, train_step)
    train_step = _with_flags(trainer, train_step, options)
    reloadable = datamodule is not None and train_data is None and trainer.reload_dataloaders_every_n_epochs > 0
    seed = data_seed(trainer.seed, state)

    def sources() -> tuple[Any, list[Any]]:
        """The train source and val loaders, from the datamodule again when asked."""
        wanted = train_data is None or (val_step is not None and val_data is None)
        built = resolve_datamodule(datamodule, "fit") if datamodule is not None and wanted else {}
        train = require(
            train_data if train_data is not None else built.get("train_data"),
            "train_data", "pass train_data= or a datamodule with train_data()",
        )
        val = (val_data if val_data is not None else built.get("val_data")) if val_step is not None else None
        shard = dict(parallel=parallel, shard=trainer.use_distributed_sampler)
        train_src = make_source(train, seed=seed, stage="train", no_shuffle=bool(trainer.overfit_batches), **shard)
        return train_src, (eval_loaders(val, val_step, seed=seed, stage="val", **shard) if val is not None else [])

    train_src, val_loaders = sources()
    run = FitRun(trainer, train_step, val_loaders, train_src, _checkpoint_of(trainer, checkpoint), parallel)
    run.reload = sources if reloadable else None
    from fnloop.connectors.signals import stop_signals

    with stop_signals(trainer.stop_signals) as signals, _deterministic(trainer.deterministic):
        return _fit(run, state, signals, ckpt_path)


def _with_flags(trainer: Trainer, train_step: StepFn, flags: Any) -> StepFn:
    """The train step with the Trainer's flags as its options (see fnloop.options); a step built
    with its own optimizer options keeps them when the Trainer sets none."""
    own = getattr(train_step, "options", None)
    if own is not None and dataclasses.replace(flags, precision="32-true", grad_reduce=None).key is None:
        flags = dataclasses.replace(own, precision=flags.precision, grad_reduce=flags.grad_reduce)
    if own == flags or (own is None and flags == type(flags)()):
        return train_step
    if not hasattr(train_step, "with_options"):
        raise ConfigError(
            "Trainer(accumulate_grad_batches / gradient_clip_val / on_nonfinite='skip' / precision / strategy): these "
            f"flags need a step from fnloop.train_step, got {type(train_step).__name__}"
        )
    if own is not None and own.key is not None and dataclasses.replace(own, precision=flags.precision, grad_reduce=flags.grad_reduce) != flags:
        raise ConfigError(
            f"Trainer.fit: the train step was built with {own} but the Trainer flags ask for {flags}; set them in one place"
        )
    return train_step.with_options(flags)


def _fail(run: FitRun, state: Any, exc: BaseException) -> None:
    """Every ``on_exception`` handler, then the logger's finalize: each runs even when one before
    it fails (noted on ``exc``, which fit then raises unchanged)."""
    run.hooks.on_exception(with_loop(state, status=Status.FAILED), exc)
    guarded(exc, "the logger's finalize", run.logger.finalize, "failed")


_PLAIN = (RuntimeError, ValueError, TypeError, IndexError, KeyError)
"""Errors of these exact classes raised by a step (a wrong-shaped batch, a dtype mismatch) become a
StepError naming the batch; other exceptions (a user's own class, out of memory) keep their type."""


def _step(step: Any, state: Any, batch: Any, batch_idx: int, epoch: int) -> Any:
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


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside the block when ``enabled``."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _checkpoint_of(trainer: Trainer, checkpoint: Any) -> Any:
    """The ModelCheckpoint of this fit: from ``checkpoint=`` or among the callbacks."""
    from fnloop.checkpoint.callback import ModelCheckpoint, checkpoint_of_fit

    if checkpoint is None:
        found = [c for c in trainer.callback_list if isinstance(c, ModelCheckpoint)]
        return checkpoint_of_fit(trainer, found[-1] if found else None)  # enable_checkpointing decides
    return checkpoint_of_fit(trainer, checkpoint if isinstance(checkpoint, ModelCheckpoint) else ModelCheckpoint(checkpoint))


def _finish(run: FitRun, state: Any) -> Any:
    state = run.flush_window(state)
    state = run.hooks("on_fit_end", state)
    last = run.checkpoint.manager.latest() if run.checkpoint is not None and run.parallel.is_global_zero else None
    if last is not None:
        run.logger.log_checkpoint(last)
    run.logger.log_metrics(run.profile(), step=state.loop.global_step)
    state = run.hooks("teardown", state, "fit")
    run.logger.finalize(state.loop.status if state.loop.status in ("finished", "interrupted") else "finished")
    return state


def _fit(run: FitRun, state: Any, signals: Any, ckpt_path: str | None) -> Any:
    """Setup, restore, sanity check, then epochs of batches; an interruption finishes cleanly
    (``on_fit_end`` saves), a failure calls ``on_exception`` with the last state reached."""
    from fnloop.execution import mark_donated

    trainer, src, hooks = run.trainer, run.train_src, run.hooks
    caller = state if ckpt_path is None else None  # a donating fit updates the caller's tensors in place
    state = hooks("setup", state, "fit")
    if ckpt_path is not None:
        from fnloop.checkpoint.callback import resume_from

        manager = run.checkpoint.manager if run.checkpoint is not None else None
        restored = resume_from(ckpt_path, state, manager)
        if restored is not state and hooks.wants("on_load_checkpoint"):
            from fnloop.checkpoint._read import read_meta

            url = manager.resolve(ckpt_path) if manager is not None else ckpt_path
            restored = hooks("on_load_checkpoint", restored, read_meta(url).get("metrics", {}))
        state = restored
    donating = trainer.donate and hasattr(run.train_step, "donated")
    step = run.train_step.donated if donating else run.train_step
    flush = getattr(run.train_step, "flush", None)
    device, dtype = device_of(state.params), params_dtype(state)
    # the first donated step updates the tensors the caller's state holds: refuse that object afterwards
    unmarked = caller if donating and caller is not None and caller.params is state.params else None
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
        batch_start, before_opt = hooks.wants("on_train_batch_start"), hooks.wants("on_before_optimizer_step")
        stopped = False
        while not stopped and not rules.fit_done(
            epoch=state.loop.epoch, global_step=state.loop.global_step, max_epochs=run.max_epochs, max_steps=run.max_steps
        ):
            if state.loop.stop and run.can_stop(state, state.loop.epoch):
                break
            epoch = state.loop.epoch
            if run.reload is not None and epoch > 0 and epoch % trainer.reload_dataloaders_every_n_epochs == 0:
                run.train_src, run.val_loaders = run.reload()
                src = run.train_src
            n = limited(src, epoch, trainer.limit("train"), "train")
            interval, every_n_epochs = trainer.resolved_val_check
            check_batch = (
                rules.val_check_batch(n, interval, check_val_every_n_epoch=every_n_epochs) if run.val_batches(epoch) != 0 else None
            )
            if run.bar is not None:
                run.bar.total = n
            state = hooks("on_train_epoch_start", state)
            batch_idx = first = state.loop.batch_idx
            times = run.times
            t0 = time.perf_counter()
            for batch in batches_on(src, epoch, batch_idx, n, device, dtype):
                t1 = time.perf_counter()
                if batch_start:
                    state = hooks("on_train_batch_start", state, batch, batch_idx)
                signals.defer = donating  # a Ctrl-C must not cut an in-place update short
                state, metrics = _step(step, state, batch, batch_idx, epoch)
                signals.defer = False
                if unmarked is not None:
                    mark_donated(unmarked)
                    unmarked = None
                t2 = time.perf_counter()
                times["data"] += t1 - t0
                times["step"] += t2 - t1
                batch_size = src.batch_size_of(batch)
                stepped = rules.is_optimizer_step(batch_idx, n_batches=n, accumulate=run.accumulate)
                if stepped and flush is not None and n is not None and batch_idx + 1 == n:
                    state = flush(state)  # Lightning steps on a partial accumulation window
                if stepped and before_opt:
                    state = hooks("on_before_optimizer_step", state, grad_norms(state.opt_state))
                loop = state.loop
                validate = check_batch is not None and rules.should_validate(
                    batch_idx, total_batch_idx=loop.total_batch_idx, epoch=epoch, n_batches=n,
                    check_batch=check_batch, check_val_every_n_epoch=every_n_epochs,
                )
                state = with_loop(
                    state,
                    batch_idx=batch_idx + 1,
                    global_step=loop.global_step + stepped,
                    samples_seen=loop.samples_seen + batch_size,
                    total_batch_idx=loop.total_batch_idx + 1,
                    val_pending=validate,
                )
                if signals.deferred_interrupt:  # a second Ctrl-C arrived during the in-place step
                    raise KeyboardInterrupt
                run.window.add(metrics, batch_size, loop.global_step, epoch)
                signals.defer = True  # the batch counts as done: a second Ctrl-C waits for its hooks
                state = hooks("on_train_batch_end", state, metrics)
                signals.defer = False
                if signals.deferred_interrupt:
                    raise KeyboardInterrupt
                if stepped and state.loop.global_step % trainer.log_every_n_steps == 0:
                    state = run.flush_window(state)
                if validate:
                    state = run.validate(state)
                batch_idx += 1
                # the ranks decide together (one small all-reduce when distributed): all stop at this step
                requested, budget, stop = run.parallel.agree(signals.requested, run.out_of_budget(state), state.loop.stop)
                if stop and not state.loop.stop:
                    state = with_loop(state, stop=True)
                if requested:  # the step is done: save (ModelCheckpoint.on_fit_end) and return
                    return _finish(run, with_loop(state, status=Status.INTERRUPTED))
                if budget or (state.loop.stop and run.can_stop(state, epoch)):
                    stopped = True
                    break
                t0 = time.perf_counter()
            if n is None and not stopped or n is not None and batch_idx >= n:  # the epoch is complete
                state = run.flush_window(state, epoch_end=True)
                state = hooks("on_train_epoch_end", state)
                state = with_loop(state, epoch=epoch + 1, batch_idx=0)
            if batch_idx == first == 0 and not stopped:  # an epoch without batches: no epoch makes progress
                if signals.requested:
                    return _finish(run, with_loop(state, status=Status.INTERRUPTED))
                break
        state = hooks("on_train_end", with_loop(state, status=Status.FINISHED))
        return _finish(run, state)
    except KeyboardInterrupt:
        return _finish(run, with_loop(state, status=Status.INTERRUPTED))
    except BaseException as exc:
        _fail(run, state, exc)
        raise
