"""The schedule classes behind :mod:`fnloop.optim.schedules`: argument checks, the count
conversion, and one frozen class per schedule with its tensor formula.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from fnloop.errors import ConfigError
from fnloop.types import Schedule

def _real(fn: str, name: str, value: Any, *, low: float = 0.0, strict: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        accepted = f"a finite number {'>' if strict else '>='} {low:g}"
        raise ConfigError(f"{fn}: {name}={value!r} is not accepted; pass {accepted}.")
    return float(value)


def _lr(fn: str, name: str, value: Any) -> float:
    try:
        return _real(fn, name, value)
    except ConfigError:
        raise ConfigError(
            f"{fn}: {name}={value!r} is not accepted; pass a finite learning rate >= 0 "
            "(torch.optim rejects negative learning rates)."
        ) from None


def _int(fn: str, name: str, value: Any, *, low: int = 1) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{fn}: {name}={value!r} is not accepted; pass an int >= {low}.")
    return int(value)


def _increasing(fn: str, name: str, values: Any, *, low: int) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ConfigError(f"{fn}: {name}={values!r} is not accepted; pass a list of ints.")
    out = tuple(_int(fn, f"{name}[{i}]", v, low=low) for i, v in enumerate(values))
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ConfigError(
            f"{fn}: {name}={list(out)} is not accepted; pass strictly increasing ints >= {low}."
        )
    return out


def _check_count(count: Any, schedule: object) -> None:
    """Reject float, bool and negative int counts (a tensor's sign is not read: no sync)."""
    if isinstance(count, torch.Tensor):
        if count.dtype.is_floating_point or count.dtype.is_complex or count.dtype == torch.bool:
            raise ConfigError(
                f"{schedule!r} was called with a {count.dtype} count tensor; pass an integer "
                "step count (an int or an integer tensor)."
            )
        return
    if not isinstance(count, numbers.Integral) or isinstance(count, bool):
        raise ConfigError(
            f"{schedule!r} was called with count={count!r}; pass an integer step count "
            "(an int or an integer tensor)."
        )
    if count < 0:
        raise ConfigError(
            f"{schedule!r} was called with a negative step count, count={count}; counts start "
            "at 0 (the number of optimizer steps already taken)."
        )


def _count(count: Any, schedule: object) -> torch.Tensor:
    """The count as a float64 tensor >= 0 (a negative tensor count reads as 0)."""
    _check_count(count, schedule)
    if isinstance(count, torch.Tensor):
        return torch.clamp(count.to(torch.float64), min=0.0)
    return torch.tensor(int(count), dtype=torch.float64)


# --- schedules -----------------------------------------------------------------------------


class _Schedule:
    """A frozen schedule: ``__call__`` reads the count, ``_value`` holds the formula."""

    _name: ClassVar[str]

    def __call__(self, count: int | torch.Tensor) -> torch.Tensor:
        return self._value(_count(count, self))

    def _value(self, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            args.append(f"{f.name}={list(value) if isinstance(value, tuple) else value!r}")
        return f"{self._name}({', '.join(args)})"


@dataclasses.dataclass(frozen=True, repr=False)
class _Constant(_Schedule):
    _name = "constant"
    lr: float

    def _value(self, k: torch.Tensor) -> torch.Tensor:
        return torch.full_like(k, self.lr)


@dataclasses.dataclass(frozen=True, repr=False)
class _Linear(_Schedule):
    _name = "linear"
    start_lr: float
    end_lr: float
    steps: int

    def _value(self, k: torch.Tensor) -> torch.Tensor:
        frac = torch.clamp(k / self.steps, max=1.0)
        return self.start_lr * (1.0 - frac) + self.end_lr * frac


@dataclasses.dataclass(frozen=True, repr=False)
class _WarmupCosine(_Schedule):
    _name = "warmup_cosine"
    peak_lr: float
    warmup_steps: int
    decay_steps: int
    end_lr: float
    init_lr: float

    def _value(self, k: torch.Tensor) -> torch.Tensor:
        length = self.decay_steps - self.warmup_steps
        t = torch.clamp(k - self.warmup_steps, min=0.0, max=float(length))
        c = 0.5 * (1.0 + torch.cos(math.pi * t / length))
        decay = self.peak_lr * c + self.end_lr * (1.0 - c)
        if self.warmup_steps == 0:
            return decay
        frac = k / self.warmup_steps
        warm = self.init_lr * (1.0 - frac) + self.peak_lr * frac
        return torch.where(k < self.warmup_steps, warm, decay)


@dataclasses.dataclass(frozen=True, repr=False)
class _Exponential(_Schedule):
    _name = "exponential"
    lr: float
    gamma: float

    def _value(self, k: torch.Tensor) -> torch.Tensor:
        return self.lr * torch.pow(self.gamma, k)


@dataclasses.dataclass(frozen=True, repr=False)
class _StepLR(_Schedule):
    _name = "step_lr"
    lr: float
    step_size: int
    gamma: float

    def _value(self, k: torch.Tensor) -> torch.Tensor:
        return self.lr * torch.pow(self.gamma, torch.div(k, self.step_size, rounding_mode="floor"))


@dataclasses.dataclass(frozen=True, repr=False)
class _MultiStep(_Schedule):
    _name = "multistep"
    lr: float
    milestones: tuple[int, ...]
    gamma: float

    def _value(self, k: torch.Tensor) -> torch.Tensor:
        passed = torch.zeros_like(k)
        for m in self.milestones:
            passed = passed + (k >= m).to(k.dtype)
        return self.lr * torch.pow(self.gamma, passed)


@dataclasses.dataclass(frozen=True, repr=False)
class _OneCycle(_Schedule):
    _name = "one_cycle"
    max_lr: float
    total_steps: int
    pct_start: float
    anneal_strategy: str
    div_factor: float
    final_div_factor: float
    three_phase: bool

    def _phases(self) -> list[tuple[float, float, float]]:
        """``(end_step, start_lr, end_lr)`` per phase, as ``torch.optim.lr_scheduler.OneCycleLR``."""
        total, pct = self.total_steps, self.pct_start
        initial = self.max_lr / self.div_factor
        low = initial / self.final_div_factor
        if self.three_phase:
            return [
                (float(pct * total) - 1, initial, self.max_lr),
                (float(2 * pct * total) - 2, self.max_lr, initial),
                (total - 1, initial, low),
            ]
        return [(float(pct * total) - 1, initial, self.max_lr), (total - 1, self.max_lr, low)]

    def _value(self, k: torch.Tensor) -> torch.Tensor:
        k = torch.clamp(k, max=float(self.total_steps - 1))
        start, values = 0.0, []
        for end, lr_a, lr_b in self._phases():
            # A phase of length 0 holds only its end point (torch divides by zero there).
            pct = (k - start) / (end - start) if end != start else torch.ones_like(k)
            if self.anneal_strategy == "cos":
                lr = lr_b + (lr_a - lr_b) / 2.0 * (torch.cos(math.pi * pct) + 1)
            else:
                lr = (lr_b - lr_a) * pct + lr_a
            values.append((end, lr))
            start = end
        out = values[-1][1]
        for end, lr in reversed(values[:-1]):
            out = torch.where(k <= end, lr, out)
        return out


@dataclasses.dataclass(frozen=True, repr=False)
class _Join(_Schedule):
    _name = "join"
    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]

    def __call__(self, count: int | torch.Tensor) -> torch.Tensor:
        _check_count(count, self)
        if not isinstance(count, torch.Tensor):
            count = torch.tensor(int(count), dtype=torch.int64)
        out = _as_lr(self.schedules[0](count), count)
        for boundary, schedule in zip(self.boundaries, self.schedules[1:], strict=True):
            out = torch.where(count < boundary, out, _as_lr(schedule(count - boundary), count))
        return out


def _as_lr(value: Any, count: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(torch.float64)
    return torch.full_like(count, value, dtype=torch.float64)


# --- public factories ----------------------------------------------------------------------
