"""Round trips of fnloop.checkpoint.save / restore on memory:// and local paths."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import uuid

import fsspec
import pytest
import safetensors.torch
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop.checkpoint import read_meta, restore, restore_params, restore_weights, save
from fnloop.errors import CheckpointError
from fnloop.tree import tree_flatten_with_path, tree_structure

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]


@pytest.fixture(params=["memory", "local"])
def base(request, tmp_path):
    """A fresh folder URL on the memory filesystem or the local disk."""
    if request.param == "local":
        yield str(tmp_path)
        return
    name = f"/fnloop-test-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    memory = fsspec.filesystem("memory")
    if memory.exists(name):
        memory.rm(name, recursive=True)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, nan included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    def raw(t):
        return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)

    return torch.equal(raw(a), raw(b))


def same_leaf(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and same_tensor(a, b)
    return type(a) is type(b) and repr(a) == repr(b)


def assert_same_tree(expected, actual, *, structure=True):
    if structure:
        assert tree_structure(expected) == tree_structure(actual)
    pa, la, _ = tree_flatten_with_path(expected)
    pb, lb, _ = tree_flatten_with_path(actual)
    assert pa == pb
    bad = [p for p, x, y in zip(pa, la, lb) if not same_leaf(x, y)]
    assert not bad, f"leaves differ: {bad}"


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if dtype == torch.bool:
        t = torch.randint(0, 2, shape, generator=gen).bool()
    elif dtype == torch.int64:
        t = torch.randint(-(2**62), 2**62, shape, generator=gen, dtype=torch.int64)
    else:
        t = (torch.randn(shape, generator=gen) * 100).to(dtype)
    layout = draw(st.sampled_from(["plain", "transposed", "sliced"]))
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif layout == "sliced" and t.dim() >= 1:
        t = t[::2]
    return t


values = st.one_of(
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=6),
)
keys = st.text(alphabet="abz_.019", min_size=1, max_size=4)
trees = st.recursive(
    st.one_of(tensors(), tensors(), values),
    lambda children: st.one_of(
        st.dictionaries(keys, children, max_size=3),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
    ),
    max_leaves=8,
)


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees)
def test_round_trip_property(tree):
    with tempfile.TemporaryDirectory() as tmp:
        memory = f"memory://fnloop-prop-{uuid.uuid4().hex}/ckpt"
        local = os.path.join(tmp, "ckpt")
        try:
            for url in (memory, local):
                save(tree, url)
                assert_same_tree(tree, restore(url, like=tree))
            paths, leaves, _ = tree_flatten_with_path(tree)
            want = {p: x for p, x in zip(paths, leaves) if isinstance(x, torch.Tensor)}
            stored = safetensors.torch.load_file(os.path.join(local, "state.safetensors"))
            assert sorted(stored) == sorted(want)
            assert all(same_tensor(want[p].contiguous(), stored[p]) for p in want)
            assert sorted(restore(memory)) == sorted(want)
        finally:
            fs, path = fsspec.core.url_to_fs(memory)
            if fs.exists(path):
                fs.rm(path.rsplit("/", 1)[0], recursive=True)


ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips(base, dtype):
    full = (torch.arange(-6, 6).reshape(3, 4) * 7).to(dtype)
    tree = {"full": full, "scalar": full[1, 2].clone(), "empty": torch.zeros(0, 5, dtype=dtype), "strided": full.t()}
    url = save(tree, f"{base}/ck")
    assert_same_tree({k: v.contiguous() for k, v in tree.items()}, restore(url, like=tree))
    assert all(t.is_contiguous() for t in restore(url).values())


def test_nan_inf_and_big_values_round_trip(base):
    tree = {
        "t": torch.tensor([math.nan, math.inf, -math.inf, -0.0]),
        "loop": {"a": math.nan, "b": math.inf, "c": -math.inf, "d": -0.0, "e": 2**63 + 5, "f": "x\u00e9", "g": False},
    }
    url = save(tree, f"{base}/ck", metrics={"loss": math.nan, "best": -math.inf, "n": 3})
    assert_same_tree(tree, restore(url, like=tree))
    fs, path = fsspec.core.url_to_fs(url)
    text = fs.cat_file(path + "/meta.json").decode()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    metrics = read_meta(url)["metrics"]
    assert math.isnan(metrics["loss"]) and metrics["best"] == -math.inf and metrics["n"] == 3


def test_views_shared_storage_and_expanded_tensors(base):
    storage = torch.arange(20.0)
    tree = {
        "whole": storage,
        "again": storage,
        "overlap_a": storage[2:10],
        "overlap_b": storage[5:15],
        "expanded": torch.ones(3).expand(4, 3),
        "neg": torch.randn(3, dtype=torch.complex64).conj(),
    }
    url = save(tree, f"{base}/ck")
    out = restore(url, like=tree)
    assert_same_tree({k: v.resolve_conj().contiguous() for k, v in tree.items()}, out)
    out["whole"].add_(1)
    assert torch.equal(out["again"], storage), "restored leaves must not share memory"


def _state(**loop_changes):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    tx = flo.chain(flo.clip_by_global_norm(1.0), flo.adamw(lr=1e-3, weight_decay=0.01))
    state = fl.TrainState.create(module, tx, seed=3)
    return state.replace(loop=state.loop.replace(**loop_changes))


def test_train_state_round_trip_and_meta(base):
    callbacks = {"early_stopping": {"best": math.inf, "wait": 2}, "timer": {"elapsed": 1.5}}
    state = _state(epoch=3, global_step=7, status="running", callbacks=callbacks)
    gen = torch.Generator().manual_seed(0)
    state = state.replace(
        step=torch.tensor(7),
        params={k: torch.randn(v.shape, generator=gen) for k, v in state.params.items()},
    )
    url = save(state, f"{base}/ck", metrics={"val_loss": torch.tensor(0.25)})
    like = _state(callbacks={"early_stopping": {"best": 0.0, "wait": 0}, "timer": {"elapsed": 0.0}})
    out = restore(url, like=like)
    assert isinstance(out, fl.TrainState) and out.module is like.module and out.tx is like.tx
    assert tree_structure(out) == tree_structure(like)
    assert_same_tree(state, out, structure=False)
    meta = read_meta(url)
    assert meta["format"] == "fnloop-checkpoint"
    assert meta["step"] == 7 and meta["metrics"] == {"val_loss": 0.25}
    assert meta["torch_version"] == torch.__version__ and meta["fnloop_version"]
    fs, path = fsspec.core.url_to_fs(url)
    data = fs.cat_file(path + "/state.safetensors")
    assert meta["checksum"] == "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()
    assert meta["format_version"] == 3 and meta["state_bytes"] == len(data)
    leaves = {e["path"]: e for e in meta["leaves"]}
    mu = {"path": "opt_state/1/0/mu/0.weight", "kind": "tensor", "dtype": "float32", "shape": [4, 3]}
    assert leaves["opt_state/1/0/mu/0.weight"] == mu
    assert leaves["loop/status"] == {"path": "loop/status", "kind": "value", "value": "running", "type": "str"}
    assert leaves["loop/callbacks/early_stopping/best"]["value"] == "inf"
    assert "TrainState(" in meta["treespec"] and "AdamState(" in meta["treespec"]


def test_refuses_to_overwrite_unless_asked(base):
    url = save({"w": torch.zeros(2)}, f"{base}/ck")
    with pytest.raises(CheckpointError, match="already exists") as err:
        save({"w": torch.ones(2)}, url)
    assert url in str(err.value)
    save({"w": torch.ones(2)}, url, overwrite=True)
    assert torch.equal(restore(url)["w"], torch.ones(2))


def test_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        save({"w": torch.zeros(1)}, str(tmp_path / "ck"))
    assert (tmp_path / "ck" / "notes.txt").exists()


def test_local_save_leaves_no_temporary_folder(tmp_path):
    save({"w": torch.zeros(3)}, str(tmp_path / "a"))
    save({"w": torch.ones(3)}, str(tmp_path / "a"), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a"]
    assert sorted(os.listdir(tmp_path / "a")) == ["meta.json", "state.safetensors"]


def test_url_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree = {"w": torch.arange(4)}
    for url in ("relative/ck", f"file://{tmp_path}/ck2", str(tmp_path / "ck3")):
        save(tree, url)
        assert torch.equal(restore(url)["w"], tree["w"])
    assert (tmp_path / "relative" / "ck" / "meta.json").exists()


def test_restore_devices_and_requires_grad(base):
    tree = {"w": torch.randn(3, requires_grad=True), "n": torch.arange(3)}
    url = save(tree, f"{base}/ck")
    out = restore(url, like=tree)
    assert out["w"].requires_grad and not out["n"].requires_grad
    abstract = {"w": torch.empty(3, device="meta"), "n": torch.empty(3, dtype=torch.int64, device="meta")}
    out = restore(url, like=abstract)
    assert out["w"].device.type == "cpu" and torch.equal(out["w"], tree["w"].detach())
    assert restore(url, map_location="meta")["w"].device.type == "meta"


def test_restore_params_and_weights_only(base):
    trained = _state(epoch=9)
    trained = trained.replace(
        params={k: v + 1 for k, v in trained.params.items()},
        buffers={k: v + 2 for k, v in trained.buffers.items()},
        step=torch.tensor(50),
    )
    url = save(trained, f"{base}/ck")
    weights = restore_params(url)
    assert sorted(weights) == sorted([*trained.params, *trained.buffers])
    assert all(torch.equal(weights[k], v) for k, v in {**trained.params, **trained.buffers}.items())
    fresh = _state()
    out = restore_weights(url, like=fresh)
    assert_same_tree(trained.params, out.params)
    assert_same_tree(trained.buffers, out.buffers)
    assert int(out.step) == 0 and out.loop.epoch == 0
    assert_same_tree(fresh.opt_state, out.opt_state)
    other = fl.TrainState.create(torch.nn.Linear(3, 5), flo.sgd(lr=0.1))
    with pytest.raises(CheckpointError) as err:
        restore_weights(url, like=other)
    for path in ("params/weight", "params/0.weight", "buffers/1.running_mean"):
        assert path in str(err.value)


def test_restore_params_of_a_plain_dict(base):
    url = save({"a": torch.ones(1), "b": {"c": torch.zeros(2)}}, f"{base}/ck")
    assert sorted(restore_params(url)) == ["a", "b/c"]


def test_unstorable_leaves_are_named(base):
    with pytest.raises(CheckpointError) as err:
        save({"ok": torch.ones(1), "obj": object(), "c": torch.ones(1, dtype=torch.complex128)}, f"{base}/ck")
    assert "obj" in str(err.value) and "complex128" in str(err.value)
    fs, path = fsspec.core.url_to_fs(f"{base}/ck")
    assert not fs.exists(path + "/meta.json")


def _as_format_1(fs, path: str) -> None:
    """Rewrite a checkpoint's meta.json the way format 1 wrote it (a sha256 of the tensor file)."""
    meta = json.loads(fs.cat_file(f"{path}/meta.json"))
    del meta["checksum"]
    del meta["meta_checksum"]  # format 1 had no checksum of meta.json
    meta["format_version"] = 1
    meta["sha256"] = hashlib.sha256(fs.cat_file(f"{path}/state.safetensors")).hexdigest()
    fs.pipe_file(f"{path}/meta.json", json.dumps(meta, indent=1).encode())


def test_format_1_checkpoints_with_sha256_still_restore(base):
    state = _state()
    url = save(state, f"{base}/old")
    fs, path = fsspec.core.url_to_fs(url)
    _as_format_1(fs, path)
    meta = read_meta(url)
    assert meta["format_version"] == 1 and meta["checksum"] == "sha256:" + meta["sha256"]
    assert_same_tree(state, restore(url, like=_state()), structure=False)
    data = bytearray(fs.cat_file(f"{path}/state.safetensors"))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(f"{path}/state.safetensors", bytes(data))
    with pytest.raises(CheckpointError, match=r"checksum mismatch \(sha256:"):
        restore(url, like=_state())
    meta = json.loads(fs.cat_file(f"{path}/meta.json"))
    meta["sha256"] = "abc"
    fs.pipe_file(f"{path}/meta.json", json.dumps(meta).encode())
    with pytest.raises(CheckpointError, match="'sha256' must be a hex digest"):
        restore(url, like=_state())
