"""``train_step``, ``eval_step`` and ``predict_step``: purity and determinism (property tests on a
model with Dropout and BatchNorm), metrics, equality with a hand-written torch loop, and the
errors raised on bad input."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop.errors import ConfigError, FnloopError, StepError, TreeMismatchError
from fnloop.testing import assert_pure, assert_trees_equal
from fnloop.testing import strategies as fst


import kernel_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

PROPERTY = settings(max_examples=100, deadline=None)
TXS = [flo.sgd(lr=0.1, momentum=0.9), flo.adam(lr=1e-2), flo.adamw(lr=1e-2, weight_decay=0.1)]
PROBE = 48  # dropout probe length: a mask is read back as a 48-bit integer code


def _loss_with_mask(model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`scenarios.loss_fn` plus ``mask``: the model's Dropout applied to ones, as an exact
    integer code (float64), so two different dropout masks give different metrics."""
    loss, aux = sc.loss_fn(model, batch)
    probe = model.drop(torch.ones(PROBE, dtype=torch.float64)) * (1 - model.drop.p)
    code = (probe * 2.0 ** torch.arange(PROBE, dtype=torch.float64)).sum()
    return loss, {**aux, "mask": code}


STEP = fl.train_step(_loss_with_mask)
EVAL = fl.eval_step(sc.eval_fn)
PREDICT = fl.predict_step(sc.predict_fn)

states = fst.train_states(sc.DropoutBNMLP, st.sampled_from(TXS), steps=st.integers(0, 10_000))
bn_batches = fst.batches(sc.N_FEATURES, sc.N_CLASSES, min_size=2, max_size=8)  # BatchNorm needs 2+ rows in training


# --- purity and determinism (properties) -----------------------------------------------------


@PROPERTY
@given(states, bn_batches)
def test_train_step_is_pure(state, batch):
    new_state, metrics = assert_pure(STEP, state, batch)
    # a step object built afresh gives bitwise the same result: no hidden state in the step
    assert_trees_equal(fl.train_step(_loss_with_mask)(state, batch), (new_state, metrics))


@PROPERTY
@given(states, bn_batches, st.integers(1, 1000), st.integers(1, 2**40))
def test_step_and_rng_change_the_dropout_mask(state, batch, d_step, d_rng):
    mask = STEP(state, batch)[1]["mask"]
    other_step = STEP(state.replace(step=state.step + d_step), batch)[1]["mask"]
    other_rng = STEP(state.replace(rng=state.rng + d_rng), batch)[1]["mask"]
    assert mask != other_step
    assert mask != other_rng
    assert STEP(state, batch)[1]["mask"] == mask


