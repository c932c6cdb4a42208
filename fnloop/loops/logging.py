"""The logger connector: the sinks of a run and the reduction of train metrics per window."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from fnloop.errors import ConfigError

__all__ = ["make_logger", "Window"]


def make_logger(trainer: Any) -> Any:
    """The run's sinks: ``logger=None/False`` -> no-op; ``True`` -> TensorBoard and CSV in
    ``default_root_dir`` (``runs``) as Lightning does; a sink or a list of sinks -> a collection
    sharing one run folder."""
    from fnloop.loggers import CSVLogger, LoggerCollection, NullLogger, TensorBoardLogger

    spec = trainer.logger
    if spec is None or spec is False:
        return NullLogger()
    if spec is True:
        root = trainer.default_root_dir or "runs"
        spec = [TensorBoardLogger(root), CSVLogger(root)]
    sinks = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    for i, sink in enumerate(sinks):
        # look at the type: isinstance(sink, Logger) would read the log_dir property, which creates the folder
        if not all(callable(getattr(type(sink), m, None)) for m in ("log_metrics", "log_hparams", "finalize")):
            raise ConfigError(
                f"Trainer(logger=...): item {i} ({type(sink).__name__}) is not a logger; use fnloop.TensorBoardLogger, "
                "CSVLogger, JSONLLogger, ConsoleLogger, or an object with log_metrics/log_hparams/finalize/log_dir"
            )
    return LoggerCollection(sinks)


class Window:
    """Train metrics of the steps since the last logging boundary, kept as tensors; reduced
    (batch-size weighted means, one host sync) when the boundary comes."""

    def __init__(self) -> None:
        self.entries: list[tuple[Mapping[str, torch.Tensor], int]] = []
        self.where: list[tuple[int, int]] = []  # (global_step, epoch) of each entry
        self.start = time.perf_counter()

    def add(self, metrics: Mapping[str, torch.Tensor], batch_size: int, global_step: int, epoch: int) -> None:
        self.entries.append((metrics, batch_size))
        self.where.append((global_step, epoch))

    def __len__(self) -> int:
        return len(self.entries)

    def reduce(self) -> tuple[dict[str, float], int | None, float, int]:
        """``(means, index of the first entry with a non-finite loss or None, seconds, samples)``."""
        seconds = time.perf_counter() - self.start
        samples = sum(bs for _, bs in self.entries)
        keys: list[str] = []
        for metrics, _ in self.entries:
            keys.extend(k for k in metrics if k not in keys)
        if not self.entries or not keys:
            return {}, None, seconds, samples
        zero = torch.zeros((), dtype=torch.float64)
        rows = [torch.stack([m[k].detach().to("cpu", torch.float64).reshape(()) if k in m else zero for k in keys]) for m, _ in self.entries]
        table = torch.stack(rows)  # [entries, keys]
        present = torch.tensor([[k in m for k in keys] for m, _ in self.entries])
        w = torch.tensor([bs for _, bs in self.entries], dtype=torch.float64)[:, None] * present
        means = (table * w).sum(0) / w.sum(0)
        values = means.tolist()
        bad = None
        if "loss" in keys:
            losses = table[:, keys.index("loss")]
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0])
        return dict(zip(keys, values)), bad, seconds, samples
