"""The integrity checksum of a tensor file, computed in chunks while the bytes are written or read.

Checkpoints record ``"<algorithm>:<hex digest>"``. New ones use XXH3-128 (``xxhash``), a
non-cryptographic hash that runs at memory speed; checkpoints of format 1 recorded a sha256,
which is still read. Either one detects torn writes, truncation and flipped bits; neither
protects against someone who can write the folder (they can rewrite ``meta.json`` too).

With ``parallel=True`` each chunk is hashed on a worker thread (both libraries release the
GIL), so hashing overlaps the caller's next read or write. :func:`for_stream` picks: while
writing, XXH3 is fastest inline, on small chunks still in the CPU cache from the copy that
just moved them; while reading a large file, on the worker thread, in 16 MiB chunks (large
reads are faster from disk; the reader makes its last ones smaller, so little hashing is left
after the last read); sha256, six times slower, always on the worker thread. A local file is
read by :mod:`fnloop.checkpoint._pread`, whose helper thread hashes it (:meth:`Checksum.update_here`).

Example:
    >>> c = Checksum("sha256"); c.update(b"abc"); c.digest()[:15]
    'sha256:ba7816bf'
    >>> split_digest(Checksum().digest())[0]
    'xxh3_128'
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import xxhash

__all__ = ["ALGORITHM", "ALGORITHMS", "INLINE_CHUNK", "PARALLEL_CHUNK", "PARALLEL_MIN", "Checksum", "for_stream", "split_digest"]

ALGORITHM = "xxh3_128"
"""The checksum of new checkpoints."""

ALGORITHMS: dict[str, tuple[Callable[[], Any], int]] = {
    "xxh3_128": (xxhash.xxh3_128, 32),
    "sha256": (hashlib.sha256, 64),
}
"""Every algorithm a checkpoint may record: its constructor and the length of its hex digest."""
PARALLEL_MIN = 32 << 20
"""A sha256 of a stream of this many bytes or more runs on a worker thread (and XXH3 while reading)."""
INLINE_CHUNK = 256 << 10
PARALLEL_CHUNK = 16 << 20


def split_digest(record: Any) -> tuple[str, str] | None:
    """``(algorithm, hex)`` of a recorded ``"<algorithm>:<hex>"``; None when it is malformed.

    Example:
        >>> split_digest("sha256:" + "0" * 64)[0], split_digest("md5:00")
        ('sha256', None)
    """
    if not isinstance(record, str):
        return None
    algorithm, _, hexdigest = record.partition(":")
    spec = ALGORITHMS.get(algorithm)
    if spec is None or len(hexdigest) != spec[1] or any(c not in "0123456789abcdef" for c in hexdigest):
        return None
    return algorithm, hexdigest


class Checksum:
    """A running checksum of a byte stream; with ``parallel=True`` chunks are hashed on a worker thread.

    The caller must keep a chunk unchanged until the next ``update`` or ``digest`` call, or,
    for a chunk passed with ``stable=True`` (memory nobody writes again, such as the tensor a
    file is read into), until ``digest``: such chunks queue up for the worker thread without
    the caller waiting for the one before.

    Example:
        >>> c = Checksum(parallel=True); c.update(b"ab"); c.update(b"c")
        >>> c.digest() == (lambda d: (d.update(b"abc"), d.digest())[1])(Checksum())
        True
    """

    def __init__(self, algorithm: str = ALGORITHM, *, parallel: bool = False) -> None:
        self.algorithm = algorithm
        self._hash = ALGORITHMS[algorithm][0]()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fnloop-checksum") if parallel else None
        self._pending: list[Future[None]] = []
        self.chunk = PARALLEL_CHUNK if parallel else INLINE_CHUNK
        """Bytes a reader hands over per ``update``: small enough inline to hash while still in
        the CPU cache; larger on a thread, where each hand-over costs a few microseconds."""

    def update(self, chunk: Any, *, stable: bool = False) -> None:
        """Add ``chunk`` (bytes-like) to the checksum (``stable``: see the class)."""
        if self._pool is None:
            self._hash.update(chunk)
            return
        if not stable:
            self._wait()
        self._pending.append(self._pool.submit(self._hash.update, chunk))  # one worker: hashed in order

    def update_here(self, chunk: Any) -> None:
        """Add ``chunk`` on the calling thread, after every chunk handed over before it."""
        self._wait()
        self._hash.update(chunk)

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def digest(self) -> str:
        """``"<algorithm>:<hex>"`` of everything added; ends the worker thread."""
        self.close()
        return f"{self.algorithm}:{self._hash.hexdigest()}"

    def close(self) -> None:
        """Wait for the last chunk and stop the worker thread."""
        self._wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def for_stream(algorithm: str, size: int, *, reading: bool = False) -> Checksum:
    """The checksum for a stream of ``size`` bytes: sha256 of a large stream on a thread; XXH3
    inline while writing, on a thread while reading a large file (the reads, copies out of the
    page cache, then run while the previous chunk is hashed: on two cores, in the time of the
    reads alone).

    Example:
        >>> for_stream("xxh3_128", 1 << 30)._pool is None, for_stream("sha256", 1 << 30)._pool is None
        (True, False)
        >>> for_stream("xxh3_128", 1 << 30, reading=True).chunk
        16777216
    """
    large = size >= PARALLEL_MIN
    return Checksum(algorithm, parallel=large and (algorithm == "sha256" or reading))
