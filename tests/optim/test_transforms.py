"""Stateless transforms against torch: ``clip_by_global_norm`` / ``global_norm`` against
``clip_grad_norm_``, ``clip`` against ``clip_grad_value_``, clipping chained with AdamW, masks
and weight decay against torch param groups; bad input; purity."""

from __future__ import annotations

import functools
import sys
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnloop.optim as flo
from fnloop.errors import ConfigError
from fnloop.optim.base import fused_apply


import optim_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)
O = torch.optim

# Mixed shapes: a scalar, vectors, a matrix, a conv-like 4-d kernel.
SHAPES = {"a_scalar": (), "b_vector": (7,), "c_matrix": (5, 3), "d_kernel": (2, 3, 3, 3), "e_bias": (1,)}


def grads(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(shape, generator=g) for k, shape in SHAPES.items()}


def torch_grads(tree: dict[str, torch.Tensor]) -> list[torch.nn.Parameter]:
    """Parameters holding ``tree``'s values as their ``.grad`` (sorted by key, as the tree leaves)."""
    out = []
    for k in sorted(tree):
        p = torch.nn.Parameter(torch.zeros(SHAPES[k]))
        p.grad = tree[k].clone()
        out.append(p)
    return out


# (max_norm, gradient scale): the total norm of scale-1 gradients is ~7.5.
CLIP_CASES = {
    "tiny-max_norm": (1e-3, 1.0),
    "max_norm-0.5": (0.5, 1.0),
    "max_norm-1": (1.0, 1.0),
    "max_norm-5": (5.0, 1.0),
    "norm-below-threshold": (100.0, 1.0),
    "small-grads-below": (1.0, 1e-3),
    "large-grads": (2.0, 1e4),
}


