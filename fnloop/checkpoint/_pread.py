"""Reading the tensor bytes of a local checkpoint file on two threads while the page cache holds them.

A warm restore is a copy out of the page cache (about 5 GB/s on one core) plus, when verified,
the checksum (XXH3, about 10 GB/s). One thread doing both leaves the second core idle, so the
region of a file that holds the tensors is cut into ``CHUNK`` byte chunks and shared:

* the caller's thread reads chunks in file order with ordinary blocking ``pread`` calls, so a
  cold file is still read sequentially (the kernel's read-ahead sees one stream);
* a helper thread hashes the chunks in file order as soon as they are filled, and in between
  copies the next unclaimed chunk itself if the page cache holds it (``mincore``; the read
  itself with ``RWF_NOWAIT``, which the kernel refuses rather than wait for the disk). At the
  first chunk it may not copy, the helper gives the chunk back and only hashes from then on
  (a cold file).

Warm, the copy runs on both cores and the hash beside it: measured on a 2-vCPU VM, a 100 MiB
region took 11-12 ms without the checksum and 19 ms with it, where one reader took 20 ms and
one reader with a hashing thread 24 ms. Cold, the reads are the single stream they were, in
fewer and longer calls.

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "f")
    >>> with open(path, "wb") as f: _ = f.write(bytes(range(10)))
    >>> dest = torch.zeros(6, dtype=torch.uint8)
    >>> fd = os.open(path, os.O_RDONLY)
    >>> read_region(fd, 2, [memoryview(dest.numpy())], None, path, chunk=4)
    6
    >>> os.close(fd); dest.tolist()
    [2, 3, 4, 5, 6, 7]
"""

from __future__ import annotations

import os
import threading

from fnloop.checkpoint import _pages
from fnloop.checkpoint._checksum import Checksum
from fnloop.checkpoint._safetensors import Malformed

__all__ = ["CHUNK", "MIN_BYTES", "supported", "read_region"]

CHUNK = 8 << 20
"""Bytes per chunk the two threads share out."""
RUN_CHECKED = 16 << 20
"""Most bytes per read of the caller's thread on a cold file, checksummed."""
RUN_UNCHECKED = 64 << 20
"""Most bytes per read of the caller's thread on a cold file, without a checksum."""
MIN_BYTES = 16 << 20
"""Regions smaller than this are read by the caller alone (a thread costs more than it saves)."""
_MAX_BUFFERS = 512  # buffers per preadv call (the kernel takes up to IOV_MAX, 1024 on Linux)


def supported() -> bool:
    """Whether this platform has positioned vector reads with ``RWF_NOWAIT`` (Linux)."""
    return hasattr(os, "preadv") and hasattr(os, "RWF_NOWAIT")


class _Shared:
    """The chunks and who does what, guarded by one condition variable."""

    def __init__(self, chunks: list[tuple[int, memoryview]], checksum: Checksum | None) -> None:
        self.chunks = chunks
        self.checksum = checksum
        self.cv = threading.Condition()
        self.next = 0  # first chunk nobody has claimed
        self.back: list[int] = []  # chunks the helper claimed and gave back
        self.done = [False] * len(chunks)
        self.hashed = 0  # chunks added to the checksum, in file order
        self.copying = True  # the helper still copies (no refusal yet)
        self.in_flight = False  # the helper holds a claimed chunk
        self.ended = False  # the caller's thread has stopped reading
        self.error: BaseException | None = None

    def claim_run(self, most: int) -> list[int]:
        """A given-back chunk, or up to ``most`` consecutive unclaimed ones."""
        if self.back:
            return [self.back.pop()]
        run = list(range(self.next, min(self.next + most, len(self.chunks))))
        self.next += len(run)
        return run

    def hashable(self) -> bool:
        return self.checksum is not None and self.hashed < len(self.chunks) and self.done[self.hashed]


