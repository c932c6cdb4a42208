"""Precision as a policy of the step: names and aliases, ``16-mixed``'s loss scale against
``torch.amp.GradScaler`` (forced overflows), ``*-true`` casts, ``bf16-mixed`` accuracy on the
digits task, and the compiled step under each mixed policy."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.connectors.precision import LossScaleState, loss_scale, resolve_precision, scale_of
from fnloop.optim.base import fused_apply

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    "value, name",
    [(32, "32-true"), ("32", "32-true"), ("32-true", "32-true"), (64, "64-true"), ("64", "64-true"), (16, "16-mixed"),
     ("16", "16-mixed"), ("16-mixed", "16-mixed"), ("bf16", "bf16-mixed"), ("bf16-mixed", "bf16-mixed"),
     ("bf16-true", "bf16-true"), ("16-true", "16-true")],
)
def test_precision_names_and_aliases(value, name):
    assert resolve_precision(value) == name
    assert fl.Trainer(precision=value).precision == value


@pytest.mark.parametrize("value", ["8-mixed", "fp16", True, 1.5, None, "bf16-mixed "])
def test_unknown_precision_names_the_flag(value):
    with pytest.raises(fl.ConfigError, match=r"Trainer\(precision=.*accepted values"):
        fl.Trainer(precision=value)


def _overflow_loss(model, batch):
    x, y, factor = batch  # factor = inf forces an overflow of the scaled gradients
    return torch.nn.functional.mse_loss(model(x), y) * factor


def _batches(n: int, overflow_at: set[int]) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g), torch.tensor(float("inf") if i in overflow_at else 1.0))
        for i in range(n)
    ]


def _gradscaler_run(batches, **scaler_kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
    scales = []
    for b in batches:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = _overflow_loss(model, b)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, dict(model.named_parameters())


def test_16_mixed_follows_gradscaler_over_forced_overflows():
    batches = _batches(12, overflow_at={0, 1, 4, 9})
    expected_scales, expected_params = _gradscaler_run(batches)
    torch.manual_seed(0)
    state = fl.TrainState.create(torch.nn.Linear(4, 2), flo.sgd(lr=0.1, momentum=0.9))
    step = fl.train_step(_overflow_loss, precision="16-mixed")
    scales = []
    for b in batches:
        state, _ = step(state, b)
        wrapped = step.options.join(step.options.carried(state.loop.options), state.opt_state, state.params)
        scales.append(float(scale_of(wrapped)))
    assert scales == expected_scales == [2.0**15, 2.0**14, 2.0**14, 2.0**14, 2.0**13, *[2.0**13] * 4, 2.0**12, 2.0**12, 2.0**12]
    for k, v in expected_params.items():
        torch.testing.assert_close(state.params[k], v.detach(), rtol=0, atol=1e-6)


def test_loss_scale_grows_like_gradscaler():
    """With a short growth interval the scale also grows: the same trajectory as GradScaler."""
    batches = _batches(11, overflow_at={5})
    expected, _ = _gradscaler_run(batches, growth_interval=3, init_scale=4.0)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    tx = loss_scale(flo.sgd(lr=0.1, momentum=0.9), init_scale=4.0, growth_interval=3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    opt_state = tx.init(params)
    scales = []
    for b in batches:
        def scaled(p):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = _overflow_loss(lambda x: torch.func.functional_call(model, p, (x,)), b)
            return loss * opt_state.scale

        grads = torch.func.grad(scaled)(params)
        params, opt_state = fused_apply(tx)(grads, opt_state, params)
        assert isinstance(opt_state, LossScaleState)
        scales.append(float(opt_state.scale))
    assert scales == expected
    assert max(scales) > 4.0


@pytest.mark.parametrize("precision, dtype", [("64-true", torch.float64), ("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32)])
def test_true_precisions_cast_params_and_optimizer_state(precision, dtype):
    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(3)]
    loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    state = fl.TrainState.create(torch.nn.Linear(3, 1), flo.adam(lr=1e-2))
    out = fl.Trainer(max_epochs=1, precision=precision, enable_progress_bar=False).fit(state, fl.train_step(loss), data)
    assert {p.dtype for p in out.params.values()} == {dtype}
    assert {x.dtype for x in fl.tree_leaves(out.opt_state) if x.is_floating_point() and x.dim() > 0} == {dtype}
    assert fl.tree_structure(out) == fl.tree_structure(state)
    metrics = fl.Trainer(precision=precision, enable_progress_bar=False).validate(out, fl.eval_step(loss), data)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


@pytest.mark.parametrize("precision, accumulate", [("bf16-mixed", 1), ("16-mixed", 1), ("16-mixed", 2)])
def test_mixed_precision_compiles(precision, accumulate):
    """The compiled step (the loss scale and the accumulation window carried through it) equals the eager one."""
    batches = _batches(5, overflow_at={1} if precision == "16-mixed" else set())  # bf16 has no loss scale to skip with
    state = fl.TrainState.create(torch.nn.Linear(4, 2), flo.sgd(lr=0.1))
    step = fl.train_step(_overflow_loss, precision=precision, accumulate_grad_batches=accumulate, gradient_clip_val=1.0)
    eager, compiled = state, state
    fast = fl.compile(step, backend="aot_eager")
    for b in batches:
        eager, m1 = step(eager, b)
        compiled, m2 = fast(compiled, b)
    for k in eager.params:
        torch.testing.assert_close(compiled.params[k], eager.params[k], rtol=1e-5, atol=1e-6)
    assert fl.tree_structure(compiled) == fl.tree_structure(eager)
    assert compiled.loop.options == eager.loop.options


def test_bf16_mixed_digits_accuracy_is_within_a_point_of_fp32():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import digits_task
    finally:
        sys.path.remove(str(EXAMPLES))
    data = digits_task.DigitsData(batch_size=32)
    accuracy = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        state = fl.TrainState.create(digits_task.MLP(), flo.adamw(lr=3e-3, weight_decay=1e-4), seed=0)
        trainer = fl.Trainer(max_epochs=6, precision=precision, enable_progress_bar=False, num_sanity_val_steps=0)
        state = trainer.fit(state, fl.train_step(digits_task.loss_fn), datamodule=data)
        accuracy[precision] = trainer.test(state, fl.eval_step(digits_task.loss_fn), datamodule=data)["test/acc"]
    assert accuracy["32-true"] > 0.9
    assert abs(accuracy["bf16-mixed"] - accuracy["32-true"]) <= 0.01, accuracy
