"""Trainer flag validation: every bad value raises a ConfigError naming the flag and the values
it accepts; values that depend on the data raise when fit sees the data."""

from __future__ import annotations

import dataclasses
import datetime
import sys

import pytest

import fnloop as fl
from fnloop.errors import ConfigError

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

# (flags, what the message must contain: the flag, then the accepted values)
BAD_FLAGS = [
    (dict(max_epochs=-2), "max_epochs=-2", "int >= -1 or None"),
    (dict(max_epochs=1.5), "max_epochs=1.5", "int >= -1"),
    (dict(max_epochs=True), "max_epochs=True", "int >= -1"),
    (dict(max_steps=-5), "max_steps=-5", "int >= -1"),
    (dict(min_steps=-1), "min_steps=-1", "int >= 0 or None"),
    (dict(limit_train_batches=1.5), "limit_train_batches=1.5", "float in [0.0, 1.0]"),
    (dict(limit_val_batches=-1), "limit_val_batches=-1", "int >= 0"),
    (dict(limit_test_batches="all"), "limit_test_batches='all'", "int >= 0"),
    (dict(limit_predict_batches=-0.5), "limit_predict_batches=-0.5", "float in [0.0, 1.0]"),
    (dict(val_check_interval=0), "val_check_interval=0", "int >= 1 (batches) or a float in (0.0, 1.0]"),
    (dict(val_check_interval=1.5), "val_check_interval=1.5", "int >= 1 (batches) or a float in (0.0, 1.0]"),
    (dict(val_check_interval=0.0), "val_check_interval=0.0", "float in (0.0, 1.0]"),
    (dict(check_val_every_n_epoch=0), "check_val_every_n_epoch=0", "int >= 1 or None"),
    (dict(num_sanity_val_steps=-2), "num_sanity_val_steps=-2", "int >= -1"),
    (dict(log_every_n_steps=0), "log_every_n_steps=0", "int >= 1"),
    (dict(accumulate_grad_batches=0), "accumulate_grad_batches=0", "int >= 1"),
    (dict(accumulate_grad_batches=2.0), "accumulate_grad_batches=2.0", "int >= 1"),
    (dict(gradient_clip_val=-1), "gradient_clip_val=-1", "number >= 0 or None"),
    (dict(gradient_clip_val="1"), "gradient_clip_val='1'", "number >= 0 or None"),
    (dict(gradient_clip_algorithm="foo"), "gradient_clip_algorithm='foo'", "'norm', 'value'"),
    (dict(on_nonfinite="ignore"), "on_nonfinite='ignore'", "'raise', 'skip', 'stop'"),
    (dict(callbacks=[object()]), "callbacks[0]", "fnloop.Callback"),
    (dict(callbacks=[sc.Recorder(), "EarlyStopping"]), "callbacks[1]", "fnloop.Callback"),
    (dict(max_time="soon"), "max_time", "'DD:HH:MM:SS'"),
    (dict(max_time=0), "max_time", "positive"),
    (dict(max_time={"fortnights": 1}), "max_time", "days/hours/minutes/seconds"),
    (dict(overfit_batches=-1), "overfit_batches=-1", "int >= 0 (batches) or a float in [0.0, 1.0]"),
    (dict(overfit_batches=1.5), "overfit_batches=1.5", "float in [0.0, 1.0]"),
    (dict(fast_dev_run=-1), "fast_dev_run=-1", "True/False or an int >= 0"),
    (dict(fast_dev_run="yes"), "fast_dev_run='yes'", "True/False or an int >= 0"),
    (dict(seed=-1), "seed=-1", "int >= 0"),
    (dict(min_epochs=5, max_epochs=3), "min_epochs=5, max_epochs=3", "min_epochs must be <= max_epochs"),
]


def _id(flags: dict) -> str:
    return ",".join(f"{k}={v!r}"[:24] for k, v in flags.items())


@pytest.mark.parametrize(("flags", "flag", "accepted"), BAD_FLAGS, ids=[_id(f) for f, _, _ in BAD_FLAGS])
def test_bad_flag_raises_config_error_naming_flag_and_accepted_values(flags, flag, accepted):
    with pytest.raises(ConfigError) as info:
        fl.Trainer(**flags)
    message = str(info.value)
    assert flag in message
    assert accepted in message


