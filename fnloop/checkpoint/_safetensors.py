"""A streaming codec for the safetensors file format, with the file's checksum computed on the way.

The layout is the public safetensors one: an 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}`` padded with
spaces to 8 bytes, then the tensor bytes back to back. Files written here load with
``safetensors.torch.load_file`` and files written by safetensors parse here.

Writing streams every tensor's bytes straight from its memory (no serialized copy of the
whole state) while a worker thread hashes the same bytes. The header is checked here
(:func:`header_length`, :func:`layout`); :mod:`fnloop.checkpoint._stream` reads a file
straight into its tensors. Nothing is ever unpickled: the header is JSON and the data raw bytes.

Example:
    >>> import io, torch
    >>> from fnloop.checkpoint import _safetensors as sf
    >>> buf = io.BytesIO()
    >>> size = sf.write(buf, {"w": torch.ones(2)})
    >>> sf.parse(buf.getvalue(), "mem")["w"]
    tensor([1., 1.])
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from fnloop.checkpoint._checksum import Checksum
from fnloop.errors import CheckpointError

__all__ = ["DTYPE_CODES", "CODE_DTYPES", "Malformed", "header", "write", "header_length", "layout", "views", "parse"]

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in [
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
]:
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
CODE_DTYPES: dict[str, torch.dtype] = {c: d for d, c in DTYPE_CODES.items()}

CHUNK = 256 << 10
"""Bytes per write and checksum update: small enough to be checksummed while still in the CPU cache."""
DEVICE_CHUNK = 16 << 20
"""Bytes copied to the host at a time from a tensor on another device."""
MAX_HEADER = 100 << 20


class Writable(Protocol):
    """Anything with ``write(bytes-like)``: an open binary file, an fsspec file, a durable writer."""

    def write(self, data: Any, /) -> Any: ...


def _check_byteorder() -> None:
    if sys.byteorder != "little":
        raise CheckpointError("fnloop checkpoints need a little-endian machine; this one is big-endian")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _pieces(t: torch.Tensor) -> Iterator[memoryview]:
    """The bytes of ``t`` in order, ``CHUNK`` at a time: views of a dense contiguous CPU tensor,
    copies of ``DEVICE_CHUNK`` bytes at a time from another device (never the whole tensor)."""
    flat = t.detach().resolve_conj().resolve_neg().reshape(-1)
    if flat.stride(0) != 1:  # non-contiguous, or a 1-element slice that still carries a stride
        flat = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device).copy_(flat)
    step = DEVICE_CHUNK // flat.element_size() if flat.device.type != "cpu" else flat.numel()
    for start in range(0, flat.numel(), max(1, step)):
        data = memoryview(flat[start : start + step].to("cpu").view(torch.uint8).numpy())
        for offset in range(0, len(data), CHUNK):
            yield data[offset : offset + CHUNK]


def header(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[str]]:
    """The encoded header (length prefix included) and the order the tensors' bytes follow it.

    Tensors are laid out by decreasing element size, then name, so every tensor starts at an
    offset that is a multiple of its element size.

    Example:
        >>> import torch
        >>> head, order = header({"a": torch.zeros(1, dtype=torch.int8), "b": torch.zeros(1)})
        >>> order
        ['b', 'a']
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        t = tensors[name]
        size = _nbytes(t)
        entries[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def write(out: Writable, tensors: dict[str, torch.Tensor], checksum: Checksum | None = None) -> int:
    """Write ``tensors`` to the open binary file ``out``; return the bytes written.

    Every byte also goes to ``checksum`` (hashed on its worker thread while ``out`` writes).
    Tensors may be on any device, non-contiguous or share storage: each is written on its own.
    Their dtypes must be in :data:`DTYPE_CODES`.

    Example:
        >>> import io, torch
        >>> write(io.BytesIO(), {"x": torch.arange(3)})
        120
    """
    _check_byteorder()
    head, order = header(tensors)
    total = len(head) + sum(_nbytes(t) for t in tensors.values())
    add = checksum.update if checksum is not None else _ignore
    add(head)
    out.write(head)
    for name in order:
        if tensors[name].numel() == 0:
            continue
        for chunk in _pieces(tensors[name]):
            add(chunk)
            out.write(chunk)
    return total


def _ignore(chunk: Any) -> None:
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r} in the header")
        out[k] = v
    return out


