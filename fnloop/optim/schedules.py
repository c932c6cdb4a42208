"""Learning-rate schedules with the values of ``torch.optim.lr_scheduler``.

A schedule is a frozen callable ``count -> lr``. ``count`` is the number of optimizer steps
already taken: a Python int or an integer tensor of any device. The result is a float64
tensor with the shape of the count (0-d for an int, on the CPU), on the count's device.

``schedule(k)`` is the learning rate torch uses for the (k+1)-th ``optimizer.step()``: the
``param_groups[0]["lr"]`` of an optimizer whose scheduler was built at step 0 and stepped
once after every optimizer step, ``k`` times. Schedules are closed-form tensor arithmetic
with no branching on tensor values, so they trace under ``torch.compile(fullgraph=True)``
without recompiling when the count changes, and they run under ``torch.func.vmap``.

A negative Python int count raises :class:`~fnloop.errors.ConfigError`; a negative tensor
count cannot be checked without a device sync and is read as 0.

Example:
    >>> import fnloop.optim as flo
    >>> s = flo.warmup_cosine(1e-3, warmup_steps=100, decay_steps=10_000)
    >>> s
    warmup_cosine(peak_lr=0.001, warmup_steps=100, decay_steps=10000, end_lr=0.0, init_lr=0.0)
    >>> float(s(50))
    0.0005
"""

from __future__ import annotations

from collections.abc import Sequence

from fnloop.errors import ConfigError
from fnloop.optim._schedule_impl import (
    _Constant,
    _Exponential,
    _Join,
    _Linear,
    _MultiStep,
    _OneCycle,
    _StepLR,
    _WarmupCosine,
    _increasing,
    _int,
    _lr,
    _real,
)
from fnloop.types import Schedule

__all__ = [
    "constant",
    "linear",
    "warmup_cosine",
    "exponential",
    "step_lr",
    "multistep",
    "one_cycle",
    "join",
]

# --- argument checks ---------------------------------------------------------------------


def constant(lr: float) -> Schedule:
    """The same learning rate at every step.

    Matches ``ConstantLR(factor=1.0)``, or no scheduler, with ``lr`` as the optimizer's lr.

    Args:
        lr: the learning rate, a finite number >= 0.

    Example:
        >>> float(flo.constant(0.1)(1000))
        0.1
    """
    return _Constant(_lr("constant", "lr", lr))