@PROPERTY
@given(states, bn_batches, st.integers(0, 2**32 - 1))
def test_global_rng_is_left_as_it_was(state, batch, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        expected = torch.rand(4)
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        STEP(state, batch)
        assert torch.equal(torch.get_rng_state(), before)
        assert torch.equal(torch.rand(4), expected)


@PROPERTY
@given(states, bn_batches)
def test_batchnorm_stats_come_back_as_new_buffers(state, batch):
    before = {k: v.clone() for k, v in state.buffers.items()}
    versions = {k: v._version for k, v in state.buffers.items()}
    new_state, _ = STEP(state, batch)
    assert_trees_equal(state.buffers, before)
    assert {k: v._version for k, v in state.buffers.items()} == versions
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert new_state.buffers[k] is not state.buffers[k]
        assert not torch.equal(new_state.buffers[k], state.buffers[k]), k
    assert int(new_state.buffers["bn.num_batches_tracked"]) == int(state.buffers["bn.num_batches_tracked"]) + 1
    # the stats are BatchNorm's own: the module in train mode on the same batch computes them
    reference = sc.module_like(sc.DropoutBNMLP, state).train()
    with torch.random.fork_rng(devices=[]):
        reference(batch[0])
    assert_trees_equal(new_state.buffers, dict(reference.named_buffers()))


@PROPERTY
@given(states, bn_batches, st.integers(1, 2**40))
def test_eval_and_predict_run_in_eval_mode_without_grad(state, batch, d_rng):
    state, _ = STEP(state, batch)  # non-trivial BatchNorm stats
    buffers = {k: v.clone() for k, v in state.buffers.items()}
    reference = sc.module_like(sc.DropoutBNMLP, state).eval()
    with torch.no_grad():
        expected_logits = reference(batch[0])
        expected_metrics = sc.eval_fn(reference, batch)
    logits = assert_pure(PREDICT, state, batch)
    metrics = assert_pure(EVAL, state, batch)
    assert_trees_equal(logits, expected_logits)
    assert_trees_equal(metrics, expected_metrics)
    assert not logits.requires_grad and all(not v.requires_grad for v in metrics.values())
    assert_trees_equal(state.buffers, buffers)  # BatchNorm stats unchanged by eval and predict
    # dropout is off: another key gives the same outputs
    other = state.replace(rng=state.rng + d_rng, step=state.step + 1)
    assert_trees_equal(PREDICT(other, batch), logits)
    assert_trees_equal(EVAL(other, batch), metrics)


@pytest.mark.parametrize("make", [fl.eval_step, fl.predict_step], ids=["eval_step", "predict_step"])
def test_eval_like_steps_see_eval_mode_and_no_grad(make):
    seen = []

    def fn(model: Any, batch: Any) -> Any:
        seen.append((model.training, model.drop.training, model.bn.training, torch.is_grad_enabled()))
        return sc.eval_fn(model, batch)

    state = fl.TrainState.create(sc.make_dropout_bn_mlp(), flo.sgd(lr=0.1))
    STEP(state, sc.make_batch())  # leaves the template in train mode
    make(fn)(state, sc.make_batch())
    assert seen == [(False, False, False, False)]
    STEP(state, sc.make_batch())
    assert state.module.training  # the next train step runs in train mode again


# --- metrics and counters ----------------------------------------------------------------------


def test_metrics_are_detached_tensors():
    state = fl.TrainState.create(sc.make_dropout_bn_mlp(), flo.adam(lr=1e-3))
    _, metrics = fl.train_step(sc.loss_fn)(state, sc.make_batch())
    assert sorted(metrics) == ["acc", "loss"]
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor), name
        assert value.ndim == 0 and not value.requires_grad and value.grad_fn is None, name
    assert 0.0 <= float(metrics["acc"]) <= 1.0


def test_plain_loss_gives_loss_metric_only():
    state = fl.TrainState.create(sc.make_mlp(), flo.sgd(lr=0.1))
    _, metrics = fl.train_step(sc.plain_loss)(state, sc.make_batch())
    assert list(metrics) == ["loss"]


@pytest.mark.parametrize("start", [0, 1, 41, 2**40])
def test_step_counter_increments_by_one(start):
    state = fl.TrainState.create(sc.make_mlp(), flo.sgd(lr=0.1)).replace(step=torch.tensor(start, dtype=torch.int64))
    new_state, _ = fl.train_step(sc.plain_loss)(state, sc.make_batch())
    assert new_state.step.dtype == torch.int64 and new_state.step.ndim == 0
    assert int(new_state.step) == start + 1 and int(state.step) == start
    assert new_state.rng is state.rng and new_state.loop is state.loop


# --- against a hand-written torch loop ------------------------------------------------------------


SGD_CONFIGS = {
    "plain": {"lr": 0.1},
    "momentum": {"lr": 0.1, "momentum": 0.9},
    "nesterov-wd": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
}


@pytest.mark.parametrize("config", sorted(SGD_CONFIGS))
@pytest.mark.parametrize("model", ["mlp", "dropout_bn"])
def test_matches_hand_written_torch_loop(model, config):
    kwargs = SGD_CONFIGS[config]
    module = sc.make_mlp() if model == "mlp" else sc.make_dropout_bn_mlp()
    batches = sc.make_batches(4)
    seed = 11
    state = fl.TrainState.create(module, flo.sgd(**kwargs), seed=seed)
    step = fl.train_step(sc.loss_fn)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])

    ref = copy.deepcopy(module).train()
    opt = torch.optim.SGD(ref.parameters(), **kwargs)
    ref_losses = []
    for k, batch in enumerate(batches):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fl.rng.fold(seed, k))  # the documented key of step k: fold(rng, step)
            opt.zero_grad(set_to_none=True)
            loss, _ = sc.loss_fn(ref, batch)
            loss.backward()
            opt.step()
        ref_losses.append(loss.detach())
    assert_trees_equal(losses, ref_losses)
    assert_trees_equal(state.params, {n: p.detach() for n, p in ref.named_parameters()})
    assert_trees_equal(state.buffers, dict(ref.named_buffers()))
    if "momentum" in kwargs:
        buffers = {n: opt.state[p]["momentum_buffer"] for n, p in ref.named_parameters()}
        assert_trees_equal(state.opt_state[-2].trace, buffers)  # sgd: chain(..., trace, scale_by_learning_rate)


