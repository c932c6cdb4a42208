"""Every damaged or mismatched checkpoint raises CheckpointError naming the file and the reason."""

from __future__ import annotations

import json
import os
import pickle
import uuid

import fsspec
import pytest
import torch
import xxhash

from fnloop.checkpoint import restore, restore_params, save
from fnloop.checkpoint._seal import seal
from fnloop.errors import CheckpointError, FnloopError


@pytest.fixture(params=["memory", "local"])
def ckpt(request, tmp_path):
    """``(url, fs, path, tree)`` of a freshly saved small checkpoint."""
    if request.param == "local":
        url = str(tmp_path / "ck")
    else:
        url = f"memory://fnloop-bad-{uuid.uuid4().hex}/ck"
    tree = {"w": torch.randn(64, 8), "b": torch.arange(5), "loop": {"epoch": 2}}
    save(tree, url)
    fs, path = fsspec.core.url_to_fs(url)
    yield url, fs, path, tree
    if request.param == "memory" and fs.exists(path):
        fs.rm(path.rsplit("/", 1)[0], recursive=True)


def _edit_meta(fs, path, *, drop=(), **changes):
    meta = json.loads(fs.cat_file(f"{path}/meta.json"))
    meta.update(changes)
    for key in drop:
        del meta[key]
    seal(meta)  # a self-consistent meta.json: what is checked next is its content
    fs.pipe_file(f"{path}/meta.json", json.dumps(meta).encode())


def _checksum(data: bytes) -> str:
    return "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()


def _raises(url, like, *reasons, file="state.safetensors"):
    with pytest.raises(CheckpointError) as err:
        restore(url, like=like)
    message = str(err.value)
    assert url in message and file in message, message
    for reason in reasons:
        assert reason in message, message
    assert isinstance(err.value, FnloopError)
    return message


def test_truncated_file(ckpt):
    url, fs, path, tree = ckpt
    data = fs.cat_file(f"{path}/state.safetensors")
    fs.pipe_file(f"{path}/state.safetensors", data[:-100])
    _raises(url, tree, "truncated")
    _edit_meta(fs, path, drop=["state_bytes"])
    _raises(url, tree, "checksum mismatch")


def test_flipped_byte(ckpt):
    url, fs, path, tree = ckpt
    data = bytearray(fs.cat_file(f"{path}/state.safetensors"))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(f"{path}/state.safetensors", bytes(data))
    _raises(url, tree, "checksum mismatch", "corrupt")


def test_missing_meta(ckpt):
    url, fs, path, tree = ckpt
    fs.rm_file(f"{path}/meta.json")
    _raises(url, tree, "meta.json is missing", "not a checkpoint", file="meta.json")


def test_missing_folder_and_missing_state_file(ckpt):
    url, fs, path, tree = ckpt
    _raises(url + "-nope", tree, "does not exist", file="")
    fs.rm_file(f"{path}/state.safetensors")
    _raises(url, tree, "missing")


def test_malformed_json(ckpt):
    url, fs, path, tree = ckpt
    fs.pipe_file(f"{path}/meta.json", b'{"format": "fnloop-checkpoint", ')
    _raises(url, tree, "malformed JSON", file="meta.json")


def test_malformed_leaf_entries(ckpt):
    url, fs, path, tree = ckpt
    meta = json.loads(fs.cat_file(f"{path}/meta.json"))
    meta["leaves"][0] = {"path": "w", "kind": "tensor", "dtype": "float33", "shape": [1]}
    seal(meta)
    fs.pipe_file(f"{path}/meta.json", json.dumps(meta).encode())
    _raises(url, tree, "malformed leaf entry", file="meta.json")


def test_unknown_format_version(ckpt):
    url, fs, path, tree = ckpt
    _edit_meta(fs, path, format_version=99)
    _raises(url, tree, "format_version 99", file="meta.json")
    _edit_meta(fs, path, format_version=1, format="orbax")
    _raises(url, tree, "not an fnloop checkpoint", file="meta.json")