def linear(start_lr: float, end_lr: float, steps: int) -> Schedule:
    """Linear from ``start_lr`` (count 0) to ``end_lr`` (count ``steps``), then ``end_lr``.

    Matches ``LinearLR(start_factor=1.0, end_factor=end_lr / start_lr, total_iters=steps)`` on
    an optimizer with ``lr=start_lr`` when decaying, ``LinearLR(start_factor=start_lr / end_lr,
    end_factor=1.0, total_iters=steps)`` with ``lr=end_lr`` when warming up, and
    ``PolynomialLR(total_iters=steps, power=1.0)`` when ``end_lr == 0``.

    Args:
        start_lr: learning rate at count 0, >= 0.
        end_lr: learning rate from count ``steps`` on, >= 0.
        steps: length of the ramp, an int >= 1.

    Example:
        >>> [round(float(flo.linear(1.0, 0.0, 4)(k)), 2) for k in range(6)]
        [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    return _Linear(
        _lr("linear", "start_lr", start_lr),
        _lr("linear", "end_lr", end_lr),
        _int("linear", "steps", steps),
    )


def warmup_cosine(
    peak_lr: float,
    *,
    warmup_steps: int,
    decay_steps: int,
    end_lr: float = 0.0,
    init_lr: float = 0.0,
) -> Schedule:
    """Linear warmup then cosine decay (optax ``warmup_cosine_decay_schedule``).

    Linear from ``init_lr`` to ``peak_lr`` over ``warmup_steps``, then a half cosine from
    ``peak_lr`` to ``end_lr`` until count ``decay_steps`` (which counts the warmup too), then
    ``end_lr``. Matches, on an optimizer with ``lr=peak_lr`` and up to ``decay_steps``,
    ``SequentialLR([LinearLR(start_factor=init_lr / peak_lr, end_factor=1.0,
    total_iters=warmup_steps), CosineAnnealingLR(T_max=decay_steps - warmup_steps,
    eta_min=end_lr)], milestones=[warmup_steps])``, or ``CosineAnnealingLR`` alone when
    ``warmup_steps == 0``. Unlike ``CosineAnnealingLR``, it does not rise again after the end.

    Args:
        peak_lr: learning rate at the end of the warmup, >= 0.
        warmup_steps: length of the warmup, an int >= 0.
        decay_steps: count at which ``end_lr`` is reached, an int > ``warmup_steps``.
        end_lr: final learning rate, >= 0.
        init_lr: learning rate at count 0, >= 0.

    Example:
        >>> s = flo.warmup_cosine(1.0, warmup_steps=2, decay_steps=6, end_lr=0.1)
        >>> [round(float(s(k)), 3) for k in range(8)]
        [0.0, 0.5, 1.0, 0.868, 0.55, 0.232, 0.1, 0.1]
    """
    fn = "warmup_cosine"
    warmup = _int(fn, "warmup_steps", warmup_steps, low=0)
    decay = _int(fn, "decay_steps", decay_steps, low=1)
    if decay <= warmup:
        raise ConfigError(
            f"{fn}: decay_steps={decay} is not accepted with warmup_steps={warmup}; decay_steps "
            "counts the whole schedule, warmup included: pass decay_steps > warmup_steps."
        )
    return _WarmupCosine(
        _lr(fn, "peak_lr", peak_lr), warmup, decay, _lr(fn, "end_lr", end_lr), _lr(fn, "init_lr", init_lr)
    )


def exponential(lr: float, gamma: float) -> Schedule:
    """``lr * gamma ** count``.

    Matches ``ExponentialLR(gamma=gamma)`` on an optimizer with ``lr=lr``.

    Args:
        lr: learning rate at count 0, >= 0.
        gamma: factor per step, >= 0.

    Example:
        >>> float(flo.exponential(1.0, 0.5)(3))
        0.125
    """
    return _Exponential(_lr("exponential", "lr", lr), _real("exponential", "gamma", gamma))


def step_lr(lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``lr * gamma ** (count // step_size)``.

    Matches ``StepLR(step_size=step_size, gamma=gamma)`` on an optimizer with ``lr=lr``.

    Args:
        lr: learning rate at count 0, >= 0.
        step_size: steps between two decays, an int >= 1.
        gamma: factor of each decay, >= 0.

    Example:
        >>> [float(flo.step_lr(1.0, 2, gamma=0.5)(k)) for k in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    return _StepLR(
        _lr("step_lr", "lr", lr),
        _int("step_lr", "step_size", step_size),
        _real("step_lr", "gamma", gamma),
    )


def multistep(lr: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``lr * gamma ** (number of milestones <= count)``.

    Matches ``MultiStepLR(milestones=milestones, gamma=gamma)`` on an optimizer with ``lr=lr``.

    Args:
        lr: learning rate at count 0, >= 0.
        milestones: strictly increasing ints >= 0.
        gamma: factor at each milestone, >= 0.

    Example:
        >>> [float(flo.multistep(1.0, [1, 3], gamma=0.5)(k)) for k in range(4)]
        [1.0, 0.5, 0.5, 0.25]
    """
    return _MultiStep(
        _lr("multistep", "lr", lr),
        _increasing("multistep", "milestones", milestones, low=0),
        _real("multistep", "gamma", gamma),
    )


