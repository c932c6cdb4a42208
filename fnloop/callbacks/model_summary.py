"""A summary of the model: parameter counts and sizes per top-level module, printed when fit
starts (``Trainer(enable_model_summary=True)``, the default, as in Lightning).

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> state = fl.TrainState.create(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()), flo.sgd(lr=0.1))
    >>> rows = summarize(state)
    >>> [(r.name, r.kind, r.params) for r in rows]
    [('0', 'Linear', 16), ('1', 'ReLU', 0)]
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple, TextIO

import torch

from fnloop.callbacks.base import Callback

__all__ = ["ModelSummary", "SummaryRow", "summarize", "format_summary"]


class SummaryRow(NamedTuple):
    """One top-level module: its name, class, parameter count, trainable count and bytes
    (parameters and buffers)."""

    name: str
    kind: str
    params: int
    trainable: int
    bytes: int


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def summarize(state: Any, *, max_depth: int = 1) -> list[SummaryRow]:
    """Rows of the modules ``max_depth`` levels down (1: the top-level children), computed from
    ``state.params``/``state.buffers`` (the weights in the state, not the template's) and the
    module classes of ``state.module``. Parameters of the root itself are listed under ``""``.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> summarize(fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1)))
        [SummaryRow(name='', kind='Linear', params=3, trainable=3, bytes=12)]
    """
    module = state.module
    names = [n for n, _ in module.named_modules() if n and n.count(".") < max_depth]
    kinds = dict(module.named_modules())
    rows: dict[str, list[int]] = {n: [0, 0, 0] for n in names}

    def owner(key: str) -> str:
        parts = key.split(".")
        for depth in range(min(max_depth, len(parts) - 1), 0, -1):
            prefix = ".".join(parts[:depth])
            if prefix in rows:
                return prefix
        return ""

    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    for key, t in state.params.items():
        row = rows.setdefault(owner(key), [0, 0, 0])
        row[0] += t.numel()
        row[1] += t.numel() if key in trainable else 0
        row[2] += _nbytes(t)
    for key, t in state.buffers.items():
        rows.setdefault(owner(key), [0, 0, 0])[2] += _nbytes(t)
    return [SummaryRow(n, type(kinds[n]).__name__, *rows[n]) for n in (["" ] if "" in rows else []) + names]


def format_summary(rows: list[SummaryRow]) -> str:
    """A table of ``rows`` with totals, as Lightning prints it.

    Example:
        >>> print(format_summary([SummaryRow("net", "Linear", 3, 3, 12)]))  # doctest: +NORMALIZE_WHITESPACE
          | Name | Type   | Params | Size
        ---------------------------------------
        0 | net  | Linear | 3      | 12 B
        ---------------------------------------
        3         Trainable params
        0         Non-trainable params
        3         Total params
        0.000     Total estimated model params size (MB)
    """
    header = ("", "Name", "Type", "Params", "Size")
    body = [(str(i), r.name or "(root)", r.kind, f"{r.params:,}", _size(r.bytes)) for i, r in enumerate(rows)]
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(5)]

    def line(cells: tuple[str, ...]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "-" * 39
    total = sum(r.params for r in rows)
    trainable = sum(r.trainable for r in rows)
    size_mb = sum(r.bytes for r in rows) / 1e6
    return "\n".join(
        [line(header), rule, *(line(b) for b in body), rule,
         f"{trainable:<10,}Trainable params", f"{total - trainable:<10,}Non-trainable params",
         f"{total:<10,}Total params", f"{size_mb:<10.3f}Total estimated model params size (MB)"]
    )


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class ModelSummary(Callback):
    """Print the model summary when fit starts.

    Args:
        max_depth: how many levels of submodules get a row (1: the top-level ones).
        stream: where to write (default ``sys.stdout``).

    Example:
        >>> import fnloop as fl
        >>> fl.Trainer(callbacks=[fl.ModelSummary(max_depth=2)], enable_model_summary=True).enable_model_summary
        True
    """

    def __init__(self, max_depth: int = 1, *, stream: TextIO | None = None) -> None:
        self.max_depth = max_depth
        self.stream = stream

    def on_fit_start(self, state: Any) -> Any:
        print(format_summary(summarize(state, max_depth=self.max_depth)), file=self.stream or sys.stdout)