# --- bad input --------------------------------------------------------------------------------


def _state(tx: Any = None) -> fl.TrainState:
    return fl.TrainState.create(sc.make_mlp(), tx if tx is not None else flo.sgd(lr=0.1, momentum=0.9))


def _on_meta(batch: Any) -> Any:
    return fl.tree_map(lambda x: x.to("meta"), batch)


class Bad(NamedTuple):
    call: Callable[[], Any]
    error: type[Exception]
    words: tuple[str, ...]  # every one must appear in the message


BAD_INPUTS = {
    "loss-not-scalar": Bad(
        lambda: fl.train_step(lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))(
            _state(), sc.make_batch(8)
        ),
        StepError,
        ("scalar", "(8,)"),
    ),
    "loss-not-a-tensor": Bad(
        lambda: fl.train_step(lambda m, b: 1.0)(_state(), sc.make_batch()), StepError, ("scalar", "float")
    ),
    "loss-tuple-without-dict": Bad(
        lambda: fl.train_step(lambda m, b: (sc.plain_loss(m, b), 1, 2))(_state(), sc.make_batch()),
        StepError,
        ("loss_fn",),
    ),
    "train-batch-on-another-device": Bad(
        lambda: fl.train_step(sc.plain_loss)(_state(), _on_meta(sc.make_batch())), StepError, ("meta", "cpu")
    ),
    "eval-batch-on-another-device": Bad(
        lambda: fl.eval_step(sc.eval_fn)(_state(), _on_meta(sc.make_batch())), StepError, ("meta", "cpu")
    ),
    "predict-batch-on-another-device": Bad(
        lambda: fl.predict_step(sc.predict_fn)(_state(), _on_meta(sc.make_batch())), StepError, ("meta", "cpu")
    ),
    "params-key-missing": Bad(
        lambda: fl.train_step(sc.plain_loss)(
            _state().replace(params={k: v for k, v in _state().params.items() if k != "2.bias"}), sc.make_batch()
        ),
        TreeMismatchError,
        ("params", "2.bias"),
    ),
    "params-key-renamed": Bad(
        lambda: fl.train_step(sc.plain_loss)(
            _state().replace(params={k.replace("0.", "first."): v for k, v in _state().params.items()}), sc.make_batch()
        ),
        TreeMismatchError,
        ("params", "0.weight", "first.weight"),
    ),
    "opt-state-of-another-optimizer": Bad(
        lambda: fl.train_step(sc.plain_loss)(
            _state().replace(opt_state=flo.adam(lr=1e-3).init(_state().params)), sc.make_batch()
        ),
        TreeMismatchError,
        ("opt_state", "trace/0.weight", "mu/0.weight"),
    ),
    "schedule-negative-count": Bad(
        lambda: flo.warmup_cosine(1e-3, warmup_steps=10, decay_steps=100)(-1), ConfigError, ("count", "-1")
    ),
    "train-not-a-train-state": Bad(
        lambda: fl.train_step(sc.plain_loss)(_state().params, sc.make_batch()), StepError, ("TrainState", "dict")
    ),
    "eval-not-a-train-state": Bad(lambda: fl.eval_step(sc.eval_fn)(None, sc.make_batch()), StepError, ("TrainState",)),
    "predict-not-a-train-state": Bad(
        lambda: fl.predict_step(sc.predict_fn)((1, 2), sc.make_batch()), StepError, ("TrainState", "tuple")
    ),
    "eval-metric-not-scalar": Bad(
        lambda: fl.eval_step(lambda m, b: {"logits": m(b[0])})(_state(), sc.make_batch()),
        StepError,
        ("logits", "scalar"),
    ),
    "loss-fn-not-callable": Bad(lambda: fl.train_step("loss"), StepError, ("callable",)),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_fnloop_error(case):
    bad = BAD_INPUTS[case]
    with pytest.raises(bad.error) as info:
        bad.call()
    assert isinstance(info.value, FnloopError)
    text = str(info.value)
    for word in bad.words:
        assert word in text, f"{word!r} not in message: {text}"


