"""Reading a safetensors file straight into its tensors, with the checksum computed on the way.

The header is read and checked first; then each tensor's bytes are read into that tensor's
own memory (tensors under ``GROUP`` bytes share one buffer with their neighbours), in chunks
of the checksum's ``chunk`` bytes, each added to the checksum as soon as it lands: inline,
while it is still in the CPU cache, or on a worker thread during the next read (see
:func:`fnloop.checkpoint._checksum.for_stream`). Every byte
of the file goes through the checksum even when the file turns out malformed or short, so a
caller can tell corruption (the checksum differs) from a file another writer got wrong.

Example:
    >>> import io, torch
    >>> from fnloop.checkpoint import _safetensors
    >>> f = io.BytesIO(); n = _safetensors.write(f, {"w": torch.ones(2)})
    >>> read_tensors(io.BytesIO(f.getvalue()).readinto, n, "mem")
    {'w': tensor([1., 1.])}
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fnloop.checkpoint import _pread
from fnloop.checkpoint._pages import libc, prefault, resident
from fnloop.checkpoint._checksum import INLINE_CHUNK, Checksum
from fnloop.checkpoint._safetensors import Malformed, Span, header_length, layout, views
from fnloop.errors import CheckpointError

__all__ = ["GROUP", "UNCHECKED_CHUNK", "read_tensors"]

GROUP = 1 << 20
"""Tensors smaller than this are read together into one buffer (one allocation, one read)."""
UNCHECKED_CHUNK = 64 << 20
"""Bytes per read call without a checksum (fewer calls; the kernel reads ahead either way)."""

ReadInto = Callable[[memoryview], "int | None"]


class _Source:
    """A ``readinto`` function with every byte read also added to an optional checksum."""

    def __init__(self, readinto: ReadInto, checksum: Checksum | None, where: str, size: int = 0) -> None:
        self._readinto = readinto
        self._size = size
        self._checksum = checksum
        self._where = where
        self._stable = True
        self.position = 0

    def fill(self, view: memoryview) -> int:
        """Fill ``view`` (stops early at the end of the file); return the bytes read."""
        filled = 0
        step = self._checksum.chunk if self._checksum is not None else UNCHECKED_CHUNK
        tail = self._checksum is not None and self._checksum.chunk > INLINE_CHUNK  # hashed on a thread
        while filled < len(view):
            # near the end of the file, smaller reads: the hash of the last one is all that is left after it
            n = step if not tail or self._size - self.position - filled > 2 * step else max(step // 16, INLINE_CHUNK)
            got = self._readinto(view[filled : min(filled + n, len(view))]) or 0
            if got <= 0:
                break
            if self._checksum is not None:  # the destination's own memory unless draining: nobody writes it again
                self._checksum.update(view[filled : filled + got], stable=self._stable)
            filled += got
        self.position += filled
        return filled

    def exact(self, view: memoryview, size: int) -> None:
        """Fill ``view`` completely or raise :class:`Malformed` (the file of ``size`` bytes ended early)."""
        if self.fill(view) < len(view):
            raise Malformed(
                f"{self._where}: the file ended after {self.position} of {size} bytes; it is truncated or corrupt"
            )

    def drain(self) -> None:
        """Read (and checksum) the rest of the file, through two buffers used in turn."""
        if self._checksum is None:
            return
        n = self._checksum.chunk
        self._stable = False  # two scratch buffers in turn: each waits for the hash of the one before
        scratch = [memoryview(bytearray(n)), memoryview(bytearray(n))]
        turn = 0
        while self.fill(scratch[turn]) == n:
            turn ^= 1


def _groups(spans: list[Span]) -> Iterator[list[Span]]:
    """Runs of consecutive spans: a tensor of ``GROUP`` bytes or more alone, smaller ones together."""
    group: list[Span] = []
    size = 0
    for span in spans:
        n = span[1] - span[0]
        if group and (n >= GROUP or size >= GROUP):
            yield group
            group, size = [], 0
        group.append(span)
        size += n
    if group:
        yield group


def _buffer(n: int, where: str) -> tuple[torch.Tensor, memoryview]:
    try:
        buf = torch.empty(n, dtype=torch.uint8)
    except (RuntimeError, MemoryError) as e:
        raise CheckpointError(f"{where}: cannot allocate {n} bytes to read a tensor ({e}); free memory or restore elsewhere") from None
    return buf, memoryview(buf.numpy()) if n else memoryview(b"")


PREFAULT = 4 << 20
"""Buffers of at least this many bytes have their pages mapped ahead of the reads that fill them,
on a thread (:class:`_Prefaulter`): a fresh 100 MiB buffer otherwise takes 25,600 page faults in
the reads, one trap each, which cost as much as the copy from the page cache itself."""
PREFAULT_SLICE = 8 << 20


class _Prefaulter:
    """Maps the pages of ``buffers`` (in file order) on a thread while the reader fills them.

    Mapping a page the reader has already written is a no-op, and the reader faults in any
    page the thread has not reached yet: correct in any interleaving, faster in most. Off the
    reader's path, a cold read's disk wait is not lengthened by the mapping (mapping each
    buffer before its read was: 0.7x ``torch.load`` at 1 GiB instead of 0.9x).
    """

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self._targets = [(b.data_ptr(), b.numel()) for b in buffers if b.numel() >= PREFAULT]
        self._stop = False
        self._thread: threading.Thread | None = None
        if self._targets and libc() is not None:
            self._thread = threading.Thread(target=self._run, name="fnloop-prefault", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        page = mmap.PAGESIZE
        for address, n in self._targets:
            # whole pages, the first and last included (pages the buffer shares are mapped memory too)
            begin, end = address // page * page, -(-(address + n) // page) * page
            for start in range(begin, end, PREFAULT_SLICE):
                if self._stop:
                    return
                length = min(PREFAULT_SLICE, end - start)
                if not resident(start, length):  # memory the allocator reused is mapped already
                    prefault(start, length)

    def close(self) -> None:
        """Stop the thread (the reads are done, or failed) and wait for it."""
        self._stop = True
        if self._thread is not None:
            self._thread.join()


def _agree(spans: list[Span], want: dict[str, dict[str, Any]], where: str) -> None:
    """Raise :class:`Malformed` unless the header describes exactly the tensors ``want`` declares."""
    found = {name: {"dtype": str(dtype).removeprefix("torch."), "shape": shape} for _, _, name, dtype, shape in spans}
    bad = sorted(set(found) ^ set(want))
    bad += [n for n in found if n in want and (want[n]["dtype"], want[n]["shape"]) != (found[n]["dtype"], found[n]["shape"])]
    if bad:
        raise Malformed(f"{where}: does not agree with meta.json on {bad[:10]}; the checkpoint is damaged")


def read_tensors(
    readinto: ReadInto,
    size: int,
    where: str,
    checksum: Checksum | None = None,
    want: dict[str, dict[str, Any]] | None = None,
    fd: int | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file of ``size`` bytes that ``readinto`` reads, in new CPU memory.

    ``fd``, the descriptor of the same (local) file, lets the tensor bytes be read on two
    threads while the page cache holds them (:mod:`fnloop.checkpoint._pread`).

    With ``want`` (``{name: {"dtype", "shape"}}``, what ``meta.json`` declares), the header must
    describe exactly those tensors before any tensor memory is allocated.

    Raises:
        Malformed: a header that does not describe the file, or a file shorter than ``size``;
            the rest of the file was added to ``checksum`` first.

    Example:
        >>> import io, torch
        >>> from fnloop.checkpoint import _safetensors
        >>> f = io.BytesIO(); n = _safetensors.write(f, {"a": torch.arange(2), "b": torch.ones(1)})
        >>> sorted(read_tensors(io.BytesIO(f.getvalue()).readinto, n, "mem"))
        ['a', 'b']
    """
    source = _Source(readinto, checksum, where, size)
    try:
        prefix = bytearray(min(8, size))
        source.exact(memoryview(prefix), size)
        n = header_length(bytes(prefix), size, where)
        raw = bytearray(n)
        source.exact(memoryview(raw), size)
        spans = layout(bytes(raw), size - 8 - n, where)
        if want is not None:
            _agree(spans, want, where)
        groups = [(group, *_buffer(group[-1][1] - group[0][0], where)) for group in _groups(spans)]
        mapper = _Prefaulter([buf for _, buf, _ in groups])
        try:
            total = sum(len(view) for _, _, view in groups)
            if fd is not None and total >= _pread.MIN_BYTES and _pread.supported():
                source.position += _pread.read_region(fd, source.position, [view for _, _, view in groups], checksum, where)
            else:
                for _, _, view in groups:
                    source.exact(view, size)
            out: dict[str, Any] = {}
            for group, buf, _ in groups:
                out.update(views(buf, group, -group[0][0]))
            return out
        finally:
            mapper.close()
    except Malformed:
        source.drain()
        raise
