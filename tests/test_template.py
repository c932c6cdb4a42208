"""The template module a state holds (``state.module``) is never mutated: no step changes its
mode (``training``) or writes weights into it; its parameters and buffers stay on the meta
device, also while ``loss_fn`` runs (the weights are passed functionally). So two states that
share one template can be stepped from two threads at once and each gets exactly what it gets
alone."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.testing import assert_trees_equal

import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

BATCH = sc.make_batch(8, seed=3)
TRAIN = fl.train_step(sc.loss_fn)
EVAL = fl.eval_step(sc.eval_fn)
PREDICT = fl.predict_step(sc.predict_fn)
STEPS: dict[str, Callable[[Any, Any], Any]] = {"train": TRAIN, "eval": EVAL, "predict": PREDICT}


def _state(mode: str) -> fl.TrainState:
    module = sc.make_dropout_bn_mlp()
    module.train(mode == "train")
    return fl.TrainState.create(module, flo.adam(lr=1e-2), seed=5)


def _template_report(module: torch.nn.Module) -> tuple[bool, list[str]]:
    """``(module.training, names of parameters and buffers NOT on the meta device)``; the mode of
    every submodule must agree with the root's."""
    modes = {m.training for m in module.modules()}
    assert len(modes) == 1, f"submodules disagree on their mode: {modes}"
    off_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type != "meta"]
    return module.training, off_meta


@pytest.mark.parametrize("mode", ["train", "eval"], ids=["created-in-train-mode", "created-in-eval-mode"])
@pytest.mark.parametrize("kind", sorted(STEPS))
def test_steps_leave_the_template_alone(kind, mode):
    state = _state(mode)
    created = _template_report(state.module)
    assert created == (mode == "train", [])
    for _ in range(2):
        out = STEPS[kind](state, BATCH)
        assert _template_report(state.module) == created
    if kind == "train":
        new_state, _ = out
        assert new_state.module is state.module
        assert _template_report(new_state.module) == created


def _dropout_mlp() -> torch.nn.Module:
    """Linear-ReLU-Dropout-Linear: mode matters (dropout), no BatchNorm (its in-place counter
    update is a separate matter for compiled train steps)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(sc.N_FEATURES, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, sc.N_CLASSES)
        )


@pytest.mark.parametrize("kind", sorted(STEPS))
def test_compiled_steps_leave_the_template_alone(kind):
    # created in the mode the step does NOT run in, so a step that sets its mode on the template shows
    mode = "eval" if kind == "train" else "train"
    module = _dropout_mlp().train(mode == "train")
    state = fl.TrainState.create(module, flo.adam(lr=1e-2), seed=5)
    created = _template_report(state.module)
    fast = fl.compile(STEPS[kind])
    for _ in range(2):
        fast(state, BATCH)
        assert _template_report(state.module) == created


@pytest.mark.parametrize("kind", sorted(STEPS))
def test_template_holds_meta_tensors_while_loss_fn_runs(kind):
    state = _state("train")
    template = state.module
    seen: list[tuple[bool, list[str]]] = []

    def fn(model: Any, batch: Any) -> Any:
        seen.append(_template_report(template))
        return (sc.loss_fn if kind == "train" else sc.eval_fn if kind == "eval" else sc.predict_fn)(model, batch)

    make = {"train": fl.train_step, "eval": fl.eval_step, "predict": fl.predict_step}[kind]
    make(fn)(state, BATCH)
    assert len(seen) == 1
    assert seen[0][1] == [], f"{kind}: the state's weights were written into the template: {seen[0][1]}"


# --- two threads, two states, one template ---------------------------------------------------

N_ROUNDS = 20
REPEATS = 4


def _pair() -> tuple[fl.TrainState, fl.TrainState]:
    s_a = fl.TrainState.create(sc.make_dropout_bn_mlp(seed=1), flo.adam(lr=1e-2), seed=3)
    other = fl.TrainState.create(sc.make_dropout_bn_mlp(seed=2), flo.adam(lr=1e-2))
    s_b = s_a.replace(params=other.params, rng=torch.tensor(7))
    assert s_b.module is s_a.module
    return s_a, s_b


def _run(state: fl.TrainState, batches: list[Any], barrier: threading.Barrier | None = None) -> tuple[Any, list[Any]]:
    """Alternate a train step and an eval step, ``N_ROUNDS`` times; every metric recorded."""
    if barrier is not None:
        barrier.wait()
    metrics = []
    for batch in batches:
        state, train_metrics = TRAIN(state, batch)
        metrics.append((train_metrics, EVAL(state, batch)))
    return state, metrics


def test_two_threads_sharing_a_template_match_sequential_runs():
    batches = {"a": sc.make_batches(N_ROUNDS, seed=1), "b": sc.make_batches(N_ROUNDS, seed=2)}
    s_a, s_b = _pair()
    expected = {"a": _run(s_a, batches["a"]), "b": _run(s_b, batches["b"])}
    assert not torch.equal(expected["a"][0].params["fc1.weight"], expected["b"][0].params["fc1.weight"])
    for repeat in range(REPEATS):
        s_a, s_b = _pair()
        barrier = threading.Barrier(2)
        results: dict[str, Any] = {}

        def work(name: str, state: fl.TrainState) -> None:
            try:
                results[name] = _run(state, batches[name], barrier)
            except BaseException as e:  # reported below, in the main thread
                results[name] = e

        threads = [threading.Thread(target=work, args=(n, s)) for n, s in (("a", s_a), ("b", s_b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name in ("a", "b"):
            got = results[name]
            if isinstance(got, BaseException):
                raise AssertionError(f"repeat {repeat}, thread {name} raised {got!r}") from got
            final, metrics = got
            for field in ("step", "params", "buffers", "opt_state", "rng"):
                where = f"repeat {repeat}, {name}: {field}"
                assert_trees_equal(getattr(final, field), getattr(expected[name][0], field), msg=where)
            assert_trees_equal(metrics, expected[name][1], msg=f"repeat {repeat}, {name}: metrics")
