"""``multi_transform`` and ``set_to_zero``: parameter groups bitwise against torch.optim's
parameter groups, frozen groups untouched (same tensors, no in-place write), the optax-style
update against the fused path, donated against pure calls, labels as a tree or a function; bad
input."""

from __future__ import annotations

import collections
import pathlib
import re
from typing import Any

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import ConfigError

import optim_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

STEPS = 40
LR = {"backbone": 1e-4, "head": 1e-3}
WEIGHT_DECAY = 0.05


def make_model(seed: int = 0) -> torch.nn.Module:
    """A backbone (linear, layer norm, linear) and a linear head, 8 -> 4."""
    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh()
    )
    return torch.nn.Sequential(collections.OrderedDict(backbone=backbone, head=torch.nn.Linear(32, 4)))


def label_of(name: str, param: torch.Tensor) -> str:
    """``backbone/decay``, ``head/no_decay``, ...: biases and norm weights (1-d) get no decay."""
    return f"{name.split('.')[0]}/{'decay' if param.ndim >= 2 else 'no_decay'}"


def labels(params: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: label_of(k, p) for k, p in params.items()}


def fine_tune_tx() -> flo.GradientTransformation:
    return flo.multi_transform(
        {
            f"{group}/{decay}": flo.adamw(lr=LR[group], weight_decay=WEIGHT_DECAY if decay == "decay" else 0.0)
            for group in LR
            for decay in ("decay", "no_decay")
        },
        labels,
    )


def torch_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    groups: dict[str, list[torch.nn.Parameter]] = collections.defaultdict(list)
    for name, p in model.named_parameters():
        groups[label_of(name, p)].append(p)
    return [
        {"params": ps, "lr": LR[label.split("/")[0]], "weight_decay": WEIGHT_DECAY if label.endswith("/decay") else 0.0}
        for label, ps in groups.items()
    ]


def test_parameter_groups_are_bitwise_torch_adamw_groups() -> None:
    module, batches = make_model(), sc.make_batches()
    ref = sc.torch_run(
        module, lambda groups: torch.optim.AdamW(groups, foreach=True), batches, STEPS, param_groups=torch_groups
    )
    got = sc.fnloop_run(module, fine_tune_tx(), batches, STEPS)
    sc.assert_dicts_equal(got["params"], ref["params"])
    start = dict(module.named_parameters())
    assert all(not torch.equal(got["params"][k], start[k]) for k in start), "the run did not train every parameter"
    assert sorted(got["opt_state"].inner_states) == [
        "backbone/decay",
        "backbone/no_decay",
        "head/decay",
        "head/no_decay",
    ]
    assert float(flo.learning_rate(got["opt_state"].inner_states["head/decay"])) == LR["head"]


def frozen_tx() -> flo.GradientTransformation:
    return flo.multi_transform(
        {"frozen": flo.set_to_zero(), "head": flo.adamw(lr=1e-3)},
        lambda params: {k: "head" if k.startswith("head") else "frozen" for k in params},
    )


def test_frozen_group_keeps_its_tensors_and_the_rest_matches_torch() -> None:
    module, batches = make_model(), sc.make_batches()

    def head_only(model: torch.nn.Module) -> Any:
        model.backbone.requires_grad_(False)
        return model.head.parameters()

    ref = sc.torch_run(module, lambda ps: torch.optim.AdamW(ps, foreach=True), batches, STEPS, param_groups=head_only)
    state = fl.TrainState.create(module, frozen_tx())
    frozen = {k: (v, v._version) for k, v in state.params.items() if k.startswith("backbone")}
    step = fl.train_step(sc.mse)
    for k in range(STEPS):
        state, _ = step(state, batches[k % len(batches)])
    sc.assert_dicts_equal(state.params, ref["params"])
    for k, (tensor, version) in frozen.items():
        assert state.params[k] is tensor and tensor._version == version, f"{k} was replaced or written"
    assert state.opt_state.inner_states["frozen"] == flo.EmptyState()


def test_set_to_zero_alone() -> None:
    params, grads = {"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}
    tx = flo.set_to_zero()
    updates, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(updates["w"], torch.zeros(3))
    for donate in (False, True):
        new, _ = flo.fused_apply(tx)(dict(grads), tx.init(params), params, donate=donate, consume=True)
        assert new["w"] is params["w"] and params["w"]._version == 0


def _params() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in make_model().named_parameters()}


def _grads(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}


def _clone(tree: Any) -> Any:
    return fl.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


