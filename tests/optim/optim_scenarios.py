"""Shared scenarios of the optimizer tests: a small MLP, fixed batches, a torch.optim reference
loop, an fnloop loop through ``train_step``, and tree comparisons.

Test files import it as ``import optim_scenarios as sc`` (``tests/conftest.py`` puts this
folder on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

import fnloop as fl
import fnloop.optim as flo

SIZES = (8, 32, 32, 4)
RTOL = 1e-5
ATOL = 1e-6


def make_mlp(seed: int = 0, act: type[torch.nn.Module] = torch.nn.Tanh) -> torch.nn.Module:
    """An ``8-32-32-4`` MLP with seeded initial weights."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(SIZES) - 2:
                layers.append(act())
        return torch.nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(gen_state)


Batch = tuple[torch.Tensor, torch.Tensor]


def make_batches(n: int = 4, size: int = 16, seed: int = 1, scale: float = 1.0) -> list[Batch]:
    """``n`` fixed ``(x, y)`` regression batches; ``scale`` multiplies the targets (larger grads)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, SIZES[0], generator=g), scale * torch.randn(size, SIZES[-1], generator=g)) for _ in range(n)
    ]


def mse(model: Any, batch: Batch) -> torch.Tensor:
    """The loss of every scenario (a mean, so micro-batches of a batch average to its gradient)."""
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def torch_run(
    module: torch.nn.Module,
    make_opt: Callable[[Any], torch.optim.Optimizer],
    batches: list[Any],
    steps: int,
    *,
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    max_norm: float | None = None,
    param_groups: Callable[[torch.nn.Module], Any] | None = None,
) -> dict[str, Any]:
    """The torch.optim reference loop: ``zero_grad(set_to_none=True)``, ``backward``,
    (``clip_grad_norm_``), ``step``, (``scheduler.step()``) on a deep copy of ``module``.

    Returns ``params`` (name -> tensor), ``state`` (name -> torch's per-param state), ``lrs``
    (``param_groups[0]["lr"]`` after each step) and ``norms`` (the clipped total norms).
    """
    model = copy.deepcopy(module)
    opt = make_opt(param_groups(model) if param_groups is not None else model.parameters())
    scheduler = make_scheduler(opt) if make_scheduler is not None else None
    lrs, norms = [], []
    for k in range(steps):
        opt.zero_grad(set_to_none=True)
        mse(model, batches[k % len(batches)]).backward()
        if max_norm is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True))
        opt.step()
        if scheduler is not None:
            scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    by_param = {id(p): n for n, p in model.named_parameters()}
    state = {by_param[id(p)]: s for p, s in opt.state.items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "state": state, "lrs": lrs, "norms": norms}


def fnloop_run(
    module: torch.nn.Module, tx: flo.GradientTransformation, batches: list[Batch], steps: int
) -> dict[str, Any]:
    """The same loop through ``fl.train_step``; ``lrs`` holds ``flo.learning_rate`` after each step."""
    state = fl.TrainState.create(module, tx, seed=0)
    step = fl.train_step(mse)
    lrs = []
    for k in range(steps):
        state, _ = step(state, batches[k % len(batches)])
        lrs.append(float(flo.learning_rate(state.opt_state)))
    return {"params": state.params, "opt_state": state.opt_state, "lrs": lrs, "state": state}


def grad_fn(module: torch.nn.Module) -> Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]]:
    """``(params, batch) -> grads`` of :func:`mse` for the module run with ``params``."""
    model = copy.deepcopy(module)

    def fn(params: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        x, y = batch
        loss = torch.nn.functional.mse_loss(torch.func.functional_call(model, leaves, (x,)), y)
        names = list(leaves)
        return dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))

    return fn


def first_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> str:
    """A readable description of the largest difference between two dicts of tensors."""
    worst = max(got, key=lambda k: float((got[k].double() - want[k].double()).abs().max()) if got[k].numel() else 0.0)
    diff = (got[worst].double() - want[worst].double()).abs().max()
    return f"largest difference at {worst!r}: {float(diff):.3e}"


def assert_dicts_close(
    got: dict[str, torch.Tensor],
    want: dict[str, torch.Tensor],
    rtol: float = RTOL,
    atol: float = ATOL,
    equal_nan: bool = False,
) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(
            got[k], want[k], rtol=rtol, atol=atol, equal_nan=equal_nan, msg=lambda m, k=k: f"{k}: {m}"
        )


def assert_dicts_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    unequal = [k for k in want if not torch.equal(got[k], want[k])]
    assert not unequal, f"not bitwise equal: {unequal}; {first_diff(got, want)}"


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in fl.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def snapshot(*trees: Any) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """``(tensor, copy of its values, its _version)`` for every tensor leaf of ``trees``."""
    return [(t, t.detach().clone(), t._version) for tree in trees for t in tensor_leaves(tree)]


def assert_unchanged(snap: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
    for i, (t, values, version) in enumerate(snap):
        assert t._version == version, f"leaf {i} was modified in place (_version {version} -> {t._version})"
        torch.testing.assert_close(t, values, rtol=0, atol=0, equal_nan=True, msg=f"leaf {i} changed value")


def lr_tensors(opt_state: Any) -> list[torch.Tensor]:
    """Every ``lr`` field of the NamedTuples inside an optimizer state."""
    found: list[torch.Tensor] = []

    def walk(node: Any) -> None:
        if isinstance(node, tuple) and hasattr(node, "_fields") and "lr" in node._fields:
            found.append(node.lr)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, (list, tuple)) else ()
        for child in children:
            walk(child)

    walk(opt_state)
    return found


@contextlib.contextmanager
def no_host_reads(allowed: Sequence[torch.Tensor] = ()) -> Iterator[list[str]]:
    """Make ``item``/``tolist``/``bool``/``float``/``int`` raise on any tensor except integer 0-d
    CPU tensors (host-side counters) and the tensors in ``allowed`` (the host-side learning rate).

    Yields the list of reads that were allowed (for the test to inspect).
    """
    allowed_ids = {id(t) for t in allowed}
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    originals = {n: getattr(torch.Tensor, n) for n in names}
    own = {n for n in names if n in torch.Tensor.__dict__}
    reads: list[str] = []

    def guard(name: str) -> Callable[..., Any]:
        original = originals[name]

        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            integer = not (self.is_floating_point() or self.is_complex() or self.dtype == torch.bool)
            host_counter = integer and self.ndim == 0 and self.device.type == "cpu"
            if not host_counter and id(self) not in allowed_ids:
                raise AssertionError(f"host read: Tensor.{name} on a {self.dtype} tensor of shape {tuple(self.shape)}")
            reads.append(f"{name}:{self.dtype}")
            return original(self, *args, **kwargs)

        return method

    for n in names:
        setattr(torch.Tensor, n, guard(n))
    try:
        yield reads
    finally:
        for n, original in originals.items():
            if n in own:
                setattr(torch.Tensor, n, original)
            else:
                delattr(torch.Tensor, n)
