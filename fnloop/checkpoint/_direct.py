"""Writing a large local file at the disk's speed: ``O_DIRECT`` through a few aligned staging buffers.

The caller's bytes are copied into page-aligned buffers of ``buffer_size`` bytes; a worker
thread writes each full buffer with ``pwrite`` while the caller fills the next one. Direct
I/O skips the page cache, so the data does not wait for a writeback at ``fsync`` and no
cached copy of the file is left behind. The extra memory is ``buffers * buffer_size``.
The last partial buffer is written padded to the block size and the file is truncated back
to its length. A filesystem that refuses direct I/O (tmpfs, some network filesystems) gets
buffered writes through the same buffers; the file is fsynced in either case.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.bin")
    >>> with direct_file(path) as f:
    ...     _ = f.write(b"abc" * 1000)
    >>> os.path.getsize(path)
    3000
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["BLOCK", "BUFFER_SIZE", "BUFFERS", "available", "direct_file"]

BLOCK = 4096
"""Offsets and lengths of direct writes are multiples of this (every common block size divides it)."""
BUFFER_SIZE = 2 << 20
BUFFERS = 2
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def available() -> bool:
    """Whether this platform has ``O_DIRECT`` (Linux and most BSDs; not macOS or Windows).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return bool(_O_DIRECT)


class DirectWriter:
    """A write-only file fed through aligned staging buffers; one ``pwrite`` in flight per buffer."""

    def __init__(self, fd: int, buffer_size: int, buffers: int) -> None:
        size = max(BLOCK, buffer_size // BLOCK * BLOCK)
        self._fd = fd
        self._maps = [mmap.mmap(-1, size) for _ in range(max(2, buffers))]
        self._views = [memoryview(m) for m in self._maps]
        self._pending: list[Future[None] | None] = [None] * len(self._maps)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fnloop-direct-write")
        self._size = size
        self._current = 0
        self._filled = 0
        self._offset = 0  # file offset of the current buffer

    def write(self, data: Any) -> int:
        """Copy ``data`` (bytes-like) into the staging buffers; full buffers go to the disk."""
        src = memoryview(data).cast("B")
        n = len(src)
        done = 0
        while done < n:
            view = self._views[self._current]
            take = min(n - done, self._size - self._filled)
            view[self._filled : self._filled + take] = src[done : done + take]
            self._filled += take
            done += take
            if self._filled == self._size:
                self._flush(self._size)
        return n

    def _flush(self, length: int) -> None:
        i = self._current
        self._pending[i] = self._pool.submit(self._pwrite, self._views[i][:length], self._offset)
        self._offset += length
        self._current = (i + 1) % len(self._maps)
        self._filled = 0
        waiting = self._pending[self._current]
        if waiting is not None:  # the next buffer is free once its write is done
            self._pending[self._current] = None
            waiting.result()

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while len(view):
            try:
                written = os.pwrite(self._fd, view, offset)
            except OSError as e:
                if e.errno != errno.EINVAL or not self._buffered():
                    raise
                continue
            view, offset = view[written:], offset + written

    def _buffered(self) -> bool:
        """Turn direct I/O off for this file (the filesystem refused a direct write); False if it was off."""
        import fcntl

        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        if not flags & _O_DIRECT:
            return False
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
        return True

    def finish(self) -> int:
        """Write what is left, set the file's length and fsync it; return the length."""
        length = self._offset + self._filled
        tail = self._filled
        if tail:
            padded = -(-tail // BLOCK) * BLOCK
            self._views[self._current][tail:padded] = bytes(padded - tail)
            self._flush(padded)
        self._wait()
        os.ftruncate(self._fd, length)
        os.fsync(self._fd)
        return length

    def _wait(self) -> None:
        pending, self._pending = self._pending, [None] * len(self._maps)
        for future in pending:
            if future is not None:
                future.result()

    def close(self) -> None:
        """Stop the worker (after the writes in flight) and free the buffers."""
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
            for view, m in zip(self._views, self._maps):
                with contextlib.suppress(BufferError):  # a traceback may still hold a slice: freed with it
                    view.release()
                    m.close()


@contextlib.contextmanager
def direct_file(path: str, *, buffer_size: int = BUFFER_SIZE, buffers: int = BUFFERS) -> Iterator[DirectWriter]:
    """Create the local file ``path`` for writing through direct I/O; it is fsynced when the block exits normally.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "y.bin")
        >>> with direct_file(path, buffer_size=4096) as f:
        ...     _ = f.write(bytes(10_000))
        >>> os.path.getsize(path)
        10000
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | _O_DIRECT, 0o666)
    except OSError as e:
        if e.errno != errno.EINVAL or not _O_DIRECT:
            raise
        fd = os.open(path, flags, 0o666)  # no direct I/O on this filesystem
    try:
        writer = DirectWriter(fd, buffer_size, buffers)
        try:
            yield writer
            writer.finish()
        finally:
            writer.close()
    finally:
        os.close(fd)