def _help(fd: int, s: _Shared) -> None:
    """The helper thread: hash filled chunks in order; meanwhile copy chunks the page cache holds."""
    try:
        while True:
            with s.cv:
                while True:
                    if s.hashable():
                        job, i = "hash", s.hashed
                        break
                    claimed = s.claim_run(1) if s.copying and not s.ended else []
                    if claimed:
                        job, i = "copy", claimed[0]
                        s.in_flight = True
                        break
                    if s.checksum is None or s.hashed >= len(s.chunks) or s.ended:
                        return
                    s.cv.wait()
            offset, view = s.chunks[i]
            if job == "hash":
                s.checksum.update_here(view)  # type: ignore[union-attr]
                with s.cv:
                    s.hashed += 1
                continue
            got = 0
            if _pages.file_cached(fd, offset, len(view)):  # asking reads nothing; a refused read starts the disk there
                try:  # and should a page leave the cache meanwhile, the kernel refuses rather than wait
                    got = os.preadv(fd, [view], offset, os.RWF_NOWAIT)
                except OSError:  # EAGAIN (or a filesystem without RWF_NOWAIT)
                    got = 0
            with s.cv:
                s.in_flight = False
                if got == len(view):
                    s.done[i] = True
                else:  # the caller's thread reads it, whole
                    s.back.append(i)
                    s.copying = False
                s.cv.notify_all()
    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
        with s.cv:
            s.error, s.copying, s.in_flight = e, False, False
            s.cv.notify_all()


def _fill(fd: int, offset: int, views: list[memoryview]) -> int:
    """Read ``views`` (consecutive in the file) from ``offset``, in one call where the kernel
    allows; return the bytes read (fewer than the views hold: the file ended)."""
    filled, total = 0, sum(len(v) for v in views)
    while filled < total:
        rest, skip = [], filled
        for v in views:
            if skip < len(v):
                rest.append(v[skip:])
            skip = max(0, skip - len(v))
        got = os.preadv(fd, rest, offset + filled)
        if got <= 0:
            break
        filled += got
    return filled


def read_region(
    fd: int, offset: int, views: list[memoryview], checksum: Checksum | None, where: str, *, chunk: int = CHUNK
) -> int:
    """Fill ``views`` (consecutive in the file from ``offset``) from ``fd``, adding every byte to
    ``checksum`` in file order; return the bytes read.

    Raises:
        Malformed: the file ended before the last view was filled (the chunks before the
            shortfall have been added to ``checksum``).
    """
    chunks: list[tuple[int, memoryview]] = []
    at = offset
    for view in views:
        for start in range(0, len(view), chunk):
            piece = view[start : start + chunk]
            chunks.append((at + start, piece))
        at += len(view)
    s = _Shared(chunks, checksum)
    # Where the page cache lacks the last chunk (the one farthest from any read-ahead), the file
    # is taken as cold: the helper copies nothing, and the caller reads fewer, larger runs of
    # chunks, which the disk streams faster (100 MiB cold: 8 MiB reads 65-69 ms, one read
    # 61-63 ms); with a checksum, runs short enough that little hashing is left after the last.
    s.copying = bool(chunks) and _pages.file_cached(fd, chunks[-1][0], len(chunks[-1][1]))
    longest = min(max(1, (RUN_CHECKED if checksum is not None else RUN_UNCHECKED) // chunk), _MAX_BUFFERS)
    run = s.claim_run(1 if s.copying else longest)  # the first chunk is the caller's: a file is read in order from its start
    helper = threading.Thread(target=_help, args=(fd, s), name="fnloop-read", daemon=True)
    if s.copying or checksum is not None:
        helper.start()
    short: int | None = None
    try:
        while run:
            start = s.chunks[run[0]][0]
            pieces = [s.chunks[i][1] for i in run]
            got = _fill(fd, start, pieces)
            with s.cv:
                for i in run:  # the chunks filled whole
                    s.done[i] = s.chunks[i][0] + len(s.chunks[i][1]) <= start + got
                s.cv.notify_all()
            if got < sum(len(v) for v in pieces):
                short = start + got
                break
            with s.cv:
                run = s.claim_run(1 if s.copying else longest)
                while not run and s.in_flight:  # the helper may yet give its chunk back
                    s.cv.wait()
                    run = s.claim_run(1)
    finally:
        with s.cv:
            s.ended = True
            s.cv.notify_all()
        if helper.ident is not None:
            helper.join()
    if s.error is not None:
        raise s.error
    if checksum is not None:  # what the helper left: it stops at the first chunk not filled
        while s.hashed < len(chunks) and s.done[s.hashed]:
            checksum.update_here(chunks[s.hashed][1])
            s.hashed += 1
    if short is not None:
        raise Malformed(f"{where}: the file ended at byte {short}, before the {at} its header declares; it is truncated or corrupt")
    return at - offset
