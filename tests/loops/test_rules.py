"""Lightning's loop rules as pure functions, pinned against tables written by hand.

Rules (Lightning's documented behaviour):

* optimizer step after batch ``b`` (0-based in the epoch) when ``(b + 1) % k == 0`` or ``b``
  is the last batch of the epoch; an epoch of ``n`` batches has ``ceil(n / k)`` steps;
* ``val_check_interval`` float ``f``: validate every ``max(1, int(n * f))`` batches; int ``k``:
  every ``k`` batches of the epoch, or of the whole run when ``check_val_every_n_epoch`` is None;
  only in epochs where ``(epoch + 1) % check_val_every_n_epoch == 0``;
* fit is done when ``global_step >= max_steps`` (``-1``: no limit) or ``epoch >= max_epochs``.
"""

from __future__ import annotations

import math

import pytest

from fnloop.errors import ConfigError
from fnloop.loops import rules

# --- val_check_batch ------------------------------------------------------------------------------

# (n_batches, val_check_interval, check_val_every_n_epoch, expected)
VAL_CHECK_BATCH = [
    (10, 0.25, 1, 2),  # int(2.5)
    (10, 0.3, 1, 3),
    (10, 0.5, 1, 5),
    (10, 1.0, 1, 10),
    (3, 0.1, 1, 1),  # int(0.3) = 0 -> at least 1
    (7, 1.0, 2, 7),
    (10, 3, 1, 3),
    (10, 10, 1, 10),
    (4, 3, None, 3),
    (4, 20, None, 20),  # counts across epochs: may exceed an epoch
    (None, 1.0, 1, math.inf),  # unknown length: end of epoch only
    (None, 5, 1, 5),
]


@pytest.mark.parametrize(("n", "interval", "every", "expected"), VAL_CHECK_BATCH)
def test_val_check_batch_table(n, interval, every, expected):
    assert rules.val_check_batch(n, interval, check_val_every_n_epoch=every) == expected


@pytest.mark.parametrize(
    ("n", "interval", "every", "needle"),
    [
        (10, 20, 1, "val_check_interval=20"),
        (10, 11, 3, "check_val_every_n_epoch=None"),
        (None, 0.5, 1, "no length"),
    ],
)
def test_val_check_batch_rejects(n, interval, every, needle):
    with pytest.raises(ConfigError, match=needle):
        rules.val_check_batch(n, interval, check_val_every_n_epoch=every)


# --- should_validate ------------------------------------------------------------------------------

# (n, check_batch, check_val_every_n_epoch, epochs, expected validations as (epoch, b))
SHOULD_VALIDATE = [
    (10, 2, 1, 1, [(0, 1), (0, 3), (0, 5), (0, 7), (0, 9)]),
    (10, 3, 1, 1, [(0, 2), (0, 5), (0, 8)]),
    (10, 10, 1, 2, [(0, 9), (1, 9)]),
    (5, 5, 2, 4, [(1, 4), (3, 4)]),
    (4, 2, 3, 3, [(2, 1), (2, 3)]),
    (4, 3, None, 3, [(0, 2), (1, 1), (2, 0), (2, 3)]),  # total batch index 2, 5, 8, 11
    (3, 5, None, 4, [(1, 1), (3, 0)]),  # total batch index 4, 9
    (6, math.inf, 1, 2, [(0, 5), (1, 5)]),
]


@pytest.mark.parametrize(("n", "check", "every", "epochs", "expected"), SHOULD_VALIDATE)
def test_should_validate_table(n, check, every, epochs, expected):
    got = []
    total = 0
    for epoch in range(epochs):
        for b in range(n):
            if rules.should_validate(
                b, total_batch_idx=total, epoch=epoch, n_batches=n, check_batch=check, check_val_every_n_epoch=every
            ):
                got.append((epoch, b))
            total += 1
    assert got == expected


def test_should_validate_unknown_length_never_mid_epoch():
    assert not any(
        rules.should_validate(
            b, total_batch_idx=b, epoch=0, n_batches=None, check_batch=math.inf, check_val_every_n_epoch=1
        )
        for b in range(20)
    )


# --- optimizer steps ------------------------------------------------------------------------------

# (n, accumulate, batches after which the optimizer steps)
OPTIMIZER_STEPS = [
    (10, 1, list(range(10))),
    (10, 3, [2, 5, 8, 9]),
    (10, 4, [3, 7, 9]),
    (8, 4, [3, 7]),
    (3, 5, [2]),
    (1, 2, [0]),
    (None, 3, [2, 5, 8]),  # unknown length: no end-of-epoch step to predict
]


@pytest.mark.parametrize(("n", "k", "expected"), OPTIMIZER_STEPS)
def test_is_optimizer_step_table(n, k, expected):
    got = [b for b in range(n if n is not None else 10) if rules.is_optimizer_step(b, n_batches=n, accumulate=k)]
    assert got == expected


@pytest.mark.parametrize(("n", "k", "expected"), [(10, 1, 10), (10, 3, 4), (9, 3, 3), (10, 4, 3), (1, 4, 1), (0, 2, 0)])
def test_optimizer_steps_in_table(n, k, expected):
    assert rules.optimizer_steps_in(n, k) == expected


# --- stopping ---------------------------------------------------------------------------------------

# (epoch, global_step, max_epochs, max_steps, done)
FIT_DONE = [
    (0, 0, 1, -1, False),
    (1, 10, 1, -1, True),
    (3, 999, -1, 1000, False),
    (3, 1000, -1, 1000, True),
    (0, 15, 1000, 15, True),  # max_steps wins mid-epoch
    (2, 5, 2, 100, True),
    (5, 5, -1, -1, False),  # neither limit
]


@pytest.mark.parametrize(("epoch", "step", "max_epochs", "max_steps", "done"), FIT_DONE)
def test_fit_done_table(epoch, step, max_epochs, max_steps, done):
    assert rules.fit_done(epoch=epoch, global_step=step, max_epochs=max_epochs, max_steps=max_steps) is done


# (epochs done, global_step, min_epochs, min_steps, may stop)
CAN_STOP = [
    (0, 0, None, None, True),
    (2, 10, 3, None, False),
    (3, 10, 3, None, True),
    (5, 9, None, 10, False),
    (5, 10, None, 10, True),
    (3, 9, 3, 10, False),
    (2, 10, 3, 10, False),
]


@pytest.mark.parametrize(("epoch", "step", "min_epochs", "min_steps", "ok"), CAN_STOP)
def test_can_stop_early_table(epoch, step, min_epochs, min_steps, ok):
    assert rules.can_stop_early(epoch=epoch, global_step=step, min_epochs=min_epochs, min_steps=min_steps) is ok