def one_cycle(
    max_lr: float,
    total_steps: int,
    *,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
    cycle_momentum: bool = False,
) -> Schedule:
    """The 1cycle policy: up from ``max_lr / div_factor`` to ``max_lr``, then down.

    Matches ``OneCycleLR(max_lr=max_lr, total_steps=total_steps, pct_start=pct_start,
    anneal_strategy=anneal_strategy, div_factor=div_factor, final_div_factor=final_div_factor,
    three_phase=three_phase, cycle_momentum=False)`` for counts below ``total_steps``. Counts
    from ``total_steps`` on hold the value at ``total_steps - 1`` (torch extrapolates one step,
    then raises). Only the learning rate is scheduled: momentum is not cycled, so
    ``cycle_momentum=True`` is rejected; set momentum or betas on the optimizer. Where torch
    divides by zero (``pct_start * total_steps == 1``), the phase is read at its end point.

    Args:
        max_lr: peak learning rate, >= 0.
        total_steps: length of the cycle, an int >= 1.
        pct_start: fraction of the cycle spent increasing, in [0, 1].
        anneal_strategy: ``"cos"`` or ``"linear"``.
        div_factor: the cycle starts at ``max_lr / div_factor``; > 0.
        final_div_factor: the cycle ends at ``max_lr / div_factor / final_div_factor``; > 0.
        three_phase: go back down to ``max_lr / div_factor`` before the final decay.
        cycle_momentum: must be False.

    Example:
        >>> s = flo.one_cycle(1.0, 100)
        >>> round(float(s(0)), 4), round(float(s(29)), 4), float(s(99))
        (0.04, 1.0, 4e-06)
    """
    fn = "one_cycle"
    if cycle_momentum is not False:
        raise ConfigError(
            f"{fn}: cycle_momentum={cycle_momentum!r} is not accepted; fnloop schedules set only "
            "the learning rate: pass cycle_momentum=False and set momentum/betas on the optimizer."
        )
    if anneal_strategy not in ("cos", "linear"):
        raise ConfigError(
            f"{fn}: anneal_strategy={anneal_strategy!r} is not accepted; pass 'cos' or 'linear'."
        )
    pct = _real(fn, "pct_start", pct_start)
    if pct > 1.0:
        raise ConfigError(f"{fn}: pct_start={pct_start!r} is not accepted; pass a number in [0, 1].")
    if not isinstance(three_phase, bool):
        raise ConfigError(f"{fn}: three_phase={three_phase!r} is not accepted; pass True or False.")
    return _OneCycle(
        _lr(fn, "max_lr", max_lr),
        _int(fn, "total_steps", total_steps),
        pct,
        anneal_strategy,
        _real(fn, "div_factor", div_factor, strict=True),
        _real(fn, "final_div_factor", final_div_factor, strict=True),
        three_phase,
    )


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Schedule ``i`` until ``boundaries[i]``; schedule ``i + 1`` sees ``count - boundaries[i]``.

    Like optax ``join_schedules``; matches ``SequentialLR(schedulers, milestones=boundaries)``
    whose schedulers match ``schedules``. A schedule that is not an fnloop schedule must accept
    an integer tensor count (possibly negative where it is not used) and return a tensor or float.

    Args:
        schedules: one or more schedules.
        boundaries: ``len(schedules) - 1`` strictly increasing ints >= 1.

    Example:
        >>> s = flo.join([flo.linear(0.0, 1.0, 2), flo.exponential(1.0, 0.5)], [2])
        >>> [float(s(k)) for k in range(5)]
        [0.0, 0.5, 1.0, 0.5, 0.25]
    """
    if isinstance(schedules, (str, bytes)) or not isinstance(schedules, Sequence) or not schedules:
        raise ConfigError(f"join: schedules={schedules!r} is not accepted; pass a non-empty list.")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise ConfigError(
                f"join: schedules[{i}]={s!r} is not accepted; pass a schedule (count -> lr)."
            )
    bounds = _increasing("join", "boundaries", boundaries, low=1)
    if len(bounds) != len(schedules) - 1:
        raise ConfigError(
            f"join: boundaries={list(bounds)} is not accepted with {len(schedules)} schedules; "
            f"pass len(schedules) - 1 = {len(schedules) - 1} boundaries."
        )
    return _Join(tuple(schedules), bounds)
