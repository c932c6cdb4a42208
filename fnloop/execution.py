"""How steps run fast. What a step computes lives in :mod:`fnloop.step` and
:mod:`fnloop.eval_steps`; everything here exists only for speed, and the tests check each piece
against that pure path:

* **Donation**: the driver lets a train step update the state it replaces in place; the object
  it donated is marked and refused by every fnloop entry point afterwards.
* **Fast eager gradients**: ``torch.autograd.grad`` on detached leaves with the weights bound
  into a working copy of the template, instead of ``torch.func.grad`` over ``functional_call``.
  Used when nothing asks for a graph through the step; otherwise the pure path runs.
* **Identity caches**: built cores per (template, optimizer); a state this step produced skips
  its structure check; seeds are remembered instead of read back from the tensors.
* **Compile glue**: :class:`FlatCompiled` runs ``torch.compile(fullgraph=True)`` of a core on a
  flat tuple of tensors and skips dynamo's guards for inputs it has seen.
* **Flat vmap**: :func:`vmap` maps over optree-flattened trees (the batched steps of an ensemble).
* Every private torch API fnloop uses for its steps is read here.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> s = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
    >>> step = fl.train_step(lambda m, b: m(b).square().mean())
    >>> fast, _ = step(s, torch.ones(3, 2))                       # this module's fast path
    >>> pure, _ = fl.step.apply_train_step(step.loss_fn, s, torch.ones(3, 2))
    >>> fl.testing.assert_trees_equal(fast.params, pure.params)
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as torch_pytree

from fnloop import rng as _rng
from fnloop.bind import bind, working_copy
from fnloop.errors import StepError, TreeMismatchError
from fnloop.loss import split_loss
from fnloop.optim.base import fused_apply
from fnloop.optim.dp import PerExampleGradientTransformation
from fnloop.state import OptionsState, TrainState
from fnloop.tree import check_same_structure, tree_flatten, tree_leaves, tree_structure

__all__ = [
    "mark_donated",
    "pin",
    "check_not_donated",
    "check_state",
    "cuda_devices",
    "device_of",
    "is_traced",
    "state_seed",
    "traced",
    "SeedCache",
    "CoreCache",
    "FlatCompiled",
    "TrainExecutor",
    "EvalExecutor",
    "compile",
    "differentiated",
    "vmap",
    "flatten",
]

is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

# --- donation ------------------------------------------------------------------------------

_DONATED = "_fnloop_donated"


def mark_donated(state: Any) -> None:
    """Mark ``state`` (the very object a caller holds) as donated: its tensors now alias a newer state's."""
    object.__setattr__(state, _DONATED, True)


def check_not_donated(state: Any, name: str) -> None:
    """Raise :class:`StepError` if ``state`` was donated.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> s = fl.TrainState.create(torch.nn.Linear(1, 1), flo.sgd(lr=0.1))
        >>> _ = fl.train_step(lambda m, b: m(b).sum()).donated(s, torch.ones(1, 1))
        >>> fl.save(s, "memory://donated-example")
        Traceback (most recent call last):
        ...
        fnloop.errors.StepError: save: this state was donated ...
    """
    if getattr(state, "__dict__", {}).get(_DONATED, False):
        raise StepError(
            f"{name}: this state was donated (its tensors were updated in place and now belong to the state that "
            "replaced it); use the state fit (or step.donated) returned, or Trainer(donate=False) to keep the input state"
        )


def check_state(state: Any, name: str) -> None:
    """``state`` is a live (not donated) :class:`TrainState`."""
    if not isinstance(state, TrainState):
        raise StepError(f"{name}: expected a fnloop.TrainState as first argument, got {type(state).__name__}")
    check_not_donated(state, name)


# --- pinned states: tensors a background writer still reads -----------------------------------

_PINNED: dict[int, int] = {}  # id of a params dict or optimizer state -> pins held


def pin(state: Any) -> Callable[[], None]:
    """Keep in-place updates off ``state``'s tensors until the returned function is called: a
    donated step on a pinned state runs its pure path (new tensors) instead. An async checkpoint
    save pins what it writes, so it needs no copy of the state."""
    keys = [id(getattr(state, "params", state)), id(getattr(state, "opt_state", state))]
    for k in keys:
        _PINNED[k] = _PINNED.get(k, 0) + 1

    def unpin() -> None:
        for k in keys:
            left = _PINNED.pop(k, 1) - 1
            if left:
                _PINNED[k] = left

    return unpin


