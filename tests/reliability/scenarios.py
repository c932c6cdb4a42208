"""Shared pieces of the reliability tests: a small TrainState, folder edits, subprocess helpers."""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

import fsspec
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.checkpoint._seal import seal

REPO = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
PYTHON = sys.executable


def small_state(tx: Any = None, *, step: int = 3) -> fl.TrainState:
    """A seeded TrainState of a Linear(4, 2), at ``step``, with ``global_step`` = ``step``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 2)
    state = fl.TrainState.create(module, tx if tx is not None else flo.adam(lr=1e-2), seed=1)
    return state.replace(step=torch.tensor(step), loop=state.loop.replace(global_step=step, epoch=1))


def read_meta_json(url: str) -> dict[str, Any]:
    fs, path = fsspec.core.url_to_fs(url)
    return json.loads(fs.cat_file(f"{path}/meta.json"))


def write_meta_json(url: str, meta: dict[str, Any], *, resealed: bool = True) -> None:
    """Replace meta.json; ``resealed`` recomputes its checksum (a self-consistent but edited file)."""
    if resealed:
        seal(meta)
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{path}/meta.json", json.dumps(meta, indent=1).encode())


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def assert_same_tree(expected: Any, actual: Any, *, structure: bool = True) -> None:
    """Every leaf bitwise equal (tensors: dtype, shape and bytes), key paths equal."""
    from fnloop.tree import tree_flatten_with_path

    paths, leaves, spec = tree_flatten_with_path(expected)
    paths2, leaves2, spec2 = tree_flatten_with_path(actual)
    assert paths == paths2
    if structure:
        assert spec == spec2
    for path, a, b in zip(paths, leaves, leaves2):
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
            assert torch.equal(a.detach().cpu().reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8)), path
        else:
            assert a == b or (a != a and b != b), path


# --- two-process workers (run in spawned processes: defined here, importable by name) -----------


def race_save(root: str, rounds: int, tag: int, barrier: Any, results: Any) -> None:
    """Each round, after the barrier, save ``{"w": tag}`` to ``root/r<round>`` with overwrite=False."""
    from fnloop.errors import CheckpointError

    torch.set_num_threads(1)
    out = []
    for r in range(rounds):
        barrier.wait(timeout=60)
        try:
            fl.save({"w": torch.full((256,), float(tag))}, f"{root}/r{r}")
            out.append((r, True, ""))
        except CheckpointError as e:
            out.append((r, False, str(e)))
    results.put((tag, out))


def race_publish(root: str, count: int, tag: int, barrier: Any, results: Any) -> None:
    """After the barrier, publish ``count`` versions of model ``m``, each with its own weights."""
    from fnloop import registry

    torch.set_num_threads(1)
    barrier.wait(timeout=60)
    out = []
    for i in range(count):
        value = float(tag * 1000 + i)
        out.append((registry.publish({"w": torch.full((64,), value)}, root, "m"), value))
    results.put((tag, out))


def run_two(target: Any, args: tuple[Any, ...], timeout: float = 240) -> dict[int, Any]:
    """Run ``target(*args, tag, barrier, results)`` in two spawned processes; their results by tag.

    A process still running after ``timeout`` seconds is killed and the test fails.
    """
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, tag, barrier, results)) for tag in (1, 2)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        for _ in procs:
            tag, value = results.get(timeout=timeout)
            out[tag] = value
    except queue.Empty:
        raise AssertionError(f"a writer did not finish within {timeout} s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out


def within(fn: Any, seconds: float = 60.0) -> Any:
    """``fn()`` run in a daemon thread; the test fails (instead of hanging) if it blocks."""
    import threading

    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def cli(args: list[str], cwd: Any, capsys: Any, monkeypatch: Any) -> tuple[int, str]:
    """``fnloop ARGS`` run in this process from folder ``cwd``: ``(exit code, stderr)``."""
    from fnloop.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the folder on sys.path
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err
