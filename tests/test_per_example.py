"""``fl.per_example_grads`` against a loop of single-example gradients of a plain torch module."""

from __future__ import annotations

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_trees_close

import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


def _conv(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 2, 3)), torch.nn.Conv2d(1, 4, 2), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(), torch.nn.Linear(8, 3)
    )


def _frozen(seed: int = 0) -> torch.nn.Module:
    model = sc.make_mlp(seed)
    model[0].weight.requires_grad_(False)
    return model


CASES = {
    "mlp": (sc.make_mlp, sc.loss_fn),
    "tied": (sc.make_tied, sc.tied_loss),
    "frozen": (_frozen, sc.plain_loss),
    "conv-groupnorm": (_conv, sc.plain_loss),
}


def _reference(make, loss_fn, state, batch):
    """One backward per example on a plain module holding the state's weights."""
    module = make()
    with torch.no_grad():
        for n, p in module.named_parameters():  # tied weights: one name each
            p.copy_(state.params[n])
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    rows = []
    for j in range(batch[0].shape[0]):
        module.zero_grad(set_to_none=True)
        out = loss_fn(module, tuple(x[j : j + 1] for x in batch))
        (out[0] if isinstance(out, tuple) else out).backward()
        params = dict(module.named_parameters())
        rows.append({n: params[n].grad.clone() for n in names})
    return {n: torch.stack([r[n] for r in rows]) for n in names}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_a_loop_of_single_example_gradients(case):
    make, loss_fn = CASES[case]
    state = fl.TrainState.create(make(), flo.sgd(lr=0.1), seed=0)
    batch = sc.make_batch(7, seed=3)
    got = fl.per_example_grads(loss_fn)(state, batch)
    assert_trees_close(got, _reference(make, loss_fn, state, batch), rtol=1e-5, atol=1e-6)


def test_batch_dim_and_purity():
    state = fl.TrainState.create(sc.make_mlp(), flo.sgd(lr=0.1))
    x, y = sc.make_batch(5)
    before = torch.get_rng_state()
    a = fl.per_example_grads(sc.loss_fn)(state, (x, y))
    transposed = lambda m, b: sc.loss_fn(m, (b[0].T, b[1][0]))  # noqa: E731  examples along dim 1
    b = fl.per_example_grads(transposed, batch_dim=1)(state, (x.T.contiguous(), y[None]))
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(before, torch.get_rng_state())
    mean = {k: v.mean(0) for k, v in a.items()}  # the batch gradient of a mean loss
    full = torch.func.grad(lambda p: sc.loss_fn(fl.step.functional_model(state.module, p, {}), (x, y))[0])(state.params)
    assert_trees_close(mean, full, rtol=1e-5, atol=1e-6)


class _Pair:
    """A batch type registered with torch's pytree only (optree sees one leaf)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y


torch.utils._pytree.register_pytree_node(_Pair, lambda b: ([b.x, b.y], None), lambda xs, _: _Pair(*xs))


def test_batches_with_plain_leaves_and_types_only_torch_knows():
    state = fl.TrainState.create(sc.make_mlp(), flo.sgd(lr=0.1), seed=0)
    x, y = sc.make_batch(5, seed=1)
    want = fl.per_example_grads(sc.loss_fn)(state, (x, y))
    seen = []

    def with_extras(m, b):  # plain leaves reach the loss as they are, tensors sliced to one example
        seen.append((b["scale"], b["name"], b["xy"][0].shape[0]))
        return sc.loss_fn(m, (b["xy"][0] * b["scale"], b["xy"][1]))

    got = fl.per_example_grads(with_extras)(state, {"xy": (x, y), "scale": 1.0, "name": "digits"})
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    assert seen[-1] == (1.0, "digits", 1)
    custom = fl.per_example_grads(lambda m, b: sc.loss_fn(m, (b.x, b.y)))(state, _Pair(x, y))
    assert_trees_close(custom, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"disagree on the number of examples \[4, 5\]"):
        fl.per_example_grads(sc.loss_fn)(state, (x, y[:4]))


def test_the_readme_snippet_runs():
    import pathlib
    import re
    import textwrap

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (snippet,) = [textwrap.dedent(b) for b in blocks if "per_example_grads" in b]
    namespace: dict = {}
    exec(compile(snippet, "README per-example", "exec"), namespace)
    grads, private = namespace["grads"], namespace["private"]
    assert grads["0.weight"].shape == (32, 16, 8) and grads["2.bias"].shape == (32, 3)
    assert int(flo.dp_state(private.opt_state).count) == 1
    assert 0 < namespace["eps"] < float("inf")