def _pinned(state: TrainState) -> bool:
    return bool(_PINNED) and (id(state.params) in _PINNED or id(state.opt_state) in _PINNED)


# --- small per-call helpers ----------------------------------------------------------------


def _device(params: Mapping[str, torch.Tensor]) -> torch.device | None:
    for p in params.values():
        return p.device
    return None


device_of = _device


def cuda_devices(params: Mapping[str, torch.Tensor]) -> list[int]:
    """The CUDA generators a step on ``params``' device seeds."""
    device = _device(params)
    return [device.index or 0] if device is not None and device.type == "cuda" else []


def _batch_leaves(batch: Any) -> Any:
    # the common (inputs, targets) tuple without a tree walk (a plain loop: this runs every step)
    if type(batch) not in (tuple, list):
        return tree_leaves(batch)
    for b in batch:
        if type(b) is not torch.Tensor:
            return tree_leaves(batch)
    return batch


def _check_batch_device(leaves: Any, device: torch.device | None, name: str) -> None:
    if device is None:
        return
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.device != device:
            raise StepError(
                f"{name}: a batch tensor is on {leaf.device} but the params are on {device}; "
                f"move the batch with fnloop.to_device(batch, {str(device)!r}) (the Trainer does this)"
            )


def is_traced(params: Mapping[str, torch.Tensor]) -> bool:
    """Under ``torch.func`` transforms or while dynamo traces: only the pure path applies."""
    first = next(iter(params.values()), None)
    return torch.compiler.is_compiling() or (first is not None and is_wrapped(first))


def state_seed(rng: torch.Tensor, step: torch.Tensor) -> int | None:
    """The seed of a step, ``fold(rng, step)``; None under ``torch.func`` transforms (``vmap``'s
    ``randomness`` argument then decides) and while compiling (seeded outside the compiled region).

    Example:
        >>> import torch, fnloop as fl
        >>> fl.execution.state_seed(torch.tensor(3), torch.tensor(1)) == fl.rng.fold(3, 1)
        True
    """
    if traced(rng, step):
        return None
    return _rng.fold(int(rng), int(step))


def traced(*tensors: torch.Tensor) -> bool:
    """Compiling, or one of ``tensors`` is wrapped by a ``torch.func`` transform."""
    return torch.compiler.is_compiling() or any(is_wrapped(t) for t in tensors)


def differentiated(*trees: Any) -> bool:
    """The caller may differentiate through a computation on ``trees``: dynamo traces it, a
    ``torch.func`` transform wraps one of their tensors, or grad mode is on and one requires
    grad. The fast eager paths apply only where this is False.

    Example:
        >>> import torch
        >>> differentiated({"w": torch.ones(2)}), differentiated({"w": torch.ones(2, requires_grad=True)})
        (False, True)
    """
    if torch.compiler.is_compiling():
        return True
    grad = torch.is_grad_enabled()
    for t in trees:
        for x in tree_leaves(t):
            if isinstance(x, torch.Tensor) and ((grad and x.requires_grad) or is_wrapped(x)):
                return True
    return False


def _wants_graph(trees: tuple[Any, ...], batch_leaves: Any) -> bool:
    """Grad mode is on and some input requires grad: the caller differentiates through the step."""
    if not torch.is_grad_enabled():
        return False
    for x in batch_leaves:  # plain loops: this runs every step
        if isinstance(x, torch.Tensor) and x.requires_grad:
            return True
    for t in trees:
        for x in tree_leaves(t):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                return True
    return False


# --- seeds -----------------------------------------------------------------------------------


