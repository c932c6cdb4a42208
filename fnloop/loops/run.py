"""What one ``fit`` call holds besides the state: the configuration resolved once, and the
effects (validation runs, logging windows, the time profile, stop conditions).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from fnloop.callbacks.misc import parse_duration
from fnloop.callbacks.progress import ProgressBar
from fnloop.errors import StepError
from fnloop.loops import rules
from fnloop.loops.data import limited
from fnloop.loops.evaluate import evaluate, prefixed
from fnloop.loops.logging import Window, make_logger
from fnloop.connectors.strategy import Parallel
from fnloop.loggers import NullLogger

__all__ = ["FitRun", "call_hook", "with_loop"]


def call_hook(callbacks: list[Any], name: str, state: Any, *args: Any) -> Any:
    """Call hook ``name`` of every callback in order; a returned state replaces the current one."""
    for cb in callbacks:
        out = getattr(cb, name)(state, *args)
        if out is not None:
            state = out
    return state


def with_loop(state: Any, **changes: Any) -> Any:
    """The state with loop counters changed."""
    return state.replace(loop=state.loop.replace(**changes))


class FitRun:
    """What one ``fit`` call holds besides the state: configuration resolved once and effects."""

    def __init__(
        self, trainer: Any, train_step: Any, val_step: Any, train_src: Any, val_src: Any, checkpoint: Any, parallel: Any = None
    ):
        self.trainer = trainer
        self.parallel = parallel = parallel if parallel is not None else Parallel()
        self.train_step = train_step
        self.val_step = val_step
        self.train_src = train_src
        self.val_src = val_src
        self.checkpoint = checkpoint
        self.callbacks = [c for c in trainer.callback_list if c is not checkpoint]
        if checkpoint is not None and parallel.is_global_zero:  # last, so it saves what the other callbacks returned
            self.callbacks.append(checkpoint)
        self.bar = None
        if trainer.enable_progress_bar and parallel.is_global_zero and not any(isinstance(c, ProgressBar) for c in self.callbacks):
            self.bar = ProgressBar()
            self.callbacks.append(self.bar)
        self.logger = make_logger(trainer) if parallel.is_global_zero else NullLogger()  # rank 0 writes the logs
        self.max_epochs = trainer.resolved_max_epochs
        self.max_steps = trainer.resolved_max_steps
        self.max_time = parse_duration(trainer.max_time)
        options = getattr(train_step, "options", None)  # the step carries the accumulation flag
        self.accumulate = options.accumulate_grad_batches if options is not None else trainer.accumulate_grad_batches
        self.window = Window()
        self.started = time.monotonic()
        self.times = {"data": 0.0, "step": 0.0, "eval": 0.0}

    # --- validation ----------------------------------------------------------------------------

    def val_batches(self, epoch: int) -> int | None:
        if self.val_step is None or self.val_src is None:
            return 0
        return limited(self.val_src, epoch, self.trainer.limit("val"), "val")

    def validate(self, state: Any) -> Any:
        n = self.val_batches(state.loop.epoch)
        t0 = time.perf_counter()
        metrics = prefixed(evaluate(state, self.val_step, self.val_src, n, epoch=0, parallel=self.parallel), "val")
        self.times["eval"] += time.perf_counter() - t0
        state = with_loop(state, val_count=state.loop.val_count + 1, val_pending=False)
        self.logger.log_metrics(metrics, step=state.loop.global_step)
        return call_hook(self.callbacks, "on_validation_end", state, metrics)

    def sanity_check(self, state: Any) -> None:
        n_val = self.val_batches(0)
        steps = self.trainer.num_sanity_val_steps
        if self.trainer.dev_batches or steps == 0 or n_val == 0:
            return
        n = n_val if steps == -1 else (steps if n_val is None else min(steps, n_val))
        t0 = time.perf_counter()
        evaluate(state, self.val_step, self.val_src, n, parallel=self.parallel)
        self.times["eval"] += time.perf_counter() - t0

    # --- logging -------------------------------------------------------------------------------

    def flush_window(self, state: Any) -> Any:
        if not len(self.window):
            return state
        means, bad, seconds, samples = self.window.reduce()
        where_of = self.window.where
        self.window = Window()
        if self.parallel.distributed:  # every rank's window, weighted by samples (a non-finite loss anywhere shows)
            means = self.parallel.reduce_metrics(means, samples)
            bad = 0 if bad is None and not math.isfinite(means.get("loss", 0.0)) else bad
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
        logged = prefixed(means, "train")
        if seconds > 0:
            logged["throughput/samples_per_sec"] = samples / seconds
            logged["throughput/batches_per_sec"] = len(where_of) / seconds
        for cb in self.callbacks:
            logged.update(cb.log(state))
        step = state.loop.global_step
        self.logger.log_metrics(logged, step=step)
        for cb in self.callbacks:
            cb.on_log(logged, step)
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
