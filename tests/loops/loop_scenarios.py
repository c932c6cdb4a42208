"""Shared scenarios of the driver tests: tiny models, seeded batches, recording callbacks,
a dataset that logs the indices it serves, a logger sink that records its calls, and a probe
of host reads of tensors.

``tests/`` is not a package and pytest runs with ``--import-mode=importlib``, so the test files
put this folder on ``sys.path`` and ``import _scenarios``.

Models are built with seeded weights inside ``torch.random.fork_rng``: building one never
moves the caller's global RNG.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_trees_equal

N_FEATURES = 3


def seeded_module(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` with the global RNG seeded, and the caller's RNG left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_linear(seed: int = 0) -> torch.nn.Module:
    """``Linear(3, 1)`` with seeded weights."""
    return seeded_module(seed, lambda: torch.nn.Linear(N_FEATURES, 1))


def make_dropout_mlp(seed: int = 0, p: float = 0.3) -> torch.nn.Module:
    """``3-8-1`` MLP with a Dropout: randomness that must come from the state."""
    return seeded_module(
        seed,
        lambda: torch.nn.Sequential(
            torch.nn.Linear(N_FEATURES, 8), torch.nn.ReLU(), torch.nn.Dropout(p), torch.nn.Linear(8, 1)
        ),
    )


def batches(n: int, batch_size: int = 4, *, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded regression batches ``(x [batch_size, 3], y [batch_size, 1])``."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, N_FEATURES, generator=g), torch.randn(batch_size, 1, generator=g)) for _ in range(n)
    ]


def samples(n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded regression samples ``(x [n, 3], y [n, 1])``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, N_FEATURES, generator=g), torch.randn(n, 1, generator=g)


def mse(model: Any, batch: Any) -> torch.Tensor:
    """Mean squared error of ``model(batch[0])`` against ``batch[1]``."""
    return F.mse_loss(model(batch[0]), batch[1])


def linear_state(seed: int = 0, lr: float = 0.1, **create: Any) -> fl.TrainState:
    """A fresh state of :func:`make_linear` with plain SGD."""
    return fl.TrainState.create(make_linear(seed), flo.sgd(lr=lr), **create)


def quiet_trainer(**flags: Any) -> fl.Trainer:
    """A Trainer without progress bar, model summary and logger unless given."""
    flags.setdefault("enable_progress_bar", False)
    flags.setdefault("logger", False)
    flags.setdefault("enable_model_summary", False)
    return fl.Trainer(**flags)


class Recorder(fl.Callback):
    """Appends every hook call to ``events`` (shared with :class:`CountingEval`).

    Entries: ``("fit_start",)``, ``("epoch_start", epoch)``, ``("batch_end", epoch, global_step,
    b)`` with ``b`` the 0-based batch index in the epoch, ``("log", step)``, ``("val_end", epoch,
    global_step, b, metrics)``, ``("epoch_end", epoch)``, ``("fit_end", status)``,
    ``("exception", type name)``.
    """

    def __init__(self, events: list[tuple[Any, ...]] | None = None) -> None:
        self.events: list[tuple[Any, ...]] = [] if events is None else events

    def on_fit_start(self, state: Any) -> None:
        self.events.append(("fit_start",))

    def on_train_epoch_start(self, state: Any) -> None:
        self.events.append(("epoch_start", state.loop.epoch))

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> None:
        loop = state.loop
        self.events.append(("batch_end", loop.epoch, loop.global_step, loop.batch_idx - 1))

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        self.events.append(("log", step))

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        loop = state.loop
        self.events.append(("val_end", loop.epoch, loop.global_step, loop.batch_idx - 1, dict(metrics)))

    def on_train_epoch_end(self, state: Any) -> None:
        self.events.append(("epoch_end", state.loop.epoch))

    def on_fit_end(self, state: Any) -> None:
        self.events.append(("fit_end", state.loop.status))

    def on_exception(self, state: Any, exception: BaseException) -> None:
        self.events.append(("exception", type(exception).__name__))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    def validations(self) -> list[tuple[int, int, int]]:
        """``(epoch, global_step, b)`` of every validation run, in order."""
        return [e[1:4] for e in self.events if e[0] == "val_end"]

    def sanity_batches(self) -> int:
        """Eval batches run before the first training epoch started (the sanity check)."""
        kinds = self.kinds()
        first = kinds.index("epoch_start") if "epoch_start" in kinds else len(kinds)
        return kinds[:first].count("val_batch")

    def val_batches_in_training(self) -> int:
        kinds = self.kinds()
        first = kinds.index("epoch_start") if "epoch_start" in kinds else len(kinds)
        return kinds[first:].count("val_batch")


class CountingEval:
    """An eval step that appends ``("val_batch",)`` to ``events`` on every call."""

    def __init__(self, events: list[tuple[Any, ...]], fn: Callable[..., Any] = mse) -> None:
        self.events = events
        self.step = fl.eval_step(fn)

    def __call__(self, state: Any, batch: Any) -> Any:
        self.events.append(("val_batch",))
        return self.step(state, batch)


class LoggedDataset(Dataset):
    """A map-style regression dataset that records, per epoch, the indices ``__getitem__`` gets.

    The epoch is set from outside (:class:`EpochMarker` sets it at each epoch start).
    """

    def __init__(self, n: int, *, seed: int = 0) -> None:
        self.x, self.y = samples(n, seed=seed)
        self.epoch: int | None = None
        self.seen: dict[int | None, list[int]] = collections.defaultdict(list)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen[self.epoch].append(int(i))
        return self.x[i], self.y[i]


class EpochMarker(fl.Callback):
    """Tells a :class:`LoggedDataset` which epoch it is serving."""

    def __init__(self, dataset: LoggedDataset) -> None:
        self.dataset = dataset

    def on_train_epoch_start(self, state: Any) -> None:
        self.dataset.epoch = state.loop.epoch


class InterruptAt(fl.Callback):
    """Raises ``KeyboardInterrupt`` once, after the training batch ``at`` (counted over epochs)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.fired = False

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> None:
        if not self.fired and state.loop.total_batch_idx - 1 == self.at:
            self.fired = True
            raise KeyboardInterrupt