@pytest.mark.parametrize(("max_norm", "scale"), list(CLIP_CASES.values()), ids=list(CLIP_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_by_global_norm_matches_clip_grad_norm_(max_norm: float, scale: float, seed: int) -> None:
    g = grads(seed, scale)
    params = torch_grads(g)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    tx = flo.clip_by_global_norm(max_norm)
    clipped, _ = tx.update(g, tx.init(g))
    assert torch.equal(flo.global_norm(g), total)
    sc.assert_dicts_equal(clipped, {k: p.grad for k, p in zip(sorted(g), params)})
    if float(total) <= max_norm:
        sc.assert_dicts_equal(clipped, g)
    else:
        assert float(flo.global_norm(clipped)) == pytest.approx(max_norm, rel=1e-5)


@pytest.mark.parametrize(
    "tree",
    [
        {"w": torch.tensor([3.0, 4.0])},
        {"a": torch.ones(2, 2), "b": {"c": torch.full((3,), -2.0), "d": torch.tensor(0.5)}},
        [torch.zeros(4), torch.zeros(())],
    ],
    ids=["3-4-5", "nested", "zeros"],
)
def test_global_norm_equals_torch_total_norm(tree: Any) -> None:
    leaves = sc.tensor_leaves(tree)
    params = []
    for leaf in leaves:
        p = torch.nn.Parameter(torch.zeros_like(leaf))
        p.grad = leaf.clone()
        params.append(p)
    total = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    assert torch.equal(flo.global_norm(tree), total)
    flat = torch.cat([x.flatten() for x in leaves])
    assert float(flo.global_norm(tree)) == pytest.approx(float(flat.norm()), rel=1e-6)


def test_global_norm_sums_a_params_dict_in_module_order() -> None:
    """``state.params`` is keyed in ``named_parameters()`` order, the order in which
    ``clip_grad_norm_`` stacks the per-parameter norms; summing them in another order (sorted
    keys) changes the last bit of the total norm, and so of every clipped gradient."""
    module = sc.make_mlp(0)
    names = [n for n, _ in module.named_parameters()]
    assert names != sorted(names)
    mismatched = []
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        g = {n: torch.randn(p.shape, generator=gen) for n, p in module.named_parameters()}
        params = [torch.nn.Parameter(torch.zeros_like(v)) for v in g.values()]
        for p, v in zip(params, g.values()):
            p.grad = v.clone()
        total = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        tx = flo.clip_by_global_norm(1.0)
        clipped, _ = tx.update(g, tx.init(g))
        same_clip = all(torch.equal(clipped[n], p.grad) for n, p in zip(g, params))
        if not (torch.equal(flo.global_norm(g), total) and same_clip):
            mismatched.append(seed)
    assert not mismatched, f"global norm differs from clip_grad_norm_ in the last bit for seeds {mismatched}"


def test_global_norm_of_empty_tree_is_zero() -> None:
    assert float(flo.global_norm({})) == 0.0


@pytest.mark.parametrize("max_delta", [1e-3, 0.1, 1.0, 10.0])
def test_clip_matches_clip_grad_value_(max_delta: float) -> None:
    g = grads(3, 1.0)
    params = torch_grads(g)
    torch.nn.utils.clip_grad_value_(params, max_delta, foreach=True)
    tx = flo.clip(max_delta)
    clipped, _ = tx.update(g, tx.init(g))
    sc.assert_dicts_equal(clipped, {k: p.grad for k, p in zip(sorted(g), params)})
    assert max(float(x.abs().max()) for x in clipped.values()) <= float(torch.tensor(max_delta))  # max_delta in float32


# --- chained with an optimizer, through train_step --------------------------------------------


@functools.cache
def clipped_adamw_runs(max_norm: float) -> tuple[dict[str, Any], dict[str, Any]]:
    module, batches = sc.make_mlp(0), sc.make_batches(scale=1.5)  # global norms ~0.8 to ~1.4
    make_torch = functools.partial(O.AdamW, lr=1e-2, weight_decay=0.05, foreach=True)
    ref = sc.torch_run(module, make_torch, batches, 100, max_norm=max_norm)
    tx = flo.chain(flo.clip_by_global_norm(max_norm), flo.adamw(lr=1e-2, weight_decay=0.05))
    return ref, sc.fnloop_run(module, tx, batches, 100)


@pytest.mark.parametrize("max_norm", [1.0, 0.1], ids=["max_norm-1-some-steps-clipped", "max_norm-0.1-all-clipped"])
def test_chain_clip_adamw_matches_torch(max_norm: float) -> None:
    ref, got = clipped_adamw_runs(max_norm)
    norms = [float(n) for n in ref["norms"]]
    assert any(n > max_norm for n in norms), "no step was clipped"
    if max_norm == 1.0:
        assert any(n < max_norm for n in norms), "every step was clipped"
    # Not bitwise: see test_global_norm_sums_a_params_dict_in_module_order.
    sc.assert_dicts_close(got["params"], ref["params"])
    _, (adam_state, *_) = got["opt_state"]
    for name, s in ref["state"].items():
        torch.testing.assert_close(adam_state.mu[name], s["exp_avg"], rtol=sc.RTOL, atol=sc.ATOL)
        torch.testing.assert_close(adam_state.nu[name], s["exp_avg_sq"], rtol=sc.RTOL, atol=sc.ATOL)


# --- masks and weight decay ----------------------------------------------------------------------


def _params() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sc.make_mlp(0).named_parameters()}


def _grads_like(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in params.items()}


def _explicit_mask(params: dict[str, torch.Tensor]) -> dict[str, bool]:
    return {k: k.endswith("weight") for k in params}


MASKS = {"ndim_mask": flo.ndim_mask(2), "dict-of-bools": _explicit_mask(_params())}


def test_ndim_mask_selects_matrices() -> None:
    params = _params()
    assert flo.ndim_mask(2)(params) == {k: v.ndim >= 2 for k, v in params.items()}
    assert flo.ndim_mask(2)(params) == _explicit_mask(params)
    assert all(flo.ndim_mask(1)(params).values())


@pytest.mark.parametrize("mask", list(MASKS.values()), ids=list(MASKS))
def test_masked_passes_masked_out_leaves_through(mask: Any) -> None:
    params = _params()
    flags = _explicit_mask(params)
    inner = flo.adam(lr=1e-2, amsgrad=True)
    tx = flo.masked(inner, mask)
    state = tx.init(params)
    sub = {k: v for k, v in params.items() if flags[k]}
    sub_state = inner.init(sub)
    assert len(sc.tensor_leaves(state.inner_state[0].mu)) == len(sub), "the inner state covers only the masked-in leaves"
    for k in range(5):
        g = _grads_like(params, k)
        updates, state = tx.update(g, state, params)
        sub_updates, sub_state = inner.update({n: g[n] for n in sub}, sub_state, sub)
        for name in params:
            if flags[name]:
                assert torch.equal(updates[name], sub_updates[name]), name
            else:
                assert torch.equal(updates[name], g[name]), f"{name} should pass through"
        params = flo.apply_updates(params, updates)
        sub = {n: params[n] for n in sub}
    assert float(flo.learning_rate(state)) == 1e-2


EMPTY_INNER = {
    "sgd": lambda: flo.sgd(lr=0.1),
    "adam": lambda: flo.adam(lr=1e-2),
    "add_decayed_weights": lambda: flo.add_decayed_weights(0.1),
    "clip_by_global_norm": lambda: flo.clip_by_global_norm(1.0),
}


@pytest.mark.parametrize("make", list(EMPTY_INNER.values()), ids=list(EMPTY_INNER))
def test_masked_with_every_leaf_masked_out_passes_everything_through(make: Any) -> None:
    """A mask that selects nothing (a model with only biases under ``ndim_mask(2)``) leaves the
    inner transform an empty list of leaves; every update passes through."""
    params = {"bias": torch.ones(3), "scale": torch.ones(())}
    g = {"bias": torch.tensor([1.0, -2.0, 3.0]), "scale": torch.tensor(0.5)}
    tx = flo.masked(make(), flo.ndim_mask(2))
    updates, _ = tx.update(g, tx.init(params), params)
    sc.assert_dicts_equal(updates, g)
    new_params, _ = fused_apply(tx)(g, tx.init(params), params)
    sc.assert_dicts_equal(new_params, flo.apply_updates(params, g))


@pytest.mark.parametrize("mask", [None, *MASKS.values()], ids=["no-mask", *MASKS])
def test_add_decayed_weights(mask: Any) -> None:
    params, wd = _params(), 0.05
    g = _grads_like(params, 7)
    tx = flo.add_decayed_weights(wd, mask=mask)
    out, _ = tx.update(g, tx.init(params), params)
    flags = _explicit_mask(params)
    for name in params:
        if mask is None or flags[name]:
            torch.testing.assert_close(out[name], g[name] + wd * params[name], rtol=1e-6, atol=1e-7)
            assert not torch.equal(out[name], g[name])
        else:
            assert torch.equal(out[name], g[name]), f"{name} should pass through"


def _two_groups(wd: float) -> Any:
    def groups(model: torch.nn.Module) -> list[dict[str, Any]]:
        named = list(model.named_parameters())
        return [
            {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
        ]

    return groups


@pytest.mark.parametrize("mask", list(MASKS.values()), ids=list(MASKS))
def test_adamw_mask_matches_torch_param_groups(mask: Any) -> None:
    module, batches = sc.make_mlp(0), sc.make_batches()
    make_torch = functools.partial(O.AdamW, lr=1e-2, foreach=True)
    ref = sc.torch_run(module, make_torch, batches, 200, param_groups=_two_groups(0.1))
    got = sc.fnloop_run(module, flo.adamw(lr=1e-2, weight_decay=0.1, mask=mask), batches, 200)
    sc.assert_dicts_close(got["params"], ref["params"])
    sc.assert_dicts_equal(got["params"], ref["params"])
    unmasked = sc.fnloop_run(module, flo.adamw(lr=1e-2, weight_decay=0.1), batches, 200)
    assert not torch.equal(unmasked["params"]["0.bias"], got["params"]["0.bias"]), "the mask changed nothing"


def test_add_decayed_weights_mask_matches_torch_sgd_param_groups() -> None:
    module, batches = sc.make_mlp(0), sc.make_batches()
    make_torch = functools.partial(O.SGD, lr=0.05, momentum=0.9, foreach=True)
    ref = sc.torch_run(module, make_torch, batches, 200, param_groups=_two_groups(0.01))
    tx = flo.chain(flo.add_decayed_weights(0.01, mask=flo.ndim_mask(2)), flo.sgd(lr=0.05, momentum=0.9))
    got = sc.fnloop_run(module, tx, batches, 200)
    sc.assert_dicts_close(got["params"], ref["params"])


# --- bad input ----------------------------------------------------------------------------------

BAD = {
    "clip_by_global_norm-zero": (lambda: flo.clip_by_global_norm(0.0), "max_norm"),
    "clip_by_global_norm-negative": (lambda: flo.clip_by_global_norm(-1.0), "max_norm"),
    "clip-negative": (lambda: flo.clip(-0.1), "max_delta"),
    "add_decayed_weights-negative": (lambda: flo.add_decayed_weights(-1e-4), "weight_decay"),
    "add_decayed_weights-without-params": (
        lambda: flo.add_decayed_weights(1e-4).update({"w": torch.ones(1)}, flo.EmptyState()),
        "params",
    ),
    "masked-mask-of-other-tree": (
        lambda: flo.masked(flo.sgd(lr=0.1), {"w": True}).init({"w": torch.ones(1), "b": torch.ones(1)}),
        "mask",
    ),
    "chain-of-a-function": (lambda: flo.chain(flo.sgd(lr=0.1), lambda g: g), "argument 1"),
}


@pytest.mark.parametrize(("make", "argument"), list(BAD.values()), ids=list(BAD))
def test_bad_input_raises_config_error_naming_the_argument(make: Any, argument: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert argument in str(info.value)


# --- purity --------------------------------------------------------------------------------------

PURITY = {
    "clip_by_global_norm": lambda: flo.clip_by_global_norm(0.5),
    "clip": lambda: flo.clip(0.3),
    "add_decayed_weights-masked": lambda: flo.add_decayed_weights(0.1, mask=flo.ndim_mask(2)),
    "masked-adam": lambda: flo.masked(flo.adam(lr=1e-2), flo.ndim_mask(2)),
    "chain-clip-adamw": lambda: flo.chain(flo.clip_by_global_norm(0.5), flo.adamw(lr=1e-2, weight_decay=0.1)),
    "chain-decay-sgd": lambda: flo.chain(flo.add_decayed_weights(0.1), flo.sgd(lr=0.1, momentum=0.9)),
}

shapes_st = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


@pytest.mark.parametrize("make", list(PURITY.values()), ids=list(PURITY))
@settings(max_examples=8, deadline=None)
@given(shapes=shapes_st, seed=st.integers(0, 2**16))
def test_transforms_never_mutate_inputs(make: Any, shapes: list[tuple[int, ...]], seed: int) -> None:
    tx = make()
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), *shapes]  # at least one leaf that ndim_mask(2) selects
    params = {f"p{i}": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    state = tx.init(params)
    for _ in range(2):
        g = {k: 3 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
        snap = sc.snapshot(g, params, state)
        updates, _ = tx.update(g, state, params)
        sc.assert_unchanged(snap)
        new_params, state = fused_apply(tx)(g, state, params)
        sc.assert_unchanged(snap)
        sc.assert_dicts_close(flo.apply_updates(params, updates), new_params)
        params = new_params
