"""The logger connector: the sinks of a run and the reduction of train metrics per window."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from fnloop.errors import ConfigError
from fnloop.metrics import Accumulator
from fnloop.metrics.metric import ExtremumState, Max, Mean, MeanState, Min, Sum, SumState

__all__ = ["make_logger", "Window"]


def make_logger(spec: Any, root_dir: str | None) -> Any:
    """The sinks of ``Trainer(logger=spec)``, with Lightning's meanings: ``None`` (the default)
    or ``True`` -> TensorBoard and CSV in ``<root_dir or "runs">/default/version_<n>``;
    ``False`` -> nothing is written; a sink or a list of sinks -> a collection sharing one run
    folder.

    Example:
        >>> type(make_logger(False, None)).__name__
        'NullLogger'
    """
    from fnloop.loggers import CSVLogger, LoggerCollection, NullLogger, TensorBoardLogger

    if spec is False:
        return NullLogger()
    if spec is None or spec is True:
        root = root_dir or "runs"
        spec = [TensorBoardLogger(root), CSVLogger(root)]
    sinks = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    for i, sink in enumerate(sinks):
        # look at the type: isinstance(sink, Logger) would read the log_dir property, which creates the folder
        if not all(callable(getattr(type(sink), m, None)) for m in ("log_metrics", "log_hparams", "finalize")):
            raise ConfigError(
                f"Trainer(logger=...): item {i} ({type(sink).__name__}) is not a logger; use fnloop.TensorBoardLogger, "
                "CSVLogger, JSONLLogger, ConsoleLogger, MLFlowLogger, or an object with log_metrics/log_hparams/finalize/log_dir"
            )
    return LoggerCollection(sinks)


class Window:
    """Train metrics of the steps since the last logging boundary, kept as tensors; reduced when
    the boundary comes (one host sync), each name by its :class:`fnloop.metrics.Accumulator`
    rule: a batch-size weighted mean by default, ``*_sum``/``*_max``/``*_min`` by their names.
    A stacked run's ``[N]`` values are reduced per member (states of shape ``[N]``).

    Example:
        >>> import torch
        >>> w = Window(Accumulator())
        >>> w.add({"loss": torch.tensor(1.0), "g_max": torch.tensor(3.0)}, 1, 1, 0)
        >>> w.add({"loss": torch.tensor(4.0), "g_max": torch.tensor(2.0)}, 3, 2, 0)
        >>> states, bad, _, samples = w.reduce()
        >>> {k: v.item() for k, v in Accumulator().compute(states).items()}, bad, samples
        ({'loss': 3.25, 'g_max': 3.0}, None, 4)
    """

    def __init__(self, acc: Accumulator) -> None:
        self.acc = acc
        self.entries: list[tuple[Mapping[str, torch.Tensor], int]] = []
        self.where: list[tuple[int, int]] = []  # (global_step, epoch) of each entry
        self.start = time.perf_counter()

    def add(self, metrics: Mapping[str, torch.Tensor], batch_size: int, global_step: int, epoch: int) -> None:
        self.entries.append((metrics, batch_size))
        self.where.append((global_step, epoch))

    def __len__(self) -> int:
        return len(self.entries)

    def reduce(self, start: int = 0) -> tuple[dict[str, Any], int | None, float, int]:
        """``(metric states by name, index of the first entry with a non-finite loss or None,
        seconds, samples)`` of the entries from ``start`` on; the states merge into an epoch's
        with ``Accumulator.merge``."""
        seconds = time.perf_counter() - self.start
        entries = self.entries[start:]
        samples = sum(bs for _, bs in entries)
        keys: list[str] = []
        for metrics, _ in entries:
            keys.extend(k for k in metrics if k not in keys)
        if not entries or not keys:
            return {}, None, seconds, samples
        members: dict[str, int | None] = {}  # N for a stacked run's [N] values, None for a 0-d value
        for metrics, _ in entries:
            members.update({k: v.shape[0] if v.ndim == 1 else None for k, v in metrics.items() if k not in members})
        widths = {k: 1 if n is None else n for k, n in members.items()}
        rows = []
        for m, _ in entries:  # concatenated where the values live, then one transfer
            device = next(iter(m.values())).device
            dtype = torch.float32 if device.type == "mps" else torch.float64
            rows.append(torch.cat([
                m[k].detach().reshape(-1).to(dtype) if k in m else torch.zeros(widths[k], dtype=dtype, device=device)
                for k in keys
            ]))
        table = torch.stack(rows).to("cpu", torch.float64)  # [entries, sum of widths]
        present = torch.tensor([[k in m for k in keys] for m, _ in entries])
        sizes = torch.tensor([bs for _, bs in entries], dtype=torch.float64)
        columns = dict(zip(keys, table.split([widths[k] for k in keys], dim=1)))
        columns = {k: c if members[k] is not None else c[:, 0] for k, c in columns.items()}
        states = {k: _reduce_column(self.acc.metric_for(k), columns[k], present[:, j], sizes) for j, k in enumerate(keys)}
        bad = None
        if "loss" in keys:
            finite = torch.isfinite(columns["loss"])
            finite = finite if finite.ndim == 1 else finite.all(dim=1)
            if not bool(finite.all()):
                bad = start + int((~finite).nonzero()[0, 0])
        return states, bad, seconds, samples


def _reduce_column(metric: Any, values: torch.Tensor, present: torch.Tensor, sizes: torch.Tensor) -> Any:
    """The metric state of one name over a window (``values``: ``[entries]``, or ``[entries, N]``
    for a stacked run, reduced per member): vectorised for the built-in reductions."""
    values = values[present]
    if type(metric) is Mean:
        w = sizes[present]
        return MeanState((values * (w if values.ndim == 1 else w[:, None])).sum(0), w.sum())
    if type(metric) is Sum:
        return SumState(values.sum(0))
    if type(metric) in (Max, Min):
        return ExtremumState(values.amax(0) if type(metric) is Max else values.amin(0))
    state = metric.init()
    weights = sizes[present] if isinstance(metric, Mean) else torch.ones_like(values)
    for v, w in zip(values, weights):
        state = metric.update(state, v, w)
    return state
