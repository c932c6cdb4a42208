"""The transform type: ``fused`` is a typed field (no attributes on functions), ``fused_apply``
returns it or the ``update`` + ``apply_updates`` fallback; aliases are chains of the public small
transforms; ``multi_steps_flush``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import fnloop.optim as flo
from fnloop.errors import ConfigError

import optim_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


def _params() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sc.make_mlp(0).named_parameters()}


def _grads(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}


def test_a_pair_of_functions_is_still_a_transform_and_falls_back_to_update() -> None:
    tx = flo.GradientTransformation(
        lambda params: flo.EmptyState(), lambda u, s, params=None: ({k: -v for k, v in u.items()}, s)
    )
    assert tx.fused is None and tuple(tx) == (tx.init, tx.update, None)
    p = {"w": torch.ones(2)}
    new, _ = flo.fused_apply(tx)({"w": torch.ones(2)}, tx.init(p), p, donate=True, consume=True)
    assert torch.equal(new["w"], torch.zeros(2))


TRANSFORMS = {
    "sgd": lambda: flo.sgd(lr=0.1, momentum=0.9),
    "adamw": lambda: flo.adamw(lr=1e-3),
    "chain": lambda: flo.chain(flo.clip_by_global_norm(1.0), flo.rmsprop()),
    "multi_steps": lambda: flo.multi_steps(flo.adagrad(), every_k=2),
    "apply_if_finite": lambda: flo.apply_if_finite(flo.adam()),
    "multi_transform": lambda: flo.multi_transform({"a": flo.sgd()}, lambda p: {k: "a" for k in p}),
    "set_to_zero": flo.set_to_zero,
}


@pytest.mark.parametrize("make", list(TRANSFORMS.values()), ids=list(TRANSFORMS))
def test_the_fused_path_is_a_field_not_a_function_attribute(make: Any) -> None:
    tx = make()
    assert isinstance(tx, flo.GradientTransformation) and tx.fused is not None
    assert flo.fused_apply(tx) is tx.fused
    assert not {"apply", "flush", "every_k"} & set(vars(tx.update)), "attributes set on the update function"


# The aliases are these chains of public transforms: same update, step for step.
MEANINGS = {
    "sgd": (
        lambda: flo.sgd(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True),
        lambda: flo.chain(
            flo.scale(-1.0),
            flo.add_decayed_weights(0.01),
            flo.trace(0.9, dampening=0.1),
            flo.scale_by_learning_rate(0.1),
        ),
    ),
    "adam": (
        lambda: flo.adam(lr=1e-2, weight_decay=0.1, amsgrad=True),
        lambda: flo.chain(
            flo.add_decayed_weights(0.1), flo.scale_by_adam(amsgrad=True), flo.scale_by_learning_rate(1e-2)
        ),
    ),
    "adamw": (
        lambda: flo.adamw(lr=1e-2, weight_decay=0.1, mask=flo.ndim_mask(2)),
        lambda: flo.chain(
            flo.scale_by_adam(), flo.add_decayed_weights(0.1, mask=flo.ndim_mask(2)), flo.scale_by_learning_rate(1e-2)
        ),
    ),
    "rmsprop": (
        lambda: flo.rmsprop(lr=1e-2, centered=True, momentum=0.5),
        lambda: flo.chain(flo.scale_by_rms(centered=True), flo.trace(0.5), flo.scale_by_learning_rate(1e-2)),
    ),
    "adagrad": (
        lambda: flo.adagrad(lr=1e-2, lr_decay=0.1, initial_accumulator_value=0.1),
        lambda: flo.chain(
            flo.scale_by_rss(0.1), flo.scale_by_schedule(lambda k: 1 / (1 + k * 0.1)), flo.scale_by_learning_rate(1e-2)
        ),
    ),
}


@pytest.mark.parametrize(("alias", "chain"), list(MEANINGS.values()), ids=list(MEANINGS))
def test_alias_update_is_its_chain_of_small_transforms(alias: Any, chain: Any) -> None:
    a, c = alias(), chain()
    params = _params()
    sa, scn = a.init(params), c.init(params)
    for k in range(4):
        g = _grads(params, k)
        ua, sa = a.update(g, sa, params)
        uc, scn = c.update(g, scn, params)
        sc.assert_dicts_equal(ua, uc)
        params = flo.apply_updates(params, ua)


def test_multi_steps_flush_applies_a_partial_window() -> None:
    tx = flo.multi_steps(flo.sgd(lr=1.0), every_k=4)
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    for g in (1.0, 3.0):
        params, state = flo.fused_apply(tx)({"w": torch.full((2,), g)}, state, params)
    assert torch.equal(params["w"], torch.zeros(2)) and int(state.mini_step) == 2
    params, state = flo.multi_steps_flush(tx, state, params)
    assert torch.equal(params["w"], torch.full((2,), -1.0))  # (1 + 3) / every_k
    assert int(state.mini_step) == 0 and int(state.gradient_step) == 1
    assert flo.multi_steps_flush(tx, state, params)[0] is params  # nothing pending


def test_multi_steps_flush_refuses_another_transform() -> None:
    with pytest.raises(ConfigError, match="multi_steps"):
        flo.multi_steps_flush(flo.sgd(), flo.sgd().init({"w": torch.ones(1)}), {"w": torch.ones(1)})


def test_small_transforms_refuse_bad_arguments() -> None:
    for make, name in [
        (lambda: flo.trace(-0.1), "momentum"),
        (lambda: flo.scale_by_adam(b1=1.0), "b1"),
        (lambda: flo.scale_by_rms(alpha=-1.0), "alpha"),
        (lambda: flo.scale_by_rss(eps=-1.0), "eps"),
        (lambda: flo.scale("x"), "factor"),
        (lambda: flo.scale_by_schedule(0.1), "schedule"),
        (lambda: flo.sgd(lr=torch.ones(2)), "lr"),
        (lambda: flo.adam(lr=torch.tensor(-1.0)), "lr"),
    ]:
        with pytest.raises(ConfigError, match=name):
            make()
