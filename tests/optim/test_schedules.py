"""Learning-rate schedules against ``torch.optim.lr_scheduler``, compile, vmap and bad arguments."""

from __future__ import annotations

import doctest
import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as L

import fnloop.optim.schedules as schedules_module
from fnloop.errors import ConfigError
from fnloop.optim.schedules import (
    constant,
    exponential,
    join,
    linear,
    multistep,
    one_cycle,
    step_lr,
    warmup_cosine,
)

STEPS = 300
RTOL = 1e-7


def torch_lrs(make_scheduler, lr: float, n: int = STEPS) -> list[float]:
    """``param_groups[0]["lr"]`` used by each of ``n`` optimizer steps, the scheduler stepped after each."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    scheduler = make_scheduler(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return out


def assert_matches(schedule, expected: list[float], atol: float = 0.0) -> None:
    for k, want in enumerate(expected):
        got = schedule(k)
        assert got.dtype == torch.float64 and got.shape == ()
        got = float(got)
        assert abs(got - want) <= RTOL * abs(want) + atol, f"{schedule!r} at count {k}: {got} != {want}"


def _cosine_lambda(init, peak, end, warmup, decay):
    """The closed warmup-cosine formula as a ``LambdaLR`` factor of ``peak``."""

    def factor(k: int) -> float:
        if k < warmup:
            return (init + (peak - init) * k / warmup) / peak
        t = min(k - warmup, decay - warmup) / (decay - warmup)
        return (end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))) / peak

    return factor


# Each case: (schedule, optimizer lr, torch scheduler factory, atol). The atol (1e-12 * peak) is
# non-zero only where torch's chainable (recursive) formula runs down to lr ~ 0, where its
# accumulated rounding is compared with our closed form; with torch 2.13 the observed worst
# difference is ~1e-14 relative everywhere, so the allowance is a margin, not a necessity.
CASES = {
    "constant": (constant(0.1), 0.1, lambda o: None, 0.0),
    "constant-ConstantLR": (constant(0.03), 0.03, lambda o: L.ConstantLR(o, factor=1.0, total_iters=5), 0.0),
    "constant-zero": (constant(0.0), 0.0, lambda o: None, 0.0),
    "linear-decay-LinearLR": (
        linear(0.1, 0.01, 100),
        0.1,
        lambda o: L.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=100),
        0.0,
    ),
    "linear-to-zero-LinearLR": (
        linear(0.5, 0.0, 300),
        0.5,
        lambda o: L.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=300),
        1e-12 * 0.5,
    ),
    "linear-to-zero-PolynomialLR": (
        linear(1.0, 0.0, 37),
        1.0,
        lambda o: L.PolynomialLR(o, total_iters=37, power=1.0),
        1e-12,
    ),
    "linear-warmup-LinearLR": (
        linear(0.001, 0.1, 50),
        0.1,
        lambda o: L.LinearLR(o, start_factor=0.01, end_factor=1.0, total_iters=50),
        0.0,
    ),
    "warmup_cosine-Sequential": (
        warmup_cosine(1e-3, warmup_steps=10, decay_steps=300, init_lr=1e-5),
        1e-3,
        lambda o: L.SequentialLR(
            o,
            [L.LinearLR(o, start_factor=0.01, end_factor=1.0, total_iters=10), L.CosineAnnealingLR(o, T_max=290)],
            milestones=[10],
        ),
        1e-12 * 1e-3,
    ),
    "warmup_cosine-Sequential-end_lr": (
        warmup_cosine(0.1, warmup_steps=50, decay_steps=400, end_lr=1e-3, init_lr=0.01),
        0.1,
        lambda o: L.SequentialLR(
            o,
            [
                L.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=50),
                L.CosineAnnealingLR(o, T_max=350, eta_min=1e-3),
            ],
            milestones=[50],
        ),
        0.0,
    ),
    "warmup_cosine-init0-LambdaLR": (
        warmup_cosine(2e-3, warmup_steps=20, decay_steps=200, end_lr=1e-4),
        2e-3,
        lambda o: L.LambdaLR(o, _cosine_lambda(0.0, 2e-3, 1e-4, 20, 200)),
        0.0,
    ),
    "warmup_cosine-no-warmup-Cosine": (
        warmup_cosine(0.01, warmup_steps=0, decay_steps=300, end_lr=1e-4),
        0.01,
        lambda o: L.CosineAnnealingLR(o, T_max=300, eta_min=1e-4),
        0.0,
    ),
    "exponential-0.99": (exponential(0.1, 0.99), 0.1, lambda o: L.ExponentialLR(o, gamma=0.99), 0.0),
    "exponential-0.9": (exponential(1.0, 0.9), 1.0, lambda o: L.ExponentialLR(o, gamma=0.9), 0.0),
    "exponential-growth": (exponential(0.01, 1.01), 0.01, lambda o: L.ExponentialLR(o, gamma=1.01), 0.0),
    "step_lr-30": (step_lr(0.1, 30), 0.1, lambda o: L.StepLR(o, step_size=30), 0.0),
    "step_lr-7": (step_lr(1.0, 7, gamma=0.5), 1.0, lambda o: L.StepLR(o, step_size=7, gamma=0.5), 0.0),
    "step_lr-1": (step_lr(0.05, 1, gamma=0.97), 0.05, lambda o: L.StepLR(o, step_size=1, gamma=0.97), 0.0),
    "multistep": (multistep(0.1, [30, 80, 200]), 0.1, lambda o: L.MultiStepLR(o, [30, 80, 200]), 0.0),
    "multistep-0": (
        multistep(1.0, [0, 5, 6, 299], gamma=0.5),
        1.0,
        lambda o: L.MultiStepLR(o, [0, 5, 6, 299], gamma=0.5),
        0.0,
    ),
    "multistep-far": (multistep(0.3, [1000]), 0.3, lambda o: L.MultiStepLR(o, [1000]), 0.0),
    "one_cycle-cos": (
        one_cycle(0.1, 300),
        0.1,
        lambda o: L.OneCycleLR(o, 0.1, total_steps=300, cycle_momentum=False),
        0.0,
    ),
    "one_cycle-linear": (
        one_cycle(0.1, 300, anneal_strategy="linear"),
        0.1,
        lambda o: L.OneCycleLR(o, 0.1, total_steps=300, anneal_strategy="linear", cycle_momentum=False),
        0.0,
    ),
    "one_cycle-three_phase": (
        one_cycle(1.0, 300, pct_start=0.25, three_phase=True),
        1.0,
        lambda o: L.OneCycleLR(o, 1.0, total_steps=300, pct_start=0.25, three_phase=True, cycle_momentum=False),
        0.0,
    ),
    "one_cycle-factors": (
        one_cycle(2.0, 250, pct_start=0.5, div_factor=10.0, final_div_factor=100.0),
        2.0,
        lambda o: L.OneCycleLR(
            o, 2.0, total_steps=250, pct_start=0.5, div_factor=10.0, final_div_factor=100.0, cycle_momentum=False
        ),
        0.0,
    ),
    "one_cycle-pct0": (
        one_cycle(0.01, 100, pct_start=0.0, anneal_strategy="linear"),
        0.01,
        lambda o: L.OneCycleLR(o, 0.01, total_steps=100, pct_start=0.0, anneal_strategy="linear", cycle_momentum=False),
        0.0,
    ),
    "one_cycle-short": (
        one_cycle(1.0, 5),
        1.0,
        lambda o: L.OneCycleLR(o, 1.0, total_steps=5, cycle_momentum=False),
        0.0,
    ),
    "join-warmup-exponential": (
        join([linear(0.01, 0.1, 10), exponential(0.1, 0.98)], [10]),
        0.1,
        lambda o: L.SequentialLR(
            o,
            [L.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=10), L.ExponentialLR(o, gamma=0.98)],
            milestones=[10],
        ),
        0.0,
    ),
    "join-three": (
        join(
            [step_lr(0.2, 5, gamma=0.5), multistep(0.2, [10, 20]), warmup_cosine(0.2, warmup_steps=0, decay_steps=200)],
            [40, 100],
        ),
        0.2,
        lambda o: L.SequentialLR(
            o,
            [L.StepLR(o, 5, gamma=0.5), L.MultiStepLR(o, [10, 20]), L.CosineAnnealingLR(o, T_max=200)],
            milestones=[40, 100],
        ),
        1e-12 * 0.2,
    ),
}


def _steps(schedule) -> int:
    # torch's OneCycleLR stops at total_steps; compare the whole cycle when it is shorter.
    total = getattr(schedule, "total_steps", STEPS)
    return min(STEPS, total)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_torch_scheduler(case):
    schedule, lr, make, atol = CASES[case]
    assert_matches(schedule, torch_lrs(make, lr, _steps(schedule)), atol)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_int_and_tensor_counts_agree(case):
    schedule = CASES[case][0]
    for k in range(0, 2 * STEPS, 7):
        expected = schedule(k)
        for dtype in (torch.int64, torch.int32):
            got = schedule(torch.tensor(k, dtype=dtype))
            assert got.dtype == torch.float64 and got.shape == () and got.device == torch.device("cpu")
            assert torch.equal(got, expected), f"{schedule!r} at count {k} ({dtype})"


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_vmap_over_counts(case):
    schedule = CASES[case][0]
    counts = torch.arange(0, 2 * STEPS, 3)
    got = torch.func.vmap(schedule)(counts)
    expected = torch.stack([schedule(int(k)) for k in counts])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize(
    "schedule",
    [
        warmup_cosine(1e-3, warmup_steps=5, decay_steps=50, end_lr=1e-5, init_lr=1e-4),
        one_cycle(0.1, 40, three_phase=True),
        join([linear(0.0, 0.1, 5), multistep(0.1, [3, 9]), exponential(0.05, 0.9)], [5, 15]),
    ],
    ids=["warmup_cosine", "one_cycle", "join"],
)
def test_compiles_once_over_counts(schedule):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(schedule, backend=counter, fullgraph=True)
    for k in [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 14, 15, 16, 20, 25, 30, 39, 40, 41, 100]:
        got = compiled(torch.tensor(k))
        torch.testing.assert_close(got, schedule(k), rtol=1e-12, atol=0.0)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_warmup_cosine_holds_end_lr_after_decay_steps():
    schedule = warmup_cosine(0.1, warmup_steps=10, decay_steps=100, end_lr=0.002)
    assert float(schedule(10)) == 0.1
    for k in (100, 101, 150, 10_000):
        assert float(schedule(k)) == 0.002


def test_linear_and_multistep_hold_their_last_value():
    assert float(linear(0.1, 0.01, 20)(20)) == 0.01
    assert float(linear(0.1, 0.01, 20)(10**6)) == 0.01
    assert float(multistep(1.0, [2, 4], gamma=0.5)(10**6)) == 0.25


@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_holds_last_value_after_total_steps(three_phase):
    schedule = one_cycle(0.1, 50, three_phase=three_phase)
    last = schedule(49)
    torch.testing.assert_close(last, torch.tensor(0.1 / 25 / 1e4, dtype=torch.float64), rtol=1e-12, atol=0.0)
    for k in (50, 51, 1000):
        assert torch.equal(schedule(k), last)


def test_one_cycle_zero_length_warmup_reads_the_peak():
    # pct_start * total_steps == 1: torch divides by zero at count 0; the phase is its end point.
    schedule = one_cycle(0.5, 10, pct_start=0.1)
    assert float(schedule(0)) == 0.5
    assert float(schedule(9)) == pytest.approx(0.5 / 25 / 1e4, rel=1e-12)


def test_negative_tensor_count_reads_as_zero():
    schedule = warmup_cosine(1.0, warmup_steps=4, decay_steps=8, init_lr=0.2)
    assert torch.equal(schedule(torch.tensor(-3)), schedule(0))


def test_join_accepts_plain_callables():
    schedule = join([constant(0.1), lambda count: 0.5 ** count.to(torch.float64)], [3])
    assert [float(schedule(k)) for k in range(6)] == [0.1, 0.1, 0.1, 1.0, 0.5, 0.25]
    nested = join([schedule, constant(0.01)], [5])
    assert [float(nested(k)) for k in range(7)] == [0.1, 0.1, 0.1, 1.0, 0.5, 0.01, 0.01]


def test_tensor_shape_and_device_follow_the_count():
    schedule = one_cycle(0.1, 100)
    counts = torch.arange(100)
    got = schedule(counts)
    assert got.shape == (100,) and got.dtype == torch.float64
    assert torch.equal(got, torch.stack([schedule(k) for k in range(100)]))
    meta = schedule(torch.tensor(3, device="meta"))
    assert meta.device == torch.device("meta") and meta.dtype == torch.float64


def test_repr_reads_as_the_call():
    assert repr(warmup_cosine(0.001, warmup_steps=100, decay_steps=10000)) == (
        "warmup_cosine(peak_lr=0.001, warmup_steps=100, decay_steps=10000, end_lr=0.0, init_lr=0.0)"
    )
    assert repr(join([constant(0.1), multistep(0.1, (10, 20))], [5])) == (
        "join(schedules=[constant(lr=0.1), multistep(lr=0.1, milestones=[10, 20], gamma=0.1)], boundaries=[5])"
    )
    assert repr(one_cycle(0.1, 1000)) == (
        "one_cycle(max_lr=0.1, total_steps=1000, pct_start=0.3, anneal_strategy='cos', div_factor=25.0, "
        "final_div_factor=10000.0, three_phase=False)"
    )
    assert warmup_cosine(0.1, warmup_steps=1, decay_steps=2) == warmup_cosine(0.1, warmup_steps=1, decay_steps=2)


BAD = [
    ("constant(-0.1)", lambda: constant(-0.1), "lr=-0.1"),
    ("constant(nan)", lambda: constant(float("nan")), "lr=nan"),
    ("linear steps=0", lambda: linear(0.1, 0.0, 0), "steps=0"),
    ("linear steps=2.5", lambda: linear(0.1, 0.0, 2.5), "steps=2.5"),
    ("linear end_lr<0", lambda: linear(0.1, -1.0, 10), "end_lr=-1.0"),
    ("linear start_lr<0", lambda: linear(-0.1, 1.0, 10), "start_lr=-0.1"),
    ("warmup_cosine peak_lr", lambda: warmup_cosine(-1.0, warmup_steps=1, decay_steps=9), "peak_lr=-1.0"),
    ("warmup_cosine warmup<0", lambda: warmup_cosine(1e-3, warmup_steps=-1, decay_steps=10), "warmup_steps=-1"),
    ("warmup_cosine warmup float", lambda: warmup_cosine(1e-3, warmup_steps=1.5, decay_steps=10), "warmup_steps"),
    ("warmup_cosine decay<=warmup", lambda: warmup_cosine(1e-3, warmup_steps=10, decay_steps=10), "decay_steps=10"),
    ("warmup_cosine decay=0", lambda: warmup_cosine(1e-3, warmup_steps=0, decay_steps=0), "decay_steps=0"),
    ("warmup_cosine init_lr", lambda: warmup_cosine(1e-3, warmup_steps=1, decay_steps=9, init_lr=-1.0), "init_lr"),
    ("warmup_cosine end_lr", lambda: warmup_cosine(1e-3, warmup_steps=1, decay_steps=9, end_lr=-1.0), "end_lr"),
    ("exponential gamma<0", lambda: exponential(0.1, -0.5), "gamma=-0.5"),
    ("exponential lr", lambda: exponential(-0.1, 0.5), "lr=-0.1"),
    ("step_lr step_size=0", lambda: step_lr(0.1, 0), "step_size=0"),
    ("step_lr gamma inf", lambda: step_lr(0.1, 3, gamma=float("inf")), "gamma=inf"),
    ("multistep decreasing", lambda: multistep(0.1, [10, 5]), "milestones=[10, 5]"),
    ("multistep repeated", lambda: multistep(0.1, [5, 5]), "milestones=[5, 5]"),
    ("multistep negative", lambda: multistep(0.1, [-1, 3]), "milestones[0]=-1"),
    ("multistep float", lambda: multistep(0.1, [1.5]), "milestones[0]=1.5"),
    ("multistep not a list", lambda: multistep(0.1, 10), "milestones=10"),
    ("one_cycle total_steps", lambda: one_cycle(0.1, 0), "total_steps=0"),
    ("one_cycle pct_start", lambda: one_cycle(0.1, 10, pct_start=1.5), "pct_start=1.5"),
    ("one_cycle anneal", lambda: one_cycle(0.1, 10, anneal_strategy="exp"), "anneal_strategy='exp'"),
    ("one_cycle momentum", lambda: one_cycle(0.1, 10, cycle_momentum=True), "cycle_momentum=True"),
    ("one_cycle div_factor", lambda: one_cycle(0.1, 10, div_factor=0.0), "div_factor=0.0"),
    ("one_cycle final_div", lambda: one_cycle(0.1, 10, final_div_factor=-1.0), "final_div_factor=-1.0"),
    ("one_cycle max_lr", lambda: one_cycle(-0.1, 10), "max_lr=-0.1"),
    ("join no boundaries", lambda: join([constant(0.1), constant(0.2)], []), "boundaries=[]"),
    (
        "join boundaries count",
        lambda: join([constant(0.1), constant(0.2)], [3, 6]),
        "boundaries=[3, 6]",
    ),
    (
        "join non-increasing",
        lambda: join([constant(0.1), constant(0.2), constant(0.3)], [10, 10]),
        "boundaries=[10, 10]",
    ),
    ("join boundary 0", lambda: join([constant(0.1), constant(0.2)], [0]), "boundaries[0]=0"),
    ("join empty", lambda: join([], []), "schedules=[]"),
    ("join not callable", lambda: join([constant(0.1), 3], [5]), "schedules[1]=3"),
]


@pytest.mark.parametrize(("make", "names"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_raise_config_error_naming_them(make, names):
    with pytest.raises(ConfigError, match="is not accepted") as info:
        make()
    assert names in str(info.value)


@pytest.mark.parametrize(
    "schedule",
    [constant(0.1), warmup_cosine(0.1, warmup_steps=2, decay_steps=5), join([constant(0.1), constant(0.2)], [3])],
    ids=["constant", "warmup_cosine", "join"],
)
def test_bad_counts_raise_config_error(schedule):
    with pytest.raises(ConfigError, match=r"negative step count, count=-1"):
        schedule(-1)
    with pytest.raises(ConfigError, match=r"count=1\.5"):
        schedule(1.5)
    with pytest.raises(ConfigError, match="torch.float32 count tensor"):
        schedule(torch.tensor(2.0))


@settings(max_examples=60, deadline=None)
@given(
    peak=st.floats(1e-6, 10.0),
    init=st.floats(0.0, 10.0),
    end=st.floats(0.0, 10.0),
    warmup=st.integers(0, 50),
    length=st.integers(1, 200),
    count=st.integers(0, 400),
)
def test_warmup_cosine_stays_between_its_end_points(peak, init, end, warmup, length, count):
    schedule = warmup_cosine(peak, warmup_steps=warmup, decay_steps=warmup + length, end_lr=end, init_lr=init)
    value = float(schedule(count))
    low, high = (min(init, peak), max(init, peak)) if count < warmup else (min(peak, end), max(peak, end))
    assert low * (1 - 1e-12) <= value <= high * (1 + 1e-12)
    assert torch.equal(schedule(torch.tensor(count)), schedule(count))


def test_docstring_examples_run():
    flo = types.SimpleNamespace(**{name: getattr(schedules_module, name) for name in schedules_module.__all__})
    result = doctest.testmod(schedules_module, extraglobs={"flo": flo}, report=False)
    assert result.failed == 0 and result.attempted > 10