class Malformed(CheckpointError):
    """The bytes are not a valid safetensors file."""


def _bad(where: str, reason: str) -> Malformed:
    return Malformed(f"{where}: not a valid safetensors file ({reason}); the file is corrupt or of another format")


Span = tuple[int, int, str, torch.dtype, list[int]]
"""``(begin, end, name, dtype, shape)`` of one tensor, offsets relative to the data section."""


def header_length(prefix: bytes, size: int, where: str) -> int:
    """The JSON header length read from the first 8 bytes of a file of ``size`` bytes.

    Example:
        >>> header_length(struct.pack("<Q", 16), 24 + 12, "f")
        16
    """
    _check_byteorder()
    if len(prefix) < 8:
        raise _bad(where, f"{size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", prefix, 0)
    if n > MAX_HEADER or 8 + n > size:
        raise _bad(where, f"header length {n} does not fit in a file of {size} bytes")
    return n


def layout(raw: bytes, data_len: int, where: str) -> list[Span]:
    """The spans a JSON header describes, sorted by offset; every dtype, shape and offset is
    checked, and the spans must tile the ``data_len`` bytes of tensor data exactly.

    Example:
        >>> layout(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "f")
        [(0, 8, 'w', torch.float32, [2])]
    """
    try:
        entries = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(where, f"unreadable header: {e}") from e
    if not isinstance(entries, dict):
        raise _bad(where, "the header is not a JSON object")
    entries.pop("__metadata__", None)
    spans: list[Span] = []
    for name, e in entries.items():
        try:
            dtype = CODE_DTYPES[e["dtype"]]
            shape = [int(s) for s in e["shape"]]
            begin, end = (int(o) for o in e["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise _bad(where, f"entry {name!r} is malformed ({err!r})") from err
        if any(s < 0 for s in shape) or end - begin != math.prod(shape) * dtype.itemsize:
            raise _bad(where, f"entry {name!r}: shape {shape} of {e['dtype']} does not match offsets {begin}..{end}")
        spans.append((begin, end, name, dtype, shape))
    spans.sort()
    cursor = 0
    for begin, end, name, _, _ in spans:
        if begin != cursor:
            raise _bad(where, f"entry {name!r} starts at {begin}, expected {cursor} (gap or overlap)")
        cursor = end
    if cursor != data_len:
        raise _bad(where, f"tensor data is {data_len} bytes, the header describes {cursor}")
    return spans


def views(buf: torch.Tensor, spans: list[Span], base: int = 0) -> dict[str, torch.Tensor]:
    """The tensors of ``spans`` as views of the uint8 tensor ``buf`` (data starting at ``base``);
    a tensor misaligned for its dtype (files of other writers) is copied.

    Example:
        >>> views(torch.zeros(8, dtype=torch.uint8), [(0, 8, "w", torch.float32, [2])])["w"]
        tensor([0., 0.])
    """
    out: dict[str, torch.Tensor] = {}
    for begin, end, name, dtype, shape in spans:
        piece = buf[base + begin : base + end]
        if piece.data_ptr() % dtype.itemsize or piece.storage_offset() % dtype.itemsize:
            piece = piece.clone()
        out[name] = piece.view(dtype).reshape(shape)
    return out


def parse(buf: torch.Tensor | bytes | bytearray, where: str) -> dict[str, torch.Tensor]:
    """Tensors stored in ``buf`` (a whole safetensors file), as views of ``buf`` where aligned.

    ``buf`` is a 1-D uint8 tensor or bytes. Every offset, dtype and shape is checked; ``where``
    names the file in error messages.

    Example:
        >>> import io, torch
        >>> f = io.BytesIO(); _ = write(f, {"x": torch.arange(3)})
        >>> parse(f.getvalue(), "x.safetensors")["x"]
        tensor([0, 1, 2])
    """
    if not isinstance(buf, torch.Tensor):
        buf = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
    raw = memoryview(buf.numpy())
    n = header_length(bytes(raw[:8]), len(raw), where)
    spans = layout(bytes(raw[8 : 8 + n]), len(raw) - 8 - n, where)
    del raw
    return views(buf, spans, 8 + n)