def test_wrong_tree_lists_every_key_path(ckpt):
    url, fs, path, tree = ckpt
    like = {"w": torch.zeros(64, 8), "extra": torch.zeros(1), "loop": {"epoch": 0, "step": 0}}
    message = _raises(url, like, "extra", "loop/step", "b: in the checkpoint but not in `like`", file="")
    assert "missing from the checkpoint" in message and "checkpoint tree:" in message


def test_wrong_dtype_and_shape(ckpt):
    url, fs, path, tree = ckpt
    like = {
        "w": torch.zeros(64, 8, dtype=torch.float64),
        "b": torch.zeros(6, dtype=torch.int64),
        "loop": {"epoch": "x"},
    }
    message = _raises(url, like, "w: expected tensor float64[64, 8], found tensor float32[64, 8]", file="")
    assert "b: expected tensor int64[6], found tensor int64[5]" in message
    assert "loop/epoch: expected str 'x', found int 2" in message


def test_tensor_where_a_value_was_saved(ckpt):
    url, fs, path, tree = ckpt
    like = {**tree, "loop": {"epoch": torch.zeros(())}}
    _raises(url, like, "loop/epoch: expected tensor", file="")


class _Armed:
    """Unpickling this object opens (creates) the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_renamed_to_state_file_is_rejected_without_running(ckpt, tmp_path, writer):
    url, fs, path, tree = ckpt
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_Armed(str(probe)))).close()
    assert probe.exists(), "the payload must be live for this test to mean anything"

    marker = tmp_path / "marker"
    payload = {"w": _Armed(str(marker))}
    local = tmp_path / "payload.bin"
    if writer == "torch.save":
        torch.save(payload, local)
    else:
        local.write_bytes(pickle.dumps(payload))
    data = local.read_bytes()
    fs.pipe_file(f"{path}/state.safetensors", data)
    _edit_meta(fs, path, checksum=_checksum(data), state_bytes=len(data))
    _raises(url, tree, "replaced", "bytes of tensors meta.json declares")  # refused before it is parsed
    with pytest.raises(CheckpointError):
        restore_params(url)
    assert not marker.exists()


def test_header_that_disagrees_with_meta(ckpt):
    url, fs, path, tree = ckpt
    other = {"w": torch.randn(8, 64), "b": torch.arange(5), "loop": {"epoch": 2}}
    scratch = url + "-other"
    save(other, scratch)
    _, other_path = fsspec.core.url_to_fs(scratch)
    data = fs.cat_file(f"{other_path}/state.safetensors")
    fs.pipe_file(f"{path}/state.safetensors", data)
    _edit_meta(fs, path, checksum=_checksum(data), state_bytes=len(data))
    _raises(url, tree, "does not agree with meta.json", "'w'")


def test_unreadable_permissions(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    url = save({"w": torch.ones(1)}, str(tmp_path / "ck"))
    os.chmod(tmp_path / "ck" / "state.safetensors", 0)
    _raises(url, None, "cannot read")


@pytest.mark.parametrize("where", ["header length", "header", "first data byte", "middle", "last byte"])
def test_any_flipped_byte_is_caught_by_the_checksum(ckpt, where):
    url, fs, path, tree = ckpt
    data = bytearray(fs.cat_file(f"{path}/state.safetensors"))
    header_end = 8 + int.from_bytes(data[:8], "little")
    at = {"header length": 0, "header": 20, "first data byte": header_end, "middle": len(data) // 2, "last byte": -1}
    data[at[where]] ^= 0x10
    fs.pipe_file(f"{path}/state.safetensors", bytes(data))
    _raises(url, tree, "checksum mismatch", "xxh3_128:")


def test_verify_false_skips_the_checksum_but_not_the_structure(ckpt):
    url, fs, path, tree = ckpt
    data = bytearray(fs.cat_file(f"{path}/state.safetensors"))
    data[-1] ^= 0x10  # the last byte of the last tensor
    fs.pipe_file(f"{path}/state.safetensors", bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        restore(url, like=tree)
    out = restore(url, like=tree, verify=False)
    changed = [k for k in ("w", "b") if not torch.equal(out[k], tree[k])]
    assert len(changed) == 1  # read as stored, unchecked
    fs.pipe_file(f"{path}/state.safetensors", bytes(data[:-100]))
    _edit_meta(fs, path, drop=["state_bytes"])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        restore(url, like=tree, verify=False)
