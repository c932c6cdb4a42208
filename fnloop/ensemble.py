"""``fl.vmap(step)``: N training runs (a stacked state, :func:`fnloop.stack`) as one batched step.

What member i computes is what state i computes alone: the step's meaning
(:func:`fnloop.step.train_core`, :func:`fnloop.eval_steps.eval_core`) under ``torch.func.vmap``
over the members, then the same bookkeeping (``step + 1``, the options' carried tensors).

Design, measured before chosen (32 MLPs 64-32-32-10 at batch 64, AdamW, one CPU thread): a
Python loop of whole steps cannot beat sequential loops, one vectorized step does (about 3x in
eager). Randomness is the part that cannot simply be vectorized: ``vmap``'s own random modes draw
one tensor for all members from one generator, so member i would not draw what state i draws
alone. Here every random function is caught (:mod:`fnloop.member_random`) and its values are
drawn per member, each from that member's stream (the generator seeded with
``fold(rng_i, step_i)``, as its own step seeds it); only those draws loop over members, the
arithmetic stays batched. Hence, in eager mode, member i's random values are bitwise those of
its own run, and its results equal its own run up to the rounding of the vectorized kernels
(batched matmuls), about 1e-6.

An eager fp32 train step runs faster than that core under vmap, with the same values up to
rounding (tested against it): the members' losses under vmap, one ordinary backward of their
sum (member i's gradient lands in row i of the stacked params), then the optimizer under vmap,
with the per-member random mode entered only once the optimizer has drawn; the trees go through
:func:`fnloop.execution.vmap` (optree walks instead of torch's Python pytree). Callers that
differentiate through the step (an input requiring grad, a ``torch.func`` transform) get the core.

Under :func:`fnloop.compile` the vmapped step runs under ``torch.compile(fullgraph=True)``. Its
first call with a batch signature runs eagerly and records the random draws the step makes; later
calls make those draws per member outside the compiled region (same streams, same values) and
feed them to it, so a compiled member still matches its own eager run to ~1e-6, dropout included.

In ``Trainer.fit`` a member can stop before the others (per-member early stopping): its tensors
then stay exactly as they were (:func:`fnloop.members.keep_stopped`).

The batch is shared by all members (``batch_dim=None``) or split per member (``batch_dim=0``:
each leaf's leading dimension is the member). Python leaves of ``state.loop`` are shared
(see :mod:`fnloop.stacking`).

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    >>> states = [fl.TrainState.create(model, flo.adam(lr=1e-2), seed=i) for i in range(4)]
    >>> step = fl.train_step(lambda m, b: (m(b[0]) - b[1]).square().mean())
    >>> batch = (torch.randn(16, 3), torch.randn(16, 1))
    >>> stacked, metrics = fl.vmap(step)(fl.stack(states), batch)
    >>> metrics["loss"].shape
    torch.Size([4])
    >>> alone, _ = step(states[2], batch)
    >>> fl.testing.assert_trees_close(fl.unstack(stacked)[2].params, alone.params, rtol=1e-6, atol=1e-6)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as torch_pytree

from fnloop import execution
from fnloop import rng as _rng
from fnloop.bind import bind, working_copy
from fnloop.errors import StepError, TreeMismatchError
from fnloop.eval_steps import EvalLike, eval_core
from fnloop.example_grads import rowwise_value_and_grad
from fnloop.loss import split_loss
from fnloop.optim import _foreach as fe
from fnloop.optim.base import fused_apply
from fnloop.optim.dp import PerExampleGradientTransformation
from fnloop.member_random import MemberRandom, Streams
from fnloop.members import keep_stopped
from fnloop.stacking import num_members, stack, unstack
from fnloop.state import OptionsState, TrainState
from fnloop.step import TrainStep, train_core
from fnloop.tree import tree_leaves, tree_structure

__all__ = ["VmappedStep", "vmap"]

_RANDOM_ERROR = "called random operation while in randomness error mode"


def _dims(tree: Any) -> Any:
    """vmap's in_dims of one argument: 0 for tensors, None for anything else (None, ints); the
    single prefix 0 when every leaf is a tensor (vmap broadcasts it without a walk per leaf)."""
    if all(isinstance(x, torch.Tensor) for x in tree_leaves(tree, none_is_leaf=True)):
        return 0
    return torch_pytree.tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, tree)


def _check_stacked(state: Any, name: str) -> int:
    """N, after checking ``state`` is a live stacked state whose members fit its template."""
    execution.check_state(state, name)
    if state.step.ndim != 1:
        raise TreeMismatchError(f"{name}: state.step has shape {tuple(state.step.shape)}; pass a stacked state (fl.stack(states))")
    n = num_members(state)
    expected = dict(state.module.named_parameters())
    if state.params.keys() != expected.keys():
        raise TreeMismatchError(f"{name}: state.params keys {sorted(state.params)} differ from the module's {sorted(expected)}")
    wrong = [k for k, p in expected.items() if state.params[k].shape[1:] != p.shape]
    if wrong:
        raise TreeMismatchError(
            f"{name}: params {wrong} do not have the module's shapes after the member dimension (e.g. {wrong[0]}: "
            f"{tuple(state.params[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)})"
        )
    return n


class VmappedStep:
    """A train, eval or predict step over a stacked state (see :func:`vmap`)."""

    def __init__(self, step: Any, *, batch_dim: int | None = None, compile_kwargs: dict[str, Any] | None = None):
        if not isinstance(step, (TrainStep, EvalLike)):
            raise StepError(f"fl.vmap: expected a step from fl.train_step/eval_step/predict_step, got {type(step).__name__}")
        if batch_dim is not None and (isinstance(batch_dim, bool) or not isinstance(batch_dim, int)):
            raise StepError(f"fl.vmap: batch_dim must be None (one batch for all members) or an int, got {batch_dim!r}")
        self.step = step
        self.kind = step.kind
        self.batch_dim = batch_dim
        self.compile_kwargs = compile_kwargs if compile_kwargs is not None else step.compile_kwargs
        self._cores = execution.CoreCache()
        self._fast_cores = execution.CoreCache()
        self._compiled_cores = execution.CoreCache()
        self._schedules: dict[Any, list[Any]] = {}  # compiled: batch signature -> recorded draws

    def __repr__(self) -> str:
        return f"fl.vmap({self.step!r})"

    @property
    def options(self) -> Any:
        """The train step's options (``Trainer`` flags: accumulation, clipping, ...); None for an eval step."""
        return getattr(self.step, "options", None)

    def with_options(self, options: Any) -> VmappedStep:
        """The same batched step over a train step with other options (what ``Trainer.fit`` sets)."""
        if options == self.options:
            return self
        step = self.step.with_options(options)
        return VmappedStep(step, batch_dim=self.batch_dim, compile_kwargs=self.compile_kwargs)

    def flush(self, state: TrainState) -> TrainState:
        """Apply each training member's open accumulation window now (what the train step's
        ``flush`` does to a state alone, at the end of an epoch); the state unchanged when none is open."""
        if not isinstance(self.step, TrainStep):
            return state
        members = unstack(state)
        flushed = [self.step.flush(m) for m in members]
        if all(f is m for f, m in zip(flushed, members)):
            return state
        return keep_stopped(state, stack(flushed))

    def compiled(self, **torch_compile_kwargs: Any) -> VmappedStep:
        """The same batched step under ``torch.compile(fullgraph=True)`` (see :func:`fnloop.compile`)."""
        return VmappedStep(self.step, batch_dim=self.batch_dim, compile_kwargs=torch_compile_kwargs)

    # --- the batched computation ---------------------------------------------------------

    def _core(self, template: torch.nn.Module, tx: Any) -> Callable[..., Any]:
        if isinstance(self.step, TrainStep):
            return train_core(self.step.loss_fn, template, tx, self.step.options)
        return eval_core(self.step.fn, template, self.step._finish)

    def _batched(self, core: Callable[..., Any], streams: Streams | None, box: list[Any]) -> Callable[..., Any]:
        """``(noises, *state parts, batch) -> core`` vmapped over members; draws per member from
        ``streams`` (eager) or replays ``noises`` (compiled); the draws made land in ``box``."""

        def one_member(noises: list[torch.Tensor], *args: Any) -> Any:
            level = None if streams is None else torch._C._functorch.current_level()
            mode = MemberRandom(level, streams, noises if streams is None else None)
            with mode:
                out = core(*args)
            if streams is not None:
                box.append(mode.record)
            return out

        def batched(noises: list[torch.Tensor], *args: Any) -> Any:
            if streams is not None:  # eager: trees walked by optree; every tensor leaf batched, members first
                return execution.vmap(one_member, (noises, *args), (0,) * len(args) + (self.batch_dim,), "error")
            in_dims = (0, *(_dims(a) for a in args[:-1]), self.batch_dim)
            # a train core returns the state's parts (None leaves stay None) and the metrics
            out_dims = (*in_dims[1:4], 0, 0) if len(args) == 5 else 0  # carried: fresh tensors on a first call
            return torch.func.vmap(one_member, in_dims=in_dims, out_dims=out_dims, randomness="error")(noises, *args)

        return batched

    def _fast_train(self, template: torch.nn.Module, tx: Any) -> Callable[..., Any] | None:
        """The eager train step of a plain fp32 single-process step, faster than ``train_core``
        under vmap: the members' losses under vmap, ONE ordinary backward of their sum (member
        i's gradient lands in row i of the stacked params), then the optimizer under vmap. No
        grad transform per call; the same values up to kernel rounding. None where the step
        needs the core's hooks (precision, sharding, per-example optimizers)."""
        step, options = self.step, self.step.options
        if options.precision != "32-true" or options.grad_reduce is not None or isinstance(tx, PerExampleGradientTransformation):
            return None
        names = [n for n, p in template.named_parameters() if p.requires_grad]
        frozen = len(names) != sum(1 for _ in template.parameters())
        apply = fused_apply(options.wrap(tx))
        spec = options.spec_of({n: p for n, p in template.named_parameters() if p.requires_grad})

        def forward(trainable: Any, params: Any, buffers: Any, batch: Any) -> Any:
            with bind(working_copy(template, True), {**params, **trainable} if frozen else trainable, buffers) as model:
                return split_loss(step.loss_fn(model, batch), "train_step")

        def update(grads: Any, opt_state: Any, carried: Any, trainable: Any) -> Any:
            wrapped = options.join(carried, opt_state, trainable, spec) if options.key else opt_state
            new, wrapped = apply(grads, wrapped, trainable)
            return options.split(wrapped, trainable, spec) if options.key else (carried, wrapped), new

        draws = [False]  # the optimizer draws random values (a noise transform): found on its first draw

        def run(streams: Streams, params: Any, buffers: Any, opt_state: Any, carried: Any, batch: Any) -> Any:
            buffers = {k: v.clone() for k, v in buffers.items()}  # BatchNorm & co update buffers in place
            trainable = {n: params[n] for n in names}
            frozen_params = {n: p for n, p in params.items() if n not in trainable} if frozen else {}
            grads, (loss, aux) = rowwise_value_and_grad(
                self._members(forward, streams), trainable, frozen_params, buffers, batch,
                in_dims=(0, 0, self.batch_dim), randomness="error",
            )

            def updated(random: bool) -> Any:
                fn = self._members(update, streams) if random else update
                return execution.vmap(fn, (grads, opt_state, carried, trainable), (0, 0, 0, 0), "error")

            with torch.no_grad():  # as torch.optim steps
                try:
                    (carried, opt_state), new = updated(draws[0])
                except RuntimeError as e:  # a pure update drew nothing before the error: run it again, drawing
                    if draws[0] or _RANDOM_ERROR not in str(e):
                        raise
                    draws[0] = True
                    (carried, opt_state), new = updated(True)
            metrics = {"loss": loss.detach(), **{k: v.detach() for k, v in aux.items()}}
            return {**params, **new} if frozen else new, buffers, opt_state, carried, metrics

        return run

    @staticmethod
    def _members(fn: Callable[..., Any], streams: Streams) -> Callable[..., Any]:
        """``fn`` for one member inside vmap, its random draws made per member from ``streams``."""

        def one_member(*args: Any) -> Any:
            with MemberRandom(torch._C._functorch.current_level(), streams):
                return fn(*args)

        return one_member

    def _run(self, state: TrainState, args: tuple[Any, ...]) -> Any:
        template, tx = state.module, state.tx
        devices = execution.cuda_devices(state.params)
        if self.compile_kwargs is None:
            if isinstance(self.step, TrainStep) and not execution.differentiated(args):
                fast = self._fast_cores.get((template, tx), lambda: self._fast_train(template, tx))
                if fast is not None:
                    return self._random_errors(lambda: fast(_streams(state), *args), devices)
            return self._eager(state, args, devices)[0]
        leaves = tree_leaves(args[-1])
        signature = (
            id(template),
            id(tx),
            tree_structure(args[-1]),
            torch.is_grad_enabled(),
            *((x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else (type(x), x) for x in leaves),
        )
        schedule = self._schedules.get(signature)
        if schedule is None:  # first call: eager, recording the draws to replay from now on
            out, self._schedules[signature] = self._eager(state, args, devices)
            return out
        compiled = self._compiled_cores.get((template, tx), lambda: self._compiled(template, tx))
        restore = _rng.seed_(None, devices)
        try:
            streams = _streams(state)
            noises = [streams.draw_all(d) for d in schedule]
        finally:
            restore()
        fe.per_leaf = True  # the optimizer's leaves are batched in the traced graph: no foreach kernels
        try:
            return compiled.run(lambda: (None, devices), noises, *args)  # type: ignore[attr-defined]
        finally:
            fe.per_leaf = False

    def _compiled(self, template: torch.nn.Module, tx: Any) -> execution.FlatCompiled:
        return execution.FlatCompiled(self._batched(self._core(template, tx), None, []), self.compile_kwargs or {})

    def _eager(self, state: TrainState, args: tuple[Any, ...], devices: list[int]) -> tuple[Any, list[Any]]:
        core = self._cores.get((state.module, state.tx), lambda: self._core(state.module, state.tx))
        box: list[Any] = []
        out = self._random_errors(lambda: self._batched(core, _streams(state), box)([], *args), devices)
        return out, box[-1] if box else []

    @staticmethod
    def _random_errors(run: Callable[[], Any], devices: list[int]) -> Any:
        """``run()`` with the generators held (put back as they were), vmap's error on a random
        function it cannot split turned into one that says what members can draw."""
        restore = _rng.seed_(None, devices)
        try:
            return run()
        except RuntimeError as e:
            if _RANDOM_ERROR not in str(e):
                raise
            raise StepError(
                f"fl.vmap: the step called a random function whose values depend on tensor inputs ({e}); members draw "
                "their own values for dropout, torch.rand/randn/randint/randperm/normal(numbers), *_like and in-place fills"
            ) from None
        finally:
            restore()

    # --- the step --------------------------------------------------------------------------

    def __call__(self, state: TrainState, batch: Any) -> Any:
        _check_stacked(state, f"fl.vmap({self.kind})")
        if isinstance(self.step, EvalLike):
            return self._run(state, (state.params, state.buffers, batch))
        options = self.step.options
        carried = options.carried(state.loop.options) if options.key else ()
        out = self._run(state, (state.params, state.buffers, state.opt_state, carried, batch))
        params, buffers, opt_state, carried, metrics = out
        loop = state.loop.replace(options=OptionsState(options.key, tuple(carried))) if options.key else state.loop
        new = state.replace(step=state.step + 1, params=params, buffers=buffers, opt_state=opt_state, loop=loop)
        return keep_stopped(state, new), metrics  # members stopped by the driver stay as they are


def _streams(state: TrainState) -> Streams:
    """Each member's stream, seeded as its own step seeds the generators: ``fold(rng_i, step_i)``."""
    return Streams([_rng.fold(k, s) for k, s in zip(state.rng.tolist(), state.step.tolist())])


def vmap(step: Any, *, batch_dim: int | None = None) -> VmappedStep:
    """A train, eval or predict step over a stacked state: N members in one batched step.

    Member i computes what ``step`` computes on state i alone, and draws its randomness (dropout,
    noise) from its own key and step: bitwise the same random values, results equal up to the
    rounding of vectorized kernels. Wrap with :func:`fnloop.compile` (either order) to compile it.

    Args:
        step: a step from :func:`fnloop.train_step`, :func:`fnloop.eval_step` or
            :func:`fnloop.predict_step` (compiled or not).
        batch_dim: None to give every member the same batch; an int to split each batch leaf
            along that dimension, one slice per member.

    Returns:
        ``(stacked, batch) -> (stacked, metrics)`` for a train step (metrics of shape ``[N]``),
        ``-> metrics`` for an eval step and ``-> outputs`` (leading ``N``) for a predict step.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> states = fl.stack([fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1), seed=i) for i in range(3)])
        >>> evaluate = fl.vmap(fl.eval_step(lambda m, b: m(b).square().mean()), batch_dim=0)
        >>> evaluate(states, torch.ones(3, 5, 2))["loss"].shape
        torch.Size([3])
    """
    if isinstance(step, VmappedStep):
        raise StepError("fl.vmap: this step is already vmapped over members")
    plain = step
    if getattr(step, "compile_kwargs", None) is not None:  # fl.vmap(fl.compile(step)): compile the batched step
        plain = TrainStep(step.loss_fn, step.options) if isinstance(step, TrainStep) else type(step)(step.fn)
        return VmappedStep(plain, batch_dim=batch_dim, compile_kwargs=step.compile_kwargs)
    return VmappedStep(plain, batch_dim=batch_dim)
