"""Durable local writes: bytes reach the disk while they are still being produced.

Example:
    >>> import os, tempfile
    >>> from fnloop.checkpoint._durable import durable_file
    >>> path = os.path.join(tempfile.mkdtemp(), "x.bin")
    >>> with durable_file(path) as f:
    ...     _ = f.write(b"abc")
    >>> os.path.getsize(path)
    3
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

__all__ = ["SYNC_EVERY", "durable_file"]

SYNC_EVERY = 32 << 20
"""A durable local write starts flushing to disk each time this many bytes were written."""


class _DurableWriter:
    """A write-only file that flushes to disk in the background while the caller keeps writing."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._unsynced = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        self._unsynced += memoryview(data).nbytes
        if self._unsynced >= SYNC_EVERY and (self._pending is None or self._pending.done()):
            self._unsynced = 0
            if self._pending is not None:
                self._pending.result()
            self._f.flush()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="fnloop-fsync")
            self._pending = self._pool.submit(getattr(os, "fdatasync", os.fsync), self._f.fileno())
        return n

    def finish(self) -> None:
        """Wait for the background flush, then fsync everything."""
        self._f.flush()
        if self._pending is not None:
            self._pending.result()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


@contextlib.contextmanager
def durable_file(path: str) -> Iterator[_DurableWriter]:
    """Open a new local file for writing; it is on disk (fsynced) when the block exits normally.

    Writeback starts every ``SYNC_EVERY`` bytes on a worker thread, so the disk works while
    the caller is still producing bytes and the final fsync has little left to do.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> with durable_file(path) as f:
        ...     _ = f.write(b"data")
        >>> os.path.getsize(path)
        4
    """
    with open(path, "wb") as f:
        writer = _DurableWriter(f)
        try:
            yield writer
            writer.finish()
        finally:
            writer.close()
