"""The streaming safetensors codec against the safetensors library, and its header checks."""

from __future__ import annotations

import hashlib
import io
import json
import struct

import pytest
import safetensors.torch
import torch
import xxhash

from fnloop.checkpoint import _checksum as checksum_module
from fnloop.checkpoint import _safetensors as codec
from fnloop.checkpoint import _stream as stream
from fnloop.checkpoint._checksum import Checksum
from fnloop.checkpoint._safetensors import Malformed
from fnloop.checkpoint._stream import read_tensors
from fnloop.errors import CheckpointError

DTYPES = list(codec.DTYPE_CODES)


def _sample(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    base = torch.arange(-12, 12, dtype=torch.int64).reshape(4, 6)
    if dtype.is_floating_point and dtype.itemsize == 1:
        full = (base.float() / 4).to(dtype)
    else:
        full = base.to(dtype)
    return {"full": full, "scalar": full[1, 1].clone(), "empty": torch.zeros(0, 3, dtype=dtype), "row": full[2].clone()}


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_library_files_parse_and_ours_load_in_the_library(dtype):
    tensors = _sample(dtype)
    theirs = codec.parse(safetensors.torch.save(tensors), "theirs")
    assert all(_equal(tensors[k], theirs[k]) for k in tensors)
    out = io.BytesIO()
    checksum = Checksum()
    size = codec.write(out, tensors, checksum)
    data = out.getvalue()
    assert size == len(data) and checksum.digest() == "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()
    loaded = safetensors.torch.load(data)
    assert sorted(loaded) == sorted(tensors) and all(_equal(tensors[k], loaded[k]) for k in tensors)


def test_mixed_dtypes_are_aligned_and_views_of_one_buffer():
    tensors = {
        "a": torch.ones(3, dtype=torch.int8),
        "b": torch.randn(5, dtype=torch.float64),
        "c": torch.ones(1, dtype=torch.bfloat16),
    }
    out = io.BytesIO()
    size = codec.write(out, tensors)
    buf = torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)
    parsed = codec.parse(buf, "mixed")
    streamed = read_tensors(io.BytesIO(out.getvalue()).readinto, size, "mixed")
    for result, storage in [(parsed, buf.data_ptr()), (streamed, streamed["b"].untyped_storage().data_ptr())]:
        assert all(_equal(tensors[k], result[k]) for k in tensors)
        assert result["b"].data_ptr() % 8 == 0
        assert all(t.untyped_storage().data_ptr() == storage for t in result.values()), "aligned tensors are views"


def _file(entries: dict, data: bytes) -> bytearray:
    head = json.dumps(entries).encode()
    return bytearray(struct.pack("<Q", len(head)) + head + data)


def test_misaligned_offsets_are_copied():
    value = torch.tensor([1.5, -2.0], dtype=torch.float32)
    entries = {
        "i": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]},
        "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }
    raw = _file(entries, b"\x07" + value.numpy().tobytes())
    parsed = codec.parse(raw, "odd")
    assert torch.equal(parsed["f"], value) and parsed["i"].item() == 7
    padded = torch.zeros(len(raw) + 1, dtype=torch.uint8)
    padded[1:] = torch.frombuffer(raw, dtype=torch.uint8)
    shifted = codec.parse(padded[1:], "shifted")
    assert torch.equal(shifted["f"], value) and shifted["i"].item() == 7


@pytest.mark.parametrize(
    ("entries", "data", "reason"),
    [
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "does not match offsets"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "header describes 8"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "header describes 4"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap or overlap"),
        ({"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "does not match offsets"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
@pytest.mark.parametrize("reader", ["parse", "stream"])
def test_bad_headers(entries, data, reason, reader):
    raw = bytes(_file(entries, data))
    with pytest.raises(CheckpointError, match=reason) as err:
        if reader == "parse":
            codec.parse(raw, "some/file.safetensors")
        else:
            read_tensors(io.BytesIO(raw).readinto, len(raw), "some/file.safetensors")
    assert "some/file.safetensors" in str(err.value)


def test_bad_lengths_and_duplicate_keys():
    with pytest.raises(CheckpointError, match="shorter than"):
        codec.parse(bytearray(b"\1\2"), "f")
    with pytest.raises(CheckpointError, match="does not fit"):
        codec.parse(bytearray(struct.pack("<Q", 10**6) + b"{}"), "f")
    head = b'{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    with pytest.raises(CheckpointError, match="duplicate key"):
        codec.parse(bytearray(struct.pack("<Q", len(head)) + head + b"\0"), "f")


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_streamed_read_checksums_every_byte_in_chunks(monkeypatch, algorithm):
    monkeypatch.setattr(checksum_module, "INLINE_CHUNK", 1000)
    monkeypatch.setattr(checksum_module, "PARALLEL_CHUNK", 1000)
    monkeypatch.setattr(stream, "GROUP", 3000)
    tensors = {f"t{i}": torch.randn(777 * (i + 1)) for i in range(4)}
    tensors["small"] = torch.arange(5, dtype=torch.int16)
    out = io.BytesIO()
    written = Checksum(algorithm, parallel=True)
    size = codec.write(out, tensors, written)
    data = out.getvalue()
    reference = xxhash.xxh3_128 if algorithm == "xxh3_128" else hashlib.sha256
    assert written.digest() == f"{algorithm}:{reference(data).hexdigest()}"
    read = Checksum(algorithm, parallel=True)
    back = read_tensors(io.BytesIO(data).readinto, size, "f", read)
    assert read.digest() == written.digest()
    assert all(_equal(tensors[k], back[k]) for k in tensors)
    short = Checksum(algorithm)
    with pytest.raises(Malformed, match="ended after 5000 of"):
        read_tensors(io.BytesIO(data[:5000]).readinto, size, "f", short)
    assert short.digest() == f"{algorithm}:{reference(data[:5000]).hexdigest()}"
