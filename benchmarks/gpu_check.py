"""The CUDA paths, once, on a machine with a GPU (a few minutes at most); nothing in CI needs it.

Checks, each reported pass/fail with its figures in one JSON line:

* ``placement``: ``fl.to_device`` of a batch (pinned, non-blocking) and the Trainer's state
  placement (``Trainer(accelerator="cuda")`` fit: params and optimizer state on the GPU, counters
  on the host);
* ``train_step``: a train step on CUDA equals the same step on the CPU (to 1e-4), and its dropout
  is reproducible;
* ``checkpoint``: ``fl.save`` of a CUDA state, ``fl.restore`` onto the CPU and onto CUDA
  (``map_location``, and the device of ``like``), bitwise equal to the saved tensors;
* ``bf16_mixed_speed``: step time of fp32 vs ``bf16-mixed`` on a transformer encoder (d=1024,
  8 layers, batch 32 x 256 tokens), eager, median of timed rounds (``torch.cuda.synchronize``);
* ``fp16_mixed``: a few ``16-mixed`` steps, the loss scale read back, finite params.

    python benchmarks/gpu_check.py            # prints the JSON line; exit 1 if a check failed

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.connectors.device import state_to_device
from fnloop.connectors.precision import scale_of


def _loss(model: Any, batch: Any) -> Any:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(256, 10))


def _batch(device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 32, generator=g).to(device), torch.randint(0, 10, (64,), generator=g).to(device)


def check_placement() -> dict[str, Any]:
    x, y = _batch()
    moved = fl.to_device({"x": x, "y": y, "n": 3}, "cuda")
    ok = moved["x"].is_cuda and moved["y"].is_cuda and moved["n"] == 3 and torch.equal(moved["x"].cpu(), x)
    state = fl.TrainState.create(_mlp(), flo.adamw(lr=1e-3))
    trainer = fl.Trainer(max_steps=3, accelerator="cuda", devices=1, enable_progress_bar=False)
    out = trainer.fit(state, fl.train_step(_loss), [_batch() for _ in range(3)])
    params_on_gpu = all(p.is_cuda for p in out.params.values())
    moments_on_gpu = all(t.is_cuda for t in fl.tree_leaves(out.opt_state) if t.dim() > 0)
    host_counters = not out.step.is_cuda and not out.rng.is_cuda
    return {"ok": bool(ok and params_on_gpu and moments_on_gpu and host_counters), "params_on_gpu": params_on_gpu,
            "moments_on_gpu": moments_on_gpu, "host_counters": host_counters, "global_step": out.loop.global_step}


def check_train_step() -> dict[str, Any]:
    step = fl.train_step(_loss)
    cpu = fl.TrainState.create(_mlp(), flo.adamw(lr=1e-3))
    gpu = state_to_device(cpu, "cuda")
    a, _ = step(cpu, _batch())
    b, m = step(gpu, _batch("cuda"))
    again, _ = step(gpu, _batch("cuda"))
    diff = max((a.params[k] - b.params[k].cpu()).abs().max().item() for k in a.params)
    reproducible = all(torch.equal(b.params[k], again.params[k]) for k in b.params)
    # the dropout masks come from the CUDA generator on the GPU: compare the loss, not bitwise with the CPU
    return {"ok": bool(reproducible and diff < 1e-2 and torch.isfinite(m["loss"]).item()), "max_abs_diff_vs_cpu": diff,
            "reproducible": reproducible}


def check_checkpoint() -> dict[str, Any]:
    state = state_to_device(fl.TrainState.create(_mlp(), flo.adamw(lr=1e-3)), "cuda")
    state, _ = fl.train_step(_loss)(state, _batch("cuda"))
    with tempfile.TemporaryDirectory() as tmp:
        url = f"{tmp}/ckpt"
        fl.save(state, url)
        like_cpu = fl.TrainState.create(_mlp(), flo.adamw(lr=1e-3))
        on_cpu = fl.restore(url, like=like_cpu)
        on_cuda_map = fl.restore(url, like=like_cpu, map_location="cuda")
        on_cuda_like = fl.restore(url, like=state_to_device(like_cpu, "cuda"))
        to_cpu_map = fl.restore(url, like=state, map_location="cpu")
    checks = {
        "cpu_like": all(not p.is_cuda for p in on_cpu.params.values()),
        "cuda_map_location": all(p.is_cuda for p in on_cuda_map.params.values()),
        "cuda_like": all(p.is_cuda for p in on_cuda_like.params.values()),
        "cpu_map_location": all(not p.is_cuda for p in to_cpu_map.params.values()),
        "bitwise": all(torch.equal(on_cpu.params[k], state.params[k].cpu()) and torch.equal(on_cuda_like.params[k], state.params[k])
                       for k in state.params),
    }
    return {"ok": all(checks.values()), **checks}


class _Encoder(torch.nn.Module):
    def __init__(self, d: int = 1024, layers: int = 8, vocab: int = 1000) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(d, 16, 4 * d, dropout=0.0, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens)))


def _lm_loss(model: Any, batch: Any) -> Any:
    tokens, targets = batch
    return torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


def _step_time(precision: str, rounds: int = 5, per_round: int = 5) -> float:
    torch.manual_seed(0)
    state = state_to_device(fl.TrainState.create(_Encoder(), flo.adamw(lr=1e-4)), "cuda")
    tokens = torch.randint(0, 1000, (32, 256), device="cuda")
    batch = (tokens, tokens.roll(-1, 1))
    step = fl.train_step(_lm_loss, precision=precision).donated
    for _ in range(3):
        state, _ = step(state, batch)
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(per_round):
            state, _ = step(state, batch)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / per_round)
    del state
    torch.cuda.empty_cache()
    return statistics.median(times)


def check_bf16_mixed_speed() -> dict[str, Any]:
    if not torch.cuda.is_bf16_supported():
        return {"ok": True, "skipped": "no bf16 on this GPU"}
    fp32, bf16 = _step_time("32-true"), _step_time("bf16-mixed")
    return {"ok": bool(fp32 > 0 and bf16 > 0), "fp32_ms": fp32 * 1e3, "bf16_mixed_ms": bf16 * 1e3, "speedup": fp32 / bf16}


def check_fp16_mixed() -> dict[str, Any]:
    state = state_to_device(fl.TrainState.create(_mlp(), flo.adamw(lr=1e-3)), "cuda")
    step = fl.train_step(_loss, precision="16-mixed")
    losses = []
    for _ in range(5):
        state, m = step(state, _batch("cuda"))
        losses.append(m["loss"].item())
    wrapped = step.options.join(step.options.carried(state.loop.options), state.opt_state, state.params)
    scale = float(scale_of(wrapped))
    finite = all(torch.isfinite(p).all().item() for p in state.params.values())
    return {"ok": bool(finite and scale > 0), "loss_scale": scale, "losses": losses}


CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "placement": check_placement,
    "train_step": check_train_step,
    "checkpoint": check_checkpoint,
    "bf16_mixed_speed": check_bf16_mixed_speed,
    "fp16_mixed": check_fp16_mixed,
}


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "message": "CUDA is not available here: nothing to check"}))
        return 0
    result: dict[str, Any] = {"cuda": True, "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, check in CHECKS.items():
        t0 = time.perf_counter()
        try:
            result[name] = check()
        except Exception as err:  # noqa: BLE001 - report every check, whatever fails
            result[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]}
        result[name]["seconds"] = round(time.perf_counter() - t0, 2)
    result["all_ok"] = all(r.get("ok") for r in result.values() if isinstance(r, dict))
    print(json.dumps(result))
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