@pytest.mark.parametrize("make", [fine_tune_tx, frozen_tx], ids=["groups", "frozen"])
def test_update_matches_fused_and_donated_matches_pure(make: Any) -> None:
    tx = make()
    apply = flo.fused_apply(tx)
    p_pure = p_optax = p_donated = _params()
    s_pure = s_optax = tx.init(p_pure)
    s_donated = _clone(s_pure)
    p_donated = _clone(p_donated)
    for k in range(5):
        g = _grads(p_pure, k)
        snap = sc.snapshot(g, p_pure, s_pure)
        new_p, new_s = apply(g, s_pure, p_pure)
        sc.assert_unchanged(snap)
        p_donated, s_donated = apply(dict(g), s_donated, p_donated, donate=True, consume=True)
        updates, s_optax = tx.update(g, s_optax, p_optax)
        p_optax = flo.apply_updates(p_optax, updates)
        p_pure, s_pure = new_p, new_s
    sc.assert_dicts_equal(p_donated, p_pure)
    fl.testing.assert_trees_equal(s_donated, s_pure)
    sc.assert_dicts_close(p_optax, p_pure)


def test_labels_as_a_tree_equal_labels_as_a_function() -> None:
    params = _params()
    as_tree = flo.multi_transform(
        {"a": flo.sgd(lr=0.1, momentum=0.9), "b": flo.adam(lr=1e-2)}, {k: "ab"[i % 2] for i, k in enumerate(params)}
    )
    as_fn = flo.multi_transform(
        {"a": flo.sgd(lr=0.1, momentum=0.9), "b": flo.adam(lr=1e-2)},
        lambda ps: {k: "ab"[i % 2] for i, k in enumerate(ps)},
    )
    got = [flo.fused_apply(tx)(_grads(params, 0), tx.init(params), params)[0] for tx in (as_tree, as_fn)]
    sc.assert_dicts_equal(got[0], got[1])


def test_nested_params_are_grouped_by_key_path() -> None:
    params = {"enc": {"w": torch.ones(2, 2), "b": torch.ones(2)}, "out": [torch.ones(3)]}
    tx = flo.multi_transform(
        {"x": flo.sgd(lr=0.5), "y": flo.set_to_zero()}, {"enc": {"w": "x", "b": "y"}, "out": ["x"]}
    )
    state = tx.init(params)
    assert float(flo.learning_rate(state.inner_states["x"])) == 0.5
    grads = fl.tree_map(torch.ones_like, params)
    new, _ = flo.fused_apply(tx)(grads, state, params)
    assert torch.equal(new["enc"]["w"], torch.full((2, 2), 0.5)) and new["enc"]["b"] is params["enc"]["b"]
    assert torch.equal(new["out"][0], torch.full((3,), 0.5))


def test_compiles_without_graph_breaks() -> None:
    torch._dynamo.reset()
    module, batches = make_model(), sc.make_batches()
    state = fl.TrainState.create(module, fine_tune_tx())
    eager, fast = fl.train_step(sc.mse), fl.compile(fl.train_step(sc.mse))
    compiled_state, _ = fast(state, batches[0])
    eager_state, _ = eager(state, batches[0])
    sc.assert_dicts_close(compiled_state.params, eager_state.params)
    torch._dynamo.reset()


BAD = {
    "empty-transforms": (lambda: flo.multi_transform({}, {}), "transforms"),
    "not-a-transform": (lambda: flo.multi_transform({"a": "adam"}, {}), "transforms['a']"),
    "unknown-label": (
        lambda: flo.multi_transform({"a": flo.sgd(lr=0.1)}, {"w": "b"}).init({"w": torch.ones(1)}),
        "labels['w']",
    ),
    "labels-tree-mismatch": (
        lambda: flo.multi_transform({"a": flo.sgd(lr=0.1)}, {"v": "a"}).init({"w": torch.ones(1)}),
        "labels' tree",
    ),
}


@pytest.mark.parametrize(("make", "argument"), list(BAD.values()), ids=list(BAD))
def test_bad_input_raises_config_error_naming_the_argument(make: Any, argument: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert argument in str(info.value)


def test_readme_fine_tuning_snippet_runs() -> None:
    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "multi_transform" in b]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "README fine-tuning", "exec"), namespace)
    state, frozen = namespace["state"], namespace["frozen"]
    assert state.tx is frozen and set(state.opt_state.inner_states) == {"body", "head"}
    assert torch.isfinite(namespace["metrics"]["loss"])
