"""``Trainer.config``: the Trainer's flags resolved once into the :class:`LoopConfig` the loops
read; the loops take it (or its values) and never the Trainer.

Expected values come from Lightning's rules written out by hand: ``fast_dev_run=n`` runs ``n``
batches of each loop in one epoch with no sanity check and ``max_steps=n``; ``overfit_batches``
becomes the train and val limit; ``max_epochs`` is 1000 when neither epochs, steps nor time
are limited.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pathlib

import pytest
import torch

import fnloop as fl
import fnloop.loops
from fnloop.loops.config import LoopConfig
from fnloop.loops.fit import run_fit
from fnloop.options import StepOptions

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

LOOPS = pathlib.Path(fnloop.loops.__file__).parent
QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False)

# id, Trainer flags, expected LoopConfig fields
TABLE = [
    ("defaults", {}, dict(max_epochs=1000, max_steps=-1, limit_train_batches=None, val_check_interval=1.0,
                          check_val_every_n_epoch=1, num_sanity_val_steps=2, donate=True, seed=None)),
    ("limits", dict(max_epochs=3, min_epochs=1, min_steps=2, limit_train_batches=5, limit_val_batches=0.5,
                    limit_test_batches=2, limit_predict_batches=1),
     dict(max_epochs=3, min_epochs=1, min_steps=2, limit_train_batches=5, limit_val_batches=0.5,
          limit_test_batches=2, limit_predict_batches=1)),
    ("steps-only", dict(max_steps=10), dict(max_epochs=-1, max_steps=10)),
    ("time", dict(max_time={"minutes": 1}), dict(max_epochs=-1, max_time=60.0)),
    ("fast-dev-run", dict(fast_dev_run=2, max_epochs=9, num_sanity_val_steps=5, val_check_interval=3),
     dict(max_epochs=1, max_steps=2, limit_train_batches=2, limit_val_batches=2, limit_predict_batches=2,
          num_sanity_val_steps=0, val_check_interval=1.0, check_val_every_n_epoch=1)),
    ("overfit", dict(overfit_batches=3, limit_test_batches=4),
     dict(limit_train_batches=3, limit_val_batches=3, limit_test_batches=4, overfit_batches=3)),
    ("validation", dict(val_check_interval=7, check_val_every_n_epoch=None),
     dict(val_check_interval=7, check_val_every_n_epoch=None)),
    ("step-flags", dict(accumulate_grad_batches=4, gradient_clip_val=0.5, gradient_clip_algorithm="value",
                        on_nonfinite="skip", precision=64),
     dict(step=StepOptions(4, 0.5, "value", True, "64-true"), on_nonfinite="skip")),
    ("effects", dict(log_every_n_steps=7, seed=3, donate=False, deterministic=True, inference_mode=False,
                     reload_dataloaders_every_n_epochs=2, use_distributed_sampler=False, stop_signals=[]),
     dict(log_every_n_steps=7, seed=3, donate=False, deterministic=True, inference_mode=False,
          reload_dataloaders_every_n_epochs=2, use_distributed_sampler=False, stop_signals=[])),
]


@pytest.mark.parametrize(("flags", "expected"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_trainer_flags_land_resolved_in_its_config(flags, expected):
    config = fl.Trainer(**QUIET, **flags).config
    assert {name: getattr(config, name) for name in expected} == expected


def test_the_config_is_built_once_and_holds_the_trainers_sinks_and_callbacks():
    timer = fl.Timer(60)
    trainer = fl.Trainer(callbacks=timer, **QUIET)
    config = trainer.config
    assert trainer.config is config and config.loggers is trainer.loggers and config.callbacks == (timer,)
    assert config.flags["max_epochs"] is None and "callbacks" not in config.flags  # the recorded hyperparameters
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_epochs = 3  # type: ignore[misc]
    assert dataclasses.replace(trainer, max_epochs=2).config.max_epochs == 2  # a new Trainer, a new config


def test_run_fit_takes_a_config_and_trains_without_a_trainer():
    assert next(iter(inspect.signature(run_fit).parameters)) == "config"
    data = sc.batches(3)
    config = LoopConfig(max_epochs=2, enable_progress_bar=False, enable_model_summary=False)
    state = run_fit(config, sc.linear_state(), fl.train_step(sc.mse), data)
    reference = fl.Trainer(max_epochs=2, **QUIET).fit(sc.linear_state(), fl.train_step(sc.mse), data)
    assert (state.loop.global_step, state.loop.epoch, state.loop.status) == (6, 2, "finished")
    torch.testing.assert_close(state.params, reference.params, rtol=0, atol=0)


def _names(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
    return found


@pytest.mark.parametrize("path", sorted(LOOPS.glob("*.py")), ids=lambda p: p.name)
def test_the_loops_read_no_trainer_and_print_nothing(path):
    names = _names(ast.parse(path.read_text()))
    assert not {"trainer", "Trainer"} & names, f"{path.name} reads a Trainer: take fnloop.loops.config.LoopConfig values"
    assert "print" not in names, f"{path.name} prints: report through the loggers or the progress bar"
