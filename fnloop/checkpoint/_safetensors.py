"""A streaming codec for the safetensors file format, with the sha256 of the file computed on the way.

The layout is the public safetensors one: an 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}`` padded with
spaces to 8 bytes, then the tensor bytes back to back. Files written here load with
``safetensors.torch.load_file`` and files written by safetensors parse here.

Writing streams every tensor's bytes straight from its memory (no serialized copy of the
whole state) while a worker thread hashes the same bytes. Reading fills one buffer while
hashing it, checks the hash, then builds tensors as views of that buffer. Nothing is ever
unpickled: the header is JSON and the data is raw bytes.

Example:
    >>> import io, torch
    >>> from fnloop.checkpoint import _safetensors as sf
    >>> buf = io.BytesIO()
    >>> digest, size = sf.write(buf, {"w": torch.ones(2)})
    >>> sf.parse(buf.getvalue(), "mem")["w"]
    tensor([1., 1.])
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from fnloop.errors import CheckpointError

__all__ = ["DTYPE_CODES", "CODE_DTYPES", "Hasher", "header", "write", "read_into", "parse"]

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

CHUNK = 16 << 20
PARALLEL_HASH_MIN = 32 << 20
"""Below this many bytes the hash runs inline; above, on a worker thread beside the I/O."""
MAX_HEADER = 100 << 20


class Writable(Protocol):
    """Anything with ``write(bytes-like)``: an open binary file, an fsspec file, a durable writer."""

    def write(self, data: Any, /) -> Any: ...


class Hasher:
    """sha256 of a byte stream; with ``parallel=True`` each chunk is hashed on a worker thread.

    The caller must keep a chunk unchanged until the next ``update`` or ``hexdigest`` call.

    Example:
        >>> h = Hasher(); h.update(b"abc"); h.hexdigest()[:8]
        'ba7816bf'
    """

    def __init__(self, parallel: bool = False) -> None:
        self._sha = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fnloop-sha256") if parallel else None
        self._pending: Future[None] | None = None

    def update(self, chunk: Any) -> None:
        """Add ``chunk`` (bytes-like) to the hash."""
        if self._pool is None:
            self._sha.update(chunk)
            return
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._sha.update, chunk)

    def hexdigest(self) -> str:
        """The hex digest of everything added; ends the worker thread."""
        self.close()
        return self._sha.hexdigest()

    def close(self) -> None:
        """Wait for the last chunk and stop the worker thread."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _check_byteorder() -> None:
    if sys.byteorder != "little":
        raise CheckpointError("fnloop checkpoints need a little-endian machine; this one is big-endian")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` without a copy when it is a dense contiguous CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.resolve_conj().resolve_neg()
    flat = t.reshape(-1)
    if flat.stride(0) != 1:  # non-contiguous, or a 1-element slice that still carries a stride
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    return memoryview(flat.view(torch.uint8).numpy())


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


def write(out: Writable, tensors: dict[str, torch.Tensor]) -> tuple[str, int]:
    """Write ``tensors`` to the open binary file ``out``; return ``(sha256 hex, bytes written)``.

    Tensors may be on any device, non-contiguous or share storage: each is written on its own.
    Their dtypes must be in :data:`DTYPE_CODES`.

    Example:
        >>> import io, torch
        >>> write(io.BytesIO(), {"x": torch.arange(3)})[1]
        120
    """
    _check_byteorder()
    head, order = header(tensors)
    total = len(head) + sum(_nbytes(t) for t in tensors.values())
    hasher = Hasher(parallel=total >= PARALLEL_HASH_MIN)
    try:
        hasher.update(head)
        out.write(head)
        for name in order:
            if tensors[name].numel() == 0:
                continue
            data = _as_bytes(tensors[name])
            for start in range(0, len(data), CHUNK):
                chunk = data[start : start + CHUNK]
                hasher.update(chunk)
                out.write(chunk)
        return hasher.hexdigest(), total
    finally:
        hasher.close()


def read_into(read: Callable[[memoryview], int | None], size: int, *, hash: bool = True) -> tuple[torch.Tensor, str]:
    """Fill a new uint8 tensor of ``size`` bytes with ``read`` (a ``readinto``) while hashing it.

    The buffer is not zero-filled first. Returns ``(buffer, sha256 hex)`` (an empty digest
    with ``hash=False``); the buffer is shorter than ``size`` if the source ended early.

    Example:
        >>> import io
        >>> buf, digest = read_into(io.BytesIO(b"abc").readinto, 3)
        >>> bytes(buf.numpy()), digest[:8]
        (b'abc', 'ba7816bf')
    """
    buf = torch.empty(size, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    hasher = Hasher(parallel=size >= PARALLEL_HASH_MIN) if hash else None
    filled = 0
    try:
        while filled < size:
            end = min(filled + CHUNK, size)
            got = read(view[filled:end]) or 0
            if got <= 0:
                break
            if hasher is not None:
                hasher.update(view[filled : filled + got])
            filled += got
        digest = hasher.hexdigest() if hasher is not None else ""
    finally:
        if hasher is not None:
            hasher.close()
    return (buf if filled == size else buf[:filled].clone()), digest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r} in the header")
        out[k] = v
    return out


def _bad(where: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: not a valid safetensors file ({reason}); the file is corrupt or of another format"
    )


def parse(buf: torch.Tensor | bytes | bytearray, where: str) -> dict[str, torch.Tensor]:
    """Tensors stored in ``buf`` (a whole safetensors file), as views of ``buf`` where aligned.

    ``buf`` is a 1-D uint8 tensor (as :func:`read_into` returns) or bytes. Every offset, dtype
    and shape is checked; ``where`` names the file in error messages.

    Example:
        >>> import io, torch
        >>> f = io.BytesIO(); _ = write(f, {"x": torch.arange(3)})
        >>> parse(f.getvalue(), "x.safetensors")["x"]
        tensor([0, 1, 2])
    """
    _check_byteorder()
    if not isinstance(buf, torch.Tensor):
        buf = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
    raw = memoryview(buf.numpy())
    if len(raw) < 8:
        raise _bad(where, f"{len(raw)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", raw, 0)
    if n > MAX_HEADER or 8 + n > len(raw):
        raise _bad(where, f"header length {n} does not fit in a file of {len(raw)} bytes")
    try:
        entries = json.loads(bytes(raw[8 : 8 + n]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(where, f"unreadable header: {e}") from e
    if not isinstance(entries, dict):
        raise _bad(where, "the header is not a JSON object")
    entries.pop("__metadata__", None)
    base = 8 + n
    data_len = len(raw) - base
    spans = []
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
    del raw
    out: dict[str, torch.Tensor] = {}
    for begin, end, name, dtype, shape in spans:
        piece = buf[base + begin : base + end]
        if piece.data_ptr() % dtype.itemsize or piece.storage_offset() % dtype.itemsize:
            piece = piece.clone()  # misaligned for this dtype (files from other writers)
        out[name] = piece.view(dtype).reshape(shape)
    return out