def test_a_single_non_callback_object_raises_config_error():
    with pytest.raises(ConfigError, match="callbacks"):
        fl.Trainer(callbacks=object())


GOOD_FLAGS = [
    dict(max_epochs=-1),
    dict(max_epochs=None, max_steps=10),
    dict(min_epochs=2, max_epochs=2),
    dict(limit_train_batches=0, limit_val_batches=1.0, limit_test_batches=5, limit_predict_batches=0.25),
    dict(val_check_interval=1.0),
    dict(val_check_interval=7, check_val_every_n_epoch=None),
    dict(num_sanity_val_steps=-1),
    dict(gradient_clip_val=0.5, gradient_clip_algorithm="value"),
    dict(fast_dev_run=5),
    dict(overfit_batches=0.5),
    dict(overfit_batches=3),
    dict(max_time="00:01:30:00"),
    dict(max_time=datetime.timedelta(minutes=5)),
    dict(max_time={"hours": 1}),
    dict(max_time=30),
    dict(on_nonfinite="skip"),
    dict(callbacks=sc.Recorder()),
    dict(seed=0),
]


@pytest.mark.parametrize("flags", GOOD_FLAGS)
def test_good_flags_are_accepted(flags):
    trainer = fl.Trainer(**flags)
    for name, value in flags.items():
        assert getattr(trainer, name) == value


def test_trainer_is_frozen():
    trainer = fl.Trainer(max_epochs=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        trainer.max_epochs = 4


def test_resolved_max_epochs_follows_lightning():
    assert fl.Trainer().resolved_max_epochs == 1000
    assert fl.Trainer(max_steps=10).resolved_max_epochs == -1
    assert fl.Trainer(max_time=60).resolved_max_epochs == -1
    assert fl.Trainer(max_epochs=3, max_steps=10).resolved_max_epochs == 3


# --- values that depend on the data raise at fit ------------------------------------------------------

class _Stream:
    """A re-iterable of batches without a length."""

    def __iter__(self):
        return iter(sc.batches(3))


@pytest.mark.parametrize(
    ("flags", "data", "needle"),
    [
        (dict(val_check_interval=20), sc.batches(10), r"val_check_interval=20 is larger than the 10 training batches"),
        (dict(val_check_interval=0.5), _Stream(), r"val_check_interval=0.5 .* no length"),
        (dict(limit_train_batches=0.05), sc.batches(10), r"limit_train_batches=0.05"),
    ],
    ids=["interval_longer_than_epoch", "fraction_of_unknown_length", "fraction_below_one_batch"],
)
def test_data_dependent_flags_raise_at_fit(flags, data, needle):
    trainer = sc.quiet_trainer(max_epochs=1, **flags)  # constructing is fine
    with pytest.raises(ConfigError, match=needle):
        trainer.fit(
            sc.linear_state(), fl.train_step(sc.mse), data, val_step=fl.eval_step(sc.mse), val_data=sc.batches(2)
        )


def test_interval_longer_than_epoch_is_fine_when_counting_across_epochs():
    trainer = sc.quiet_trainer(max_epochs=3, val_check_interval=20, check_val_every_n_epoch=None)
    state = trainer.fit(
        sc.linear_state(), fl.train_step(sc.mse), sc.batches(10), val_step=fl.eval_step(sc.mse), val_data=sc.batches(2)
    )
    assert state.loop.val_count == 1  # after the 20th batch


def test_a_bad_logger_is_rejected_at_fit():
    trainer = sc.quiet_trainer(max_epochs=1, logger=object())
    with pytest.raises(ConfigError, match=r"Trainer\(logger=\.\.\.\).*log_metrics/log_hparams/finalize/log_dir"):
        trainer.fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(2))


def test_fit_rejects_what_is_not_a_train_state():
    with pytest.raises(ConfigError, match="fnloop.TrainState"):
        sc.quiet_trainer(max_epochs=1).fit({"weight": 1}, fl.train_step(sc.mse), sc.batches(2))