class RecordingLogger:
    """A logger sink that records its calls: ``metrics`` is a list of ``(step, dict)``."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.hparams: list[Mapping[str, Any]] = []
        self.statuses: list[str] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        self.hparams.append(dict(params))

    def finalize(self, status: str) -> None:
        self.statuses.append(status)

    @property
    def log_dir(self) -> str | None:
        return None

    def values(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every logged ``key``."""
        return [(step, m[key]) for step, m in self.metrics if key in m]


def assert_same_training(actual: Any, expected: Any) -> None:
    """``step``, ``params``, ``buffers``, ``opt_state`` and ``rng`` bitwise equal."""
    for name in ("step", "params", "buffers", "opt_state", "rng"):
        assert_trees_equal(getattr(actual, name), getattr(expected, name), msg=name)


class SyncProbe(fl.Callback):
    """Records every host read of a tensor during fit, with where it happened.

    ``segment`` counts training batches (0 = before the first batch: the sanity check); the
    logging and validation boundaries seen in each segment are counted in ``boundaries``.
    Reads of 0-d integer CPU tensors are host-side counters (the state's ``step`` and ``rng``,
    the optimizer's ``count`` / ``mini_step``) and are allowed anywhere; so are reads of the
    learning rate of the optimizer state the step receives (a 0-d float64 CPU scalar read the
    way torch.optim reads its ``lr``). Any other read is a data read: a device sync on an
    accelerator.
    """

    READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.segment, self.global_step, self.in_step = 0, 0, False
        self.lr: torch.Tensor | None = None
        self.data_reads: list[tuple[int, int, bool, str, torch.dtype]] = []
        self.boundaries: dict[int, int] = {0: 1}  # the sanity check
        self.logs = 0
        for name in self.READS:
            orig = getattr(torch.Tensor, name)

            def read(t: torch.Tensor, *args: Any, _orig: Any = orig, _name: str = name, **kwargs: Any) -> Any:
                self.record(_name, t)
                return _orig(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, read)

    def record(self, name: str, t: torch.Tensor) -> None:
        """Keep a read unless it is of a host-side counter or of the step's learning rate."""
        counter = t.dim() == 0 and t.device.type == "cpu" and not t.is_floating_point() and t.dtype != torch.bool
        if counter or t is self.lr:
            return
        self.data_reads.append((self.segment, self.global_step, self.in_step, name, t.dtype))

    def wrap(self, step: Any) -> Any:
        """``step`` marked as the train step: reads inside it are flagged ``in_step``; the
        Trainer's flags still reach it (``with_options``)."""
        probe = self

        class Probed:
            options = step.options

            def __call__(self, state: Any, batch: Any) -> Any:
                probe.in_step, probe.lr = True, flo.learning_rate(state.opt_state)
                try:
                    return step(state, batch)
                finally:
                    probe.in_step, probe.lr = False, None

            def with_options(self, options: Any) -> Any:
                return probe.wrap(step.with_options(options))

        return Probed()

    def on_train_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> None:
        self.segment += 1
        self.global_step = state.loop.global_step

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        self.logs += 1
        self.boundaries[self.segment] = self.boundaries.get(self.segment, 0) + 1

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        self.boundaries[self.segment] = self.boundaries.get(self.segment, 0) + 1
