"""Every CPU input of PyTorch's own optimizer test database (``optim_db``) for SGD, Adam, AdamW,
RMSprop and Adagrad: the fnloop alias with the same arguments gives bitwise torch.optim's
parameters (foreach implementation) over 50 steps of a small MLP."""

from __future__ import annotations

import os
import sys
import types
import unittest
from typing import Any

import pytest
import torch

import fnloop.optim as flo

import optim_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

STEPS = 50
ALIASES = {"SGD": flo.sgd, "Adam": flo.adam, "AdamW": flo.adamw, "RMSprop": flo.rmsprop, "Adagrad": flo.adagrad}
# Flags that choose torch's implementation, not the arithmetic: fnloop has one implementation.
IMPLEMENTATION = {"foreach", "fused", "differentiable", "capturable"}
# Inputs fnloop cannot express, with the reason (none today).
SKIPS: dict[str, str] = {}


def _optim_db() -> list[Any]:
    """torch's ``optim_db``, imported without its test-only dependency ``expecttest`` and without
    leaving the environment variables its import sets."""
    if "expecttest" not in sys.modules:
        try:
            import expecttest  # noqa: F401
        except ImportError:
            stub = types.ModuleType("expecttest")
            stub.TestCase = unittest.TestCase  # type: ignore[attr-defined]
            stub.ACCEPT = False  # type: ignore[attr-defined]
            sys.modules["expecttest"] = stub
    environ = dict(os.environ)
    try:
        from torch.testing._internal.common_optimizers import optim_db
    finally:
        os.environ.clear()
        os.environ.update(environ)
    return list(optim_db)


def _inputs() -> list[Any]:
    cases = []
    for info in _optim_db():
        name = info.optim_cls.__name__
        if name not in ALIASES:
            continue
        for optim_input in info.optim_inputs_func(device="cpu"):
            case_id = f"{name}-{optim_input.desc}".replace(" ", "_")
            marks = [pytest.mark.skip(reason=SKIPS[case_id])] if case_id in SKIPS else []
            cases.append(pytest.param(info.optim_cls, optim_input.kwargs, id=case_id, marks=marks))
    return cases


INPUTS = _inputs()


def test_the_database_covers_the_five_optimizers_and_their_flags() -> None:
    names = {p.id.split("-")[0] for p in INPUTS}
    assert names == set(ALIASES)
    assert len(INPUTS) >= 34
    assert sum(bool(p.values[1].get("maximize")) for p in INPUTS) >= 7
    assert sum(isinstance(p.values[1].get("lr"), torch.Tensor) for p in INPUTS) >= 2


@pytest.mark.parametrize(("optim_cls", "kwargs"), INPUTS)
def test_alias_is_bitwise_torch_optim(optim_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
    hyper = {k: v for k, v in kwargs.items() if k not in IMPLEMENTATION}
    impl = {k: v for k, v in kwargs.items() if k in IMPLEMENTATION} or {"foreach": True}
    module, batches = sc.make_mlp(0), sc.make_batches()
    ref = sc.torch_run(module, lambda p: optim_cls(p, **hyper, **impl), batches, STEPS)
    got = sc.fnloop_run(module, ALIASES[optim_cls.__name__](**hyper), batches, STEPS)
    sc.assert_dicts_equal(got["params"], ref["params"])
    start = dict(module.named_parameters())
    assert all(not torch.equal(got["params"][k], start[k]) for k in start), "the run did not train every parameter"
