"""Pages of memory and of files: mapping a read buffer's pages ahead of the read, asking which
pages are in memory (``mincore``). Linux only; elsewhere every question is answered so that
callers do what they would do without asking.

Example:
    >>> import torch
    >>> buf = torch.ones(1 << 20, dtype=torch.uint8)
    >>> resident(buf.data_ptr(), buf.numel())  # written just now: every page is mapped
    True
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Any

__all__ = ["prefault", "resident", "file_cached", "libc"]

_MADV_POPULATE_WRITE = 23
_LIBC: list[Any] = []


def prefault(address: int, n: int) -> None:
    """``madvise(MADV_POPULATE_WRITE)`` on the whole pages of ``[address, address + n)``: the
    kernel maps them all at once (Linux 5.14 and later; nothing elsewhere). The memory and its
    contents are the same either way: the read that follows writes every byte.

    (Transparent huge pages were measured too: faster on memory the system has handed out
    before, but up to twice as slow where a virtual machine's host reclaims freed memory.)
    """
    c = libc()
    begin, end = _whole_pages(address, n)
    if c is not None and end > begin:
        c.madvise(begin, end - begin, _MADV_POPULATE_WRITE)  # EINVAL on older kernels: faults as before


def resident(address: int, n: int) -> bool:
    """Every whole page of ``[address, address + n)`` is mapped (``mincore``)."""
    begin, end = _whole_pages(address, n)
    if libc() is None or end <= begin:
        return True
    return _in_memory(begin, end - begin)


def _in_memory(begin: int, length: int) -> bool:
    """``mincore`` says every page of ``[begin, begin + length)`` is in memory (``begin`` on a page)."""
    vec = ctypes.create_string_buffer(-(-length // mmap.PAGESIZE))
    if libc().mincore(begin, length, vec) != 0:
        return False
    return b"\x00" not in vec.raw


def _whole_pages(address: int, n: int) -> tuple[int, int]:
    """``(begin, end)`` of the whole pages inside ``[address, address + n)``."""
    page = mmap.PAGESIZE
    return -(-address // page) * page, (address + n) // page * page


def libc() -> Any:
    """The C library with ``madvise`` (Linux); None elsewhere."""
    if not _LIBC:
        found = None
        if sys.platform.startswith("linux"):
            try:
                found = ctypes.CDLL(None, use_errno=True)
                found.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                found.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
            except (OSError, AttributeError):
                found = None
        _LIBC.append(found)
    return _LIBC[0]


def file_cached(fd: int, offset: int, n: int) -> bool:
    """Every page of bytes ``[offset, offset + n)`` of the file ``fd`` is in the page cache: a
    read of them would not wait for the disk. Asked through ``mincore`` on a mapping of the
    range, which reads nothing (a read with ``RWF_NOWAIT`` that fails starts the disk reading
    there). False where it cannot be told.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "f")
        >>> with open(path, "wb") as f: _ = f.write(b"x" * 10000)
        >>> fd = os.open(path, os.O_RDONLY); cached = file_cached(fd, 0, 10000); os.close(fd)
        >>> cached  # just written
        True
    """
    if libc() is None or n <= 0:
        return False
    begin = offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    length = offset + n - begin
    try:
        mapping = mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=begin)  # private, never written: nothing read
    except (OSError, ValueError):
        return False
    try:
        anchor = ctypes.c_char.from_buffer(mapping)
        try:
            return _in_memory(ctypes.addressof(anchor), length)
        finally:
            del anchor
    finally:
        mapping.close()
