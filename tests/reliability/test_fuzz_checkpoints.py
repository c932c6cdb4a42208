"""Fuzzing checkpoint folders: any file of the folder (``meta.json`` included) truncated, flipped,
replaced, nested, grown or swapped for a folder or a FIFO either restores exactly the saved state
or raises a named fnloop error, without blocking and without reading more than it declares."""

from __future__ import annotations

import os
import resource
import shutil
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fnloop.optim as flo
from fnloop.checkpoint import restore, save
from fnloop.errors import FnloopError
from scenarios import assert_same_tree, deep_json, small_state

FILES = ["meta.json", "state.safetensors"]
N = int(os.environ.get("FNLOOP_FUZZ_EXAMPLES", "150"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "pristine"
    state = small_state(flo.adamw(lr=1e-2))
    save(state, str(folder))
    return folder, state


def _mutate(path: str, op: str, data: st.DataObject) -> None:
    size = os.path.getsize(path)
    if op == "truncate":
        with open(path, "r+b") as f:
            f.truncate(data.draw(st.integers(0, max(size - 1, 0)), label="length"))
    elif op == "flip" and size:
        at = data.draw(st.integers(0, size - 1), label="byte")
        bit = data.draw(st.integers(0, 7), label="bit")
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ (1 << bit)]))
    elif op == "replace":
        blob = data.draw(st.binary(max_size=4096), label="content")
        with open(path, "wb") as f:
            f.write(blob)
    elif op == "nest":
        depth = data.draw(st.integers(1, 200_000), label="depth")
        with open(path, "wb") as f:
            f.write(deep_json(depth) if data.draw(st.booleans()) else b'{"a": ' * depth + b"1" + b"}" * depth)
    elif op == "grow":
        extra = data.draw(st.sampled_from([1, 8, 4096, 1 << 20, 8 << 30]), label="extra bytes")
        with open(path, "r+b") as f:
            if extra < 4096:
                f.seek(0, os.SEEK_END)
                f.write(data.draw(st.binary(min_size=extra, max_size=extra)))
            else:
                f.truncate(size + extra)  # sparse: grows without using the disk
    elif op == "folder":
        os.unlink(path)
        os.mkdir(path)
    elif op == "fifo":
        os.unlink(path)
        os.mkfifo(path)
    elif op == "remove":
        os.unlink(path)


def _restore_guarded(url: str, like):
    out: dict = {}

    def target():
        try:
            out["value"] = restore(url, like=like)
        except BaseException as e:  # noqa: BLE001 - judged below
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "restore blocked"
    return out


@settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_folder_restores_exactly_or_raises_a_named_error(pristine, tmp_path_factory, data):
    folder, state = pristine
    work = tmp_path_factory.mktemp("case") / "ck"
    shutil.copytree(folder, work)
    for _ in range(data.draw(st.integers(1, 2), label="mutations")):
        name = data.draw(st.sampled_from(FILES), label="file")
        path = str(work / name)
        if not os.path.isfile(path):
            continue
        _mutate(path, data.draw(st.sampled_from(["truncate", "flip", "replace", "nest", "grow", "folder", "fifo", "remove"])), data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = _restore_guarded(str(work), small_state(flo.adamw(lr=1e-2)))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 256, f"restore used {grown_mb:.0f} MiB more"
    if "error" in out:
        error = out["error"]
        assert isinstance(error, FnloopError), repr(error)
        assert str(work) in str(error)
    else:
        assert_same_tree(state, out["value"], structure=False)
    shutil.rmtree(work.parent, ignore_errors=True)
