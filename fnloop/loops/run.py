"""What one ``fit`` call holds besides the state: the configuration resolved once, and the
effects (validation runs, logging windows and epoch values, the time profile, stop conditions).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

from fnloop.callbacks.misc import parse_duration
from fnloop.callbacks.model_summary import ModelSummary
from fnloop.callbacks.progress import ProgressBar
from fnloop.errors import StepError
from fnloop.loops import rules
from fnloop.loops.data import limited
from fnloop.loops.evaluate import Loader, evaluate, prefixed
from fnloop.loops.hooks import Hooks
from fnloop.loops.logging import Window
from fnloop.loops.ranks import loggers_on, on_this_rank
from fnloop.members import expand, renamed
from fnloop.metrics import Accumulator

if TYPE_CHECKING:
    from fnloop.connectors.strategy import Parallel
    from fnloop.trainer import Trainer

__all__ = ["FitRun", "with_loop"]


def with_loop(state: Any, **changes: Any) -> Any:
    """The state with loop counters changed."""
    return state.replace(loop=state.loop.replace(**changes))


class FitRun:
    """What one ``fit`` call holds besides the state: configuration resolved once and effects."""

    def __init__(
        self,
        trainer: Trainer,
        train_step: Any,
        val_loaders: list[Loader],
        train_src: Any,
        checkpoint: Any,
        parallel: Parallel | None = None,
    ) -> None:
        from fnloop.connectors.strategy import Parallel

        self.trainer = trainer
        self.parallel = parallel = parallel if parallel is not None else Parallel()
        self.train_step = train_step
        self.val_loaders = val_loaders
        self.train_src = train_src
        self.checkpoint = checkpoint
        self.reload: Any = None  # () -> (train source, val loaders) under reload_dataloaders_every_n_epochs
        # rank 0 alone prints, shows progress and writes checkpoints and logs
        callbacks = on_this_rank([c for c in trainer.callback_list if c is not checkpoint], parallel)
        lead = parallel.is_global_zero
        if trainer.enable_model_summary and lead and not any(isinstance(c, ModelSummary) for c in callbacks):
            callbacks.insert(0, ModelSummary())
        # last, so it saves what the other callbacks returned; every rank saves its shard of a sharded state
        if checkpoint is not None and (lead or parallel.sharded):
            callbacks.append(checkpoint)
        self.bar = None
        if trainer.enable_progress_bar and lead and not any(isinstance(c, ProgressBar) for c in callbacks):
            self.bar = ProgressBar()
            callbacks.append(self.bar)
        self.callbacks = callbacks
        self.hooks = Hooks(callbacks)
        if checkpoint is not None and lead:  # what the callbacks add to each checkpoint's metadata
            checkpoint.metadata_hook = self.hooks.save_metadata if self.hooks.wants("on_save_checkpoint") else None
        self.logger = loggers_on(trainer, parallel)
        self.max_epochs = trainer.resolved_max_epochs
        self.max_steps = trainer.resolved_max_steps
        self.max_time = parse_duration(trainer.max_time)
        options = getattr(train_step, "options", None)  # the step carries the accumulation flag
        self.accumulate = options.accumulate_grad_batches if options is not None else trainer.accumulate_grad_batches
        self.acc = Accumulator()
        self.window = Window(self.acc)
        self.epoch_states: dict[str, Any] = {}  # the train metrics of the epoch so far
        self.epoch_samples = 0
        self.counted = 0  # entries of an open window that spans epochs already in an epoch's values
        self.started = time.monotonic()
        self.times = {"data": 0.0, "step": 0.0, "eval": 0.0}

    # --- validation ----------------------------------------------------------------------------

    def val_batches(self, epoch: int) -> int | None:
        """Validation batches of the first loader (0: no validation)."""
        if not self.val_loaders:
            return 0
        return limited(self.val_loaders[0].source, epoch, self.trainer.limit("val"), "val")

    def _evaluate(self, state: Any, n_batches: Any) -> tuple[Any, dict[str, float]]:
        t0 = time.perf_counter()
        state = self.hooks("on_validation_start", state)
        state, metrics = evaluate(
            state, self.val_loaders, n_batches, self.hooks, kind="validation", prefix="val",
            inference=self.trainer.inference_mode, parallel=self.parallel,
        )
        self.times["eval"] += time.perf_counter() - t0
        return state, metrics

    def validate(self, state: Any) -> Any:
        """A validation run: logged, then ``on_validation_end`` with its metrics."""
        epoch, limit = state.loop.epoch, self.trainer.limit("val")
        state, metrics = self._evaluate(state, lambda source: limited(source, epoch, limit, "val"))
        state = with_loop(state, val_count=state.loop.val_count + 1, val_pending=False)
        self.logger.log_metrics(metrics, step=state.loop.global_step)
        return self.hooks("on_validation_end", state, metrics)

    def sanity_check(self, state: Any) -> Any:
        """``num_sanity_val_steps`` batches of every validation loader; nothing logged."""
        steps, limit = self.trainer.num_sanity_val_steps, self.trainer.limit("val")
        if self.trainer.dev_batches or steps == 0 or self.val_batches(0) == 0:
            return state

        def n_batches(source: Any) -> int | None:
            n = limited(source, 0, limit, "val")
            return n if steps == -1 else (steps if n is None else min(steps, n))

        state = self.hooks("on_sanity_check_start", state)
        state, _ = self._evaluate(state, n_batches)
        return self.hooks("on_sanity_check_end", state)

    # --- logging -------------------------------------------------------------------------------

    def flush_window(self, state: Any, *, epoch_end: bool = False) -> Any:
        """Log the window's reduced train metrics (``train/<name>``) and the callbacks' values;
        at the end of an epoch also the epoch's values (``train/<name>_epoch``), in one call."""
        logged: dict[str, float] = {}
        spans = epoch_end and self.trainer.log_window_spans_epochs  # the window stays open into the next epoch
        window = len(self.window) > 0 and not spans
        counted = self.counted  # entries of the open window already in the epoch's values
        if spans and len(self.window) > counted:
            states, _, _, samples = self.window.reduce(counted)
            self.epoch_states = self.acc.merge(self.epoch_states, states)
            self.epoch_samples += samples
            self.counted = len(self.window)
        if window:
            flushed = self.window
            states, bad, seconds, samples = flushed.reduce()
            where_of = flushed.where
            self.window, self.counted = Window(self.acc), 0
            values = expand(self.acc.compute(states))  # a stacked run: the mean and each member
            if counted:  # the entries before `counted` went into the previous epoch's values
                epoch_part, _, _, epoch_samples = flushed.reduce(counted)
            else:
                epoch_part, epoch_samples = states, samples
            self.epoch_samples += epoch_samples
            if self.parallel.distributed:  # every rank's window, weighted by samples (a non-finite loss anywhere shows)
                values = self.parallel.reduce_metrics(values, samples)
                bad = 0 if bad is None and not math.isfinite(values.get("loss", 0.0)) else bad
                samples *= self.parallel.world_size
            if bad is not None and self.trainer.on_nonfinite != "skip":
                bad_step, bad_epoch = where_of[bad]
                where = f"the loss became non-finite at global step {bad_step} (epoch {bad_epoch})"
                if self.trainer.on_nonfinite == "raise":
                    raise StepError(
                        f"{where}; lower the learning rate, clip gradients (gradient_clip_val), or set "
                        "Trainer(on_nonfinite='skip') to skip such updates"
                    )
                state = with_loop(state, stop=True)
            self.epoch_states = self.acc.merge(self.epoch_states, epoch_part)
            logged = prefixed(values, "train")
            if seconds > 0:
                logged["throughput/samples_per_sec"] = samples / seconds
                logged["throughput/batches_per_sec"] = len(where_of) / seconds
            for cb in self.hooks.overriding("log"):
                logged.update(cb.log(state))
        if epoch_end and self.epoch_states:
            values = expand(self.acc.compute(self.epoch_states))
            values = prefixed(self.parallel.reduce_metrics(values, self.epoch_samples), "train")
            self.epoch_states, self.epoch_samples = {}, 0
            logged.update({renamed(k, lambda n: f"{n}_epoch"): v for k, v in values.items()})
        if not logged:
            return state
        step = state.loop.global_step
        self.logger.log_metrics(logged, step=step)
        if window:  # a logging boundary (an epoch's values alone are not one)
            self.hooks.notify("on_log", logged, step)
        return with_loop(state, logger_step=step)

    # --- stopping ------------------------------------------------------------------------------

    def profile(self) -> dict[str, float]:
        """Seconds spent waiting for data, in train steps, in evaluation, in checkpointing, other."""
        total = time.monotonic() - self.started
        out = {f"time/{k}_s": v for k, v in self.times.items()}
        out["time/checkpoint_s"] = self.checkpoint.seconds if self.checkpoint is not None else 0.0
        out["time/other_s"] = max(0.0, total - sum(out.values()))
        out["time/total_s"] = total
        return out

    def hparams(self) -> dict[str, Any]:
        """The Trainer flags worth recording with the run."""
        skip = {"callbacks", "logger", "stop_signals"}
        flags = {f.name: getattr(self.trainer, f.name) for f in dataclasses.fields(self.trainer) if f.name not in skip}
        flags["callbacks"] = [type(c).__name__ for c in self.callbacks]
        return {"trainer": flags}

    def can_stop(self, state: Any, epochs_done: int) -> bool:
        return rules.can_stop_early(
            epoch=epochs_done, global_step=state.loop.global_step, min_epochs=self.trainer.min_epochs, min_steps=self.trainer.min_steps
        )

    def out_of_budget(self, state: Any) -> bool:
        if self.max_steps != -1 and state.loop.global_step >= self.max_steps:
            return True
        return self.max_time is not None and time.monotonic() - self.started >= self.max_time