class SeedCache:
    """:func:`fnloop.rng.state_seed` that remembers the Python ints of the key and step tensors it last saw.

    Each ``int(tensor)`` is a host read, slow right after the numeric work of a step. Between
    the steps of a loop the key is the same tensor object and the step is the tensor the
    previous call produced (:meth:`advance`), so neither needs reading; a tensor is recognised by
    identity and version counter, so one changed in place is read again.
    """

    __slots__ = ("_key", "_step")

    def __init__(self) -> None:
        self._key: tuple[Any, int, int] = (None, -1, 0)
        self._step: tuple[Any, int, int] = (None, -1, 0)

    @staticmethod
    def _int(x: torch.Tensor, known: tuple[Any, int, int]) -> tuple[Any, int, int]:
        if known[0] is x and known[1] == x._version:
            return known
        return (x, x._version, int(x))

    def __call__(self, rng: torch.Tensor, step: torch.Tensor) -> int | None:
        if traced(rng, step):
            return None
        # one read and one write of each slot: threads sharing a step never mix their tensors
        key = self._key = self._int(rng, self._key)
        known = self._step = self._int(step, self._step)
        return _rng.fold(key[2], known[2])

    def advance(self, step: torch.Tensor, new_step: torch.Tensor) -> None:
        """``new_step`` holds ``step + 1``; remembered when ``step`` is the step last seen."""
        known = self._step
        if known[0] is step and known[1] == step._version:
            self._step = (new_step, new_step._version, known[2] + 1)


# --- cores and compilation -----------------------------------------------------------------


