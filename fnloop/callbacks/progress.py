"""A tqdm progress bar showing the latest logged metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fnloop.callbacks.base import Callback
from fnloop.members import split_key

__all__ = ["ProgressBar"]


class ProgressBar(Callback):
    """One bar per epoch (total = batches in the epoch when known) with the latest metrics;
    after ``Trainer.validate``/``test``, a table of their metrics.

    Example:
        >>> import fnloop as fl
        >>> bar = fl.ProgressBar(leave=False)
    """

    def __init__(self, *, leave: bool = True, refresh_rate: int = 1) -> None:
        self.leave = leave
        self.refresh_rate = max(1, int(refresh_rate))
        self._bar: Any = None
        self.total: int | None = None
        self._pending = 0
        self._results: dict[str, float] | None = None

    def on_train_epoch_start(self, state: Any) -> Any:
        from tqdm.auto import tqdm

        self._close()
        self._bar = tqdm(total=self.total, initial=state.loop.batch_idx, desc=f"epoch {state.loop.epoch}", leave=self.leave, dynamic_ncols=True)
        self._pending = 0

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> Any:
        if self._bar is not None:
            self._pending += 1
            if self._pending >= self.refresh_rate:
                self._bar.update(self._pending)
                self._pending = 0

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._bar is not None:
            # a stacked run: the mean over members (its plain name), not each member
            shown = {k: f"{v:.4g}" for k, v in metrics.items() if split_key(k)[1] is None}
            self._bar.set_postfix(shown, refresh=False)

    def _close(self) -> None:
        if self._bar is not None:
            if self._pending:
                self._bar.update(self._pending)
                self._pending = 0
            self._bar.close()
            self._bar = None

    def on_train_epoch_end(self, state: Any) -> Any:
        self._close()

    def on_fit_end(self, state: Any) -> Any:
        self._close()

    def on_exception(self, state: Any, exception: BaseException) -> None:
        self._close()

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> Any:
        self._results = dict(metrics)

    def on_test_end(self, state: Any, metrics: Mapping[str, float]) -> Any:
        self._results = dict(metrics)

    def teardown(self, state: Any, stage: str) -> Any:
        if stage in ("validate", "test") and self._results is not None:
            from fnloop.loggers import format_metrics_table

            print(format_metrics_table(self._results, title=f"{stage.capitalize()} metrics"))
        self._results = None