def test_opt_state_of_another_optimizer_after_a_good_call():
    """A step object that already ran on a good state still checks the next state's opt_state."""
    step = fl.train_step(sc.plain_loss)
    good = _state()
    step(good, sc.make_batch())
    bad = good.replace(opt_state=flo.adam(lr=1e-3).init(good.params))
    with pytest.raises(TreeMismatchError, match="opt_state"):
        step(bad, sc.make_batch())


def test_params_of_another_model_after_a_good_call():
    step = fl.train_step(sc.plain_loss)
    good = _state()
    step(good, sc.make_batch())
    with pytest.raises(TreeMismatchError, match="2.bias"):
        step(good.replace(params={k: v for k, v in good.params.items() if k != "2.bias"}), sc.make_batch())


@pytest.mark.parametrize("after_a_good_call", [False, True])
def test_params_of_the_right_names_but_wrong_shapes_are_named(after_a_good_call):
    """Params swapped in with the module's names but other shapes fail before the forward pass,
    naming each key and both shapes, also on a step object that already ran, and also when the
    optimizer state is the one that step returned."""
    step = fl.train_step(sc.plain_loss)
    good = _state()
    if after_a_good_call:
        good, _ = step(good, sc.make_batch())
    params = dict(good.params)
    params["2.bias"] = torch.zeros(params["2.bias"].numel() + 1)
    with pytest.raises(TreeMismatchError, match=r"2\.bias: \(\d+,\), the module's is \(\d+,\)"):
        step(good.replace(params=params), sc.make_batch())


def test_a_step_keeps_no_reference_to_the_weights_of_states_given_earlier():
    import gc
    import weakref

    step = fl.train_step(sc.plain_loss)
    first = _state()
    weight = weakref.ref(first.params["0.weight"])
    state, _ = step(first, sc.make_batch())
    state, _ = step(state, sc.make_batch())
    del first
    gc.collect()
    assert weight() is None


@pytest.mark.parametrize("kind", ["train", "eval", "predict"])
def test_global_rng_restored_when_fn_raises(kind):
    class Boom(Exception):
        pass

    def fn(model: Any, batch: Any) -> Any:
        model(batch[0])
        torch.rand(100)
        raise Boom

    make = {"train": fl.train_step, "eval": fl.eval_step, "predict": fl.predict_step}[kind]
    state = fl.TrainState.create(sc.make_dropout_bn_mlp(), flo.sgd(lr=0.1))
    before = torch.get_rng_state()
    with pytest.raises(Boom):
        make(fn)(state, sc.make_batch())
    assert torch.equal(torch.get_rng_state(), before)
    assert all(t.device.type == "meta" for t in state.module.parameters())  # the template was unbound too


def test_seed_cache_gives_state_seed_and_rereads_tensors_changed_in_place():
    """The cached seed equals ``state_seed`` along a run, for a step tensor the cache did not
    produce, and after a step or key tensor is changed in place (version counter)."""
    seeds = fl.execution.SeedCache()
    key, step = torch.tensor(7), torch.tensor(0)
    for _ in range(5):
        assert seeds(key, step) == fl.execution.state_seed(key, step)
        new = step + 1
        seeds.advance(step, new)
        step = new
    other = torch.tensor(40)
    assert seeds(key, other) == fl.execution.state_seed(key, other)
    seeds.advance(torch.tensor(40), torch.tensor(99))  # not the step last seen: nothing remembered
    assert seeds(key, torch.tensor(99)) == fl.execution.state_seed(key, torch.tensor(99))
    step.fill_(3)
    key.fill_(8)
    assert seeds(key, step) == fl.execution.state_seed(torch.tensor(8), torch.tensor(3))