class CoreCache:
    """Cores per (template, optimizer), built lazily; held by identity."""

    def __init__(self) -> None:
        self.cores: dict[tuple[int, int], tuple[Any, Callable[..., Any]]] = {}

    def get(self, key_objs: tuple[Any, Any], build: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
        key = (id(key_objs[0]), id(key_objs[1]))
        hit = self.cores.get(key)
        if hit is not None and hit[0][0] is key_objs[0] and hit[0][1] is key_objs[1]:
            return hit[1]
        core = build()
        self.cores[key] = (key_objs, core)
        return core


# --- vmap without Python pytree walks ------------------------------------------------------

try:  # what torch.func.vmap runs once its trees are flat (private; torch.func.vmap where absent)
    from torch._functorch import vmap as _vmap_impl

    _VMAP = (_vmap_impl.vmap_increment_nesting, _vmap_impl._add_batch_dim, _vmap_impl._remove_batch_dim)
    _vmap_impl.lazy_load_decompositions()
except (ImportError, AttributeError):  # pragma: no cover - other torch versions
    _VMAP = None


def vmap(fn: Callable[..., Any], args: tuple[Any, ...], in_dims: tuple[int | None, ...], randomness: str) -> Any:
    """``torch.func.vmap(fn, in_dims, out_dims=0, randomness=randomness)(*args)``, where ``in_dims``
    gives one dimension (or None) per argument for all of its tensor leaves, and every tensor
    leaf of the result gets the mapped dimension first (other leaves come back as they are).

    The trees are walked by optree instead of torch's Python pytree, whose walks (flatten,
    broadcast of the dims, unflatten, in and out) cost ~0.3 ms per call on an optimizer state
    of 25 tensors: more than the update of a small ensemble itself.

    Example:
        >>> import torch
        >>> vmap(lambda d, x: {"y": d["w"] * x}, ({"w": torch.ones(3)}, torch.arange(3.0)), (0, 0), "error")
        {'y': tensor([0., 1., 2.])}
    """
    flats, specs = zip(*(flatten(a) for a in args)) if args else ((), ())
    flat = [x for f in flats for x in f]
    dims = [d if isinstance(x, torch.Tensor) else None for f, d in zip(flats, in_dims) for x in f]
    for x, d in zip(flat, dims):
        if d is not None and not -x.dim() <= d < x.dim():
            raise ValueError(f"vmap: cannot map over dimension {d} of a tensor of shape {tuple(x.shape)}")
    dims = [d % x.dim() if d is not None and d < 0 else d for x, d in zip(flat, dims)]
    sizes = {x.shape[d] for x, d in zip(flat, dims) if d is not None}
    if len(sizes) != 1:
        raise ValueError(f"vmap: the mapped dimensions of the inputs have sizes {sorted(sizes)}; expected one size, shared by all")
    n = sizes.pop()
    out: list[Any] = []

    def flat_fn(*xs: Any) -> list[torch.Tensor]:
        it = iter(xs)
        result = fn(*(unflatten([next(it) for _ in range(len(f))]) for unflatten, f in zip(specs, flats)))
        leaves, spec = tree_flatten(result)
        out[:] = [spec, leaves]
        return [x for x in leaves if isinstance(x, torch.Tensor)]

    if _VMAP is None or torch.compiler.is_compiling():
        tensors = torch.func.vmap(flat_fn, in_dims=tuple(dims), randomness=randomness)(*flat)
    else:
        nesting, add_dim, remove_dim = _VMAP
        with nesting(n, randomness) as level:
            tensors = flat_fn(*(x if d is None else add_dim(x, d, level) for x, d in zip(flat, dims)))
            tensors = [remove_dim(t, level, n, 0) for t in tensors]
    spec, leaves = out
    it = iter(tensors)
    return spec.unflatten([next(it) if isinstance(x, torch.Tensor) else x for x in leaves])


def flatten(tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """The leaves of ``tree`` and how to rebuild it: by optree, or by torch's pytree where a leaf
    optree sees is a node there (a batch type registered with ``torch.utils._pytree`` only)."""
    leaves, spec = tree_flatten(tree)
    if all(isinstance(x, torch.Tensor) or torch_pytree.tree_is_leaf(x) for x in leaves):
        return leaves, spec.unflatten
    leaves, torch_spec = torch_pytree.tree_flatten(tree)
    return leaves, lambda xs: torch_pytree.tree_unflatten(xs, torch_spec)


_COMPILED = itertools.count()


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own. Dynamo keeps its compiled graphs per code object and
    gives up after ``recompile_limit`` (8) of them: without this, every compiled step of a process
    (each closure of one ``def``) would count against one shared limit."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_COMPILED)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class FlatCompiled:
    """``torch.compile(fullgraph=True)`` of a core, called with a flat tuple of tensors.

    Per call it computes a cheap signature (treespec; dtype and device of the state; shape,
    stride, dtype and device of every batch leaf; grad and deterministic modes; the state's
    shapes are fixed by its module). The first call with a signature runs dynamo's guards
    (compiling if needed); later calls skip them
    (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``), which is safe because what
    those guards check for our inputs is in the signature: guard evaluation costs more than the
    kernels of a small step.

    A compiled graph draws random numbers or not, the same way on every call. The second call
    with a signature checks whether it touched the global generators; when it did not, later
    calls skip seeding and restoring them (the RNG contract holds trivially).
    """

    def __init__(self, core: Callable[..., Any], compile_kwargs: dict[str, Any]):
        self.core = core
        # static shapes: a new batch shape (a last partial batch) compiles once more instead of
        # tracing symbolic sizes, which dropout under torch.func.grad does not support
        self.compile_kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        self.by_spec: dict[Any, Any] = {}
        self.calls: dict[Any, int] = {}  # signature -> calls so far
        self.rng_free: set[Any] = set()

    def _entry(self, spec: Any) -> tuple[Callable[..., Any], list[int], int]:
        """``(compiled fn, permutation from optree to torch leaf order, batch leaf count)``."""
        entry = self.by_spec.get(spec)
        if entry is None:
            # dynamo traces torch's pytree, so the compiled function rebuilds the inputs with it;
            # outside, optree flattens (C++) and its treespec hashes fast
            index_tree = spec.unflatten(range(spec.num_leaves))
            order, torch_spec = torch_pytree.tree_flatten(index_tree)
            core = self.core

            def flat(*xs: Any) -> Any:
                return core(*torch_pytree.tree_unflatten(list(xs), torch_spec))

            n_batch = spec.children()[-1].num_leaves if spec.num_children else 0
            entry = self.by_spec[spec] = (torch.compile(_own_code(flat), **self.compile_kwargs), list(order), n_batch)
        return entry  # type: ignore[no-any-return]

    def run(self, seed: Callable[[], tuple[int | None, list[int]]], *args: Any) -> Any:
        """Call the compiled core on ``args`` (the state's parts, then the batch) under the RNG
        seeding ``seed()`` gives (``(seed, cuda devices)``), unless the graph draws no randomness."""
        leaves, spec = tree_flatten(args)
        fn, order, n_batch = self._entry(spec)
        ordered = [None if i is None else leaves[i] for i in order]  # torch's pytree keeps None as a leaf
        first = leaves[0] if leaves else None
        signature = (
            spec,
            torch.is_grad_enabled(),
            torch.are_deterministic_algorithms_enabled(),
            (first.dtype, first.device) if isinstance(first, torch.Tensor) else None,
            *(
                (x.shape, x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else (type(x), x)
                for x in leaves[len(leaves) - n_batch :]
            ),
        )
        calls = self.calls.get(signature, 0)
        if signature in self.rng_free:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return fn(*ordered)
        self.calls[signature] = calls + 1
        seed_value, devices = seed()
        with _rng.seeded(seed_value, devices):
            if calls == 0:  # dynamo checks its guards (and compiles)
                return fn(*ordered)
            before = _rng.generator_states(devices)
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                out = fn(*ordered)
            if calls == 1 and all(torch.equal(a, b) for a, b in zip(before, _rng.generator_states(devices))):
                self.rng_free.add(signature)
            return out


def compile(step: Any, **torch_compile_kwargs: Any) -> Any:  # noqa: A001
    """The same step with its computation under ``torch.compile(fullgraph=True)``.

    The RNG seeding and the state bookkeeping stay outside the compiled region, and every value
    that changes between steps (learning rate, counters) is a tensor input, so the step compiles
    once. A compiled step computes the pure path (``torch.func.grad``); it never donates and
    cannot be differentiated through with autograd (call the uncompiled step for that).

    Example:
        >>> import torch, fnloop as fl
        >>> fast = fl.compile(fl.train_step(lambda model, batch: model(batch).square().mean()))
    """
    compiled = getattr(step, "compiled", None)
    if compiled is None:
        raise StepError(f"compile: expected a step from fnloop.train_step/eval_step/predict_step, got {type(step).__name__}")
    return compiled(**torch_compile_kwargs)


def _seeded_call(
    seeds: SeedCache, state: TrainState, devices: list[int], fn: Callable[..., Any], *args: Any, fold: Any = None
) -> Any:
    seed = seeds(state.rng, state.step)
    restore = _rng.seed_(seed if fold is None else fold(seed), devices)
    try:
        return fn(*args)
    finally:
        restore()


# --- train steps -----------------------------------------------------------------------------


def _check_shapes(shapes: Mapping[str, torch.Size], params: Mapping[str, torch.Tensor]) -> None:
    wrong = [f"{k}: {tuple(params[k].shape)}, the module's is {tuple(s)}" for k, s in shapes.items() if params[k].shape != s]
    if wrong:
        raise TreeMismatchError("state.params vs the module's parameters: shapes differ.\n  " + "\n  ".join(wrong))


class TrainExecutor:
    """Runs a train step: the fast eager path, the compiled path, or the pure path (what
    ``build_core(loss_fn, template, tx, options)`` computes) when the caller differentiates
    through the step or a ``torch.func`` transform traces it."""

    def __init__(self, loss_fn: Callable[..., Any], options: Any, compile_kwargs: dict[str, Any] | None, build_core: Callable[..., Any]):
        self.loss_fn = loss_fn
        self.options = options
        self.compile_kwargs = compile_kwargs
        self.build_core = build_core
        self._fast = CoreCache()
        self._pure = CoreCache()
        self._checked: tuple[Any, Any] | None = None
        self._produced: tuple[Any, Any] = (None, None)  # the (params, optimizer state) this step returned last
        self._seeds = SeedCache()

    def _validate(self, state: TrainState) -> None:
        """Params must match the module's (names and shapes) and the optimizer state must have
        ``tx.init``'s structure over the trainable params: checked fully once per module and
        optimizer, then by treespec equality and shapes (~3 us), and not at all for what this
        step returned last."""
        if self._checked is not None and self._checked[0] is state.module and self._checked[1] is state.tx:
            if state.params is self._produced[0] and state.opt_state is self._produced[1]:
                return  # this step built both: they are right
            if state.params.keys() == self._shapes.keys() and tree_structure(state.opt_state) == self._opt_spec:
                _check_shapes(self._shapes, state.params)
                return
        expected = dict(state.module.named_parameters())
        check_same_structure(expected, state.params, what="state.params vs the module's parameters")
        shapes = {k: v.shape for k, v in expected.items()}
        _check_shapes(shapes, state.params)
        meta = {k: torch.empty_like(v, device="meta") for k, v in state.params.items() if expected[k].requires_grad}
        reference = state.tx.init(meta)  # structure only: no memory
        check_same_structure(reference, state.opt_state, what="state.opt_state vs tx.init(the trainable params)")
        self._checked = (state.module, state.tx)
        self._shapes = shapes
        self._opt_spec = tree_structure(reference)

    def _fast_core(self, template: torch.nn.Module, tx: Any) -> Callable[..., Any]:
        """The step with eager autograd on detached leaves, optionally in place (donated)."""
        loss_fn, options = self.loss_fn, self.options
        names = [n for n, p in template.named_parameters() if p.requires_grad]
        frozen = len(names) != sum(1 for _ in template.parameters())
        apply = fused_apply(options.wrap(tx))
        wrapped_tx = options.key is not None
        spec = options.spec_of({n: p for n, p in template.named_parameters() if p.requires_grad})
        shapes = {n: p.shape for n, p in template.named_parameters()}

        # precision, sharding and gradient reduction, decided once: a plain fp32 single-process
        # step (the common case) calls none of their hooks, each of which is the identity there
        plain = options.precision == "32-true" and options.grad_reduce is None and not options.sharded
        reducer = options.grad_reduce

        def core(params: Any, buffers: Any, opt_state: Any, carried: Any, batch: Any, donate: bool) -> Any:
            # BatchNorm & co update buffers in place: always on copies (small), so an exception in
            # loss_fn leaves even a donated state intact; only the optimizer apply works in place
            buffers = {k: v.clone() for k, v in buffers.items()} if buffers else buffers
            trainable = {n: params[n] for n in names} if frozen else params
            wrapped = options.join(carried, opt_state, trainable, spec) if wrapped_tx else opt_state
            if plain:
                scale, full, overlap = None, params, None
            else:
                batch = options.batch(batch)
                scale = options.scale(wrapped)
                full = options.gather(params, shapes)  # a sharded state's params, all-gathered
            with torch.enable_grad():
                leaves = {k: full[k].detach().requires_grad_(True) for k in trainable}
                # a distributed step all-reduces each bucket as soon as backward has produced it
                overlap = reducer.overlapped(leaves) if reducer is not None else None
                with bind(working_copy(template, True), {**full, **leaves} if frozen else leaves, buffers) as model:
                    if plain:
                        loss, aux = split_loss(loss_fn(model, batch), "train_step")
                    else:
                        with options.forward(_device(params)):
                            loss, aux = split_loss(loss_fn(model, batch), "train_step")
                grads_list = torch.autograd.grad(loss if scale is None else loss * scale, list(leaves.values()), allow_unused=True)
            grads = {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, grads_list)}
            del grads_list  # the grads dict holds the only references: the optimizer frees each gradient early
            if not plain:
                grads = overlap.finish(grads) if overlap is not None else options.reduce(grads)
            # the grads dict is the step's own: the optimizer may free each gradient after its last read
            with torch.no_grad():  # as torch.optim steps: nothing here is differentiated
                new, wrapped = apply(grads, wrapped, trainable, donate=donate, consume=True)
            carried, opt_state = options.split(wrapped, trainable, spec) if wrapped_tx else (carried, wrapped)
            metrics = {"loss": loss.detach(), **{k: v.detach() for k, v in aux.items()}}
            return {**params, **new} if frozen else new, buffers, opt_state, carried, metrics

        return core

    def __call__(self, state: TrainState, batch: Any, donate: bool) -> tuple[TrainState, dict[str, torch.Tensor]]:
        check_state(state, "train_step")
        self._validate(state)
        leaves = _batch_leaves(batch)
        _check_batch_device(leaves, _device(state.params), "train_step")
        template, tx, options = state.module, state.tx, self.options
        carried = options.carried(state.loop.options) if options.key else ()
        args = (options.local(state.params), state.buffers, options.local(state.opt_state), carried, batch)
        produced = state.params is self._produced[0] and state.opt_state is self._produced[1]
        graph = _wants_graph((), leaves) if produced else _wants_graph((state.params, state.buffers, state.opt_state, state.rng), leaves)
        devices = cuda_devices(state.params)
        if donate and _pinned(state):  # a background save still reads these tensors
            donate = False
        if graph and (donate or self.compile_kwargs is not None):
            what = "a donated in-place update" if donate else "a compiled step"
            raise StepError(
                f"train_step: inputs require grad, but {what} cannot be differentiated through; call the pure "
                "uncompiled step, `step(state, batch)` with `step = fl.train_step(loss_fn)`, to differentiate through it"
            )
        if self.compile_kwargs is not None:
            core = self._pure.get((template, tx), lambda: FlatCompiled(self.build_core(self.loss_fn, template, tx, options), self.compile_kwargs))  # type: ignore[arg-type]
            out = core.run(lambda: (options.seed(self._seeds(state.rng, state.step)), devices), *args)  # type: ignore[attr-defined]
        elif graph or is_traced(state.params) or isinstance(tx, PerExampleGradientTransformation):
            core = self._pure.get((template, tx), lambda: self.build_core(self.loss_fn, template, tx, options))
            out = _seeded_call(self._seeds, state, devices, core, *args, fold=options.seed)
        else:
            core = self._fast.get((template, tx), lambda: self._fast_core(template, tx))
            out = _seeded_call(self._seeds, state, devices, core, *args, donate, fold=options.seed if options.grad_reduce is not None else None)
            if donate:
                mark_donated(state)
        params, buffers, opt_state, carried, metrics = out
        params, opt_state = options.resharded(params, state.params), options.resharded(opt_state, state.opt_state)
        if not graph:
            self._produced = (params, opt_state)
        new_step = state.step + 1
        self._seeds.advance(state.step, new_step)
        loop = state.loop.replace(options=OptionsState(options.key, carried)) if options.key else state.loop
        return state.replace(step=new_step, params=params, buffers=buffers, opt_state=opt_state, loop=loop), metrics


# --- eval and predict steps --------------------------------------------------------------------


class EvalExecutor:
    """Runs an eval or predict step: bound into the eval-mode working copy under ``no_grad``
    (fast), compiled, or the pure path when the caller differentiates through it."""

    def __init__(self, kind: str, fn: Callable[..., Any], finish: Callable[[Any], Any], compile_kwargs: dict[str, Any] | None, build_core: Callable[..., Any]):
        self.kind = kind
        self.fn = fn
        self.finish = finish
        self.compile_kwargs = compile_kwargs
        self.build_core = build_core
        self._cores = CoreCache()
        self._seeds = SeedCache()  # an evaluation sees the same state (key and step) every batch

    def _fast_core(self, template: torch.nn.Module) -> Callable[..., Any]:
        fn, finish = self.fn, self.finish

        def core(params: Any, buffers: Any, batch: Any) -> Any:
            with torch.no_grad(), bind(working_copy(template, False), params, buffers) as model:
                return finish(fn(model, batch))

        return core

    def _compiled_core(self, template: torch.nn.Module) -> FlatCompiled:
        core = self.build_core(self.fn, template, self.finish)

        def no_grad_core(params: Any, buffers: Any, batch: Any) -> Any:
            with torch.no_grad():
                return core(params, buffers, batch)

        return FlatCompiled(no_grad_core, self.compile_kwargs)  # type: ignore[arg-type]

    def __call__(self, state: TrainState, batch: Any) -> Any:
        from fnloop.connectors.fsdp import full_tree

        check_state(state, self.kind)
        params = full_tree(state.params)  # a sharded state's params, all-gathered
        leaves = _batch_leaves(batch)
        _check_batch_device(leaves, _device(params), self.kind)
        template, devices = state.module, cuda_devices(params)
        graph = _wants_graph((params, state.buffers), leaves)
        if self.compile_kwargs is not None and not graph:
            core = self._cores.get((template, "compiled"), lambda: self._compiled_core(template))
            return core.run(lambda: (self._seeds(state.rng, state.step), devices), params, state.buffers, batch)  # type: ignore[attr-defined]
        if graph or is_traced(params):
            core = self._cores.get((template, "pure"), lambda: self.build_core(self.fn, template, self.finish))
        else:
            core = self._cores.get((template, "fast"), lambda: self._fast_core(template))
        return _seeded_call(self._seeds, state, devices, core, params, state.buffers, batch)
