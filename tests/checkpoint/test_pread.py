"""The two-thread reader of a local file's tensor bytes: same bytes and same checksum as one
sequential reader, whatever the page cache holds; a short file and a failing helper surface."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from fnloop.checkpoint import _pages, _pread, restore, save
from fnloop.checkpoint._checksum import Checksum
from fnloop.checkpoint._safetensors import Malformed
from fnloop.errors import CheckpointError

pytestmark = pytest.mark.skipif(not _pread.supported(), reason="needs preadv with RWF_NOWAIT (Linux)")


def _file(tmp_path, n: int, seed: int = 0) -> tuple[str, bytes]:
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()
    path = str(tmp_path / f"blob-{n}-{seed}")
    with open(path, "wb") as f:
        f.write(data)
    return path, data


def _read(path: str, offset: int, sizes: list[int], chunk: int, checksum: Checksum | None) -> tuple[list[bytes], int]:
    dest = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    fd = os.open(path, os.O_RDONLY)
    try:
        n = _pread.read_region(fd, offset, [memoryview(d.numpy()) for d in dest], checksum, path, chunk=chunk)
    finally:
        os.close(fd)
    return [d.numpy().tobytes() for d in dest], n


def _digest(data: bytes) -> str:
    return f"xxh3_128:{xxhash.xxh3_128(data).hexdigest()}"


@settings(max_examples=25, deadline=None)
@given(
    offset=st.integers(0, 64),
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=5),
    chunk=st.integers(1, 700),
    verify=st.booleans(),
    refuse_after=st.sampled_from([None, 0, 2]),
    cold=st.booleans(),
)
def test_same_bytes_and_checksum_as_one_sequential_read(tmp_path_factory, offset, sizes, chunk, verify, refuse_after, cold):
    """Warm, refused by the page cache after a few chunks, or taken as cold from the start."""
    path, data = _file(tmp_path_factory.mktemp("pread"), offset + sum(sizes))
    checksum = Checksum() if verify else None
    with (
        mock.patch.object(os, "preadv", _refusing(refuse_after)[0] if refuse_after is not None else os.preadv),
        mock.patch.object(_pages, "file_cached", (lambda *a: False) if cold else _pages.file_cached),
    ):
        got, n = _read(path, offset, sizes, chunk, checksum)
    assert n == sum(sizes)
    assert b"".join(got) == data[offset:]
    if verify:
        assert checksum.digest() == _digest(data[offset:])


def _refusing(after: int):
    """``os.preadv`` whose RWF_NOWAIT calls succeed ``after`` times, then refuse (a cold file)."""
    real, count = os.preadv, [0, 0]  # copies tried by the helper; blocking reads after its refusal

    def preadv(fd, buffers, offset, flags=0):
        if flags & os.RWF_NOWAIT:
            count[0] += 1
            if count[0] > after:
                raise BlockingIOError(11, "Resource temporarily unavailable")
        elif count[0] > after:
            count[1] += 1
        return real(fd, buffers, offset, flags)

    return preadv, count


@pytest.mark.parametrize("after", [0, 1, 3])
def test_a_helper_refused_by_the_page_cache_hands_its_chunk_back(tmp_path, monkeypatch, after):
    path, data = _file(tmp_path, 10_000)
    preadv, count = _refusing(after)
    monkeypatch.setattr(os, "preadv", preadv)
    checksum = Checksum()
    got, _ = _read(path, 0, [4000, 6000], 512, checksum)
    assert b"".join(got) == data
    assert checksum.digest() == _digest(data)
    assert count[0] <= after + 1  # no copy tried after the first refusal
    assert count[1] <= 3  # then the caller's thread reads the rest in runs of chunks, not chunk by chunk


@pytest.mark.parametrize("verify", [True, False])
def test_a_cold_file_is_read_in_order_in_long_runs_and_never_copied_by_the_helper(tmp_path, monkeypatch, verify):
    path, data = _file(tmp_path, 40_000)
    preadv = _refusing(0)[0]
    calls = []
    monkeypatch.setattr(os, "preadv", lambda fd, b, o, flags=0: (calls.append((o, flags)), preadv(fd, b, o, flags))[1])
    monkeypatch.setattr(_pages, "file_cached", lambda *a: False)
    monkeypatch.setattr(_pread, "RUN_CHECKED", 8 * 1024)
    monkeypatch.setattr(_pread, "RUN_UNCHECKED", 16 * 1024)
    checksum = Checksum() if verify else None
    got, _ = _read(path, 0, [10_000, 30_000], 1024, checksum)
    assert b"".join(got) == data
    assert all(flags == 0 for _, flags in calls)  # nothing tried with RWF_NOWAIT
    offsets = [o for o, _ in calls]
    assert offsets == sorted(offsets)  # one stream, from the start
    assert len(calls) == -(-40 // (8 if verify else 16))  # runs of 8 or 16 chunks of 1 KiB (the last shorter)
    if verify:
        assert checksum.digest() == _digest(data)


def test_a_file_shorter_than_its_views_is_malformed_and_the_prefix_hashed(tmp_path):
    path, data = _file(tmp_path, 5000)
    checksum = Checksum()
    with pytest.raises(Malformed, match="the file ended at byte 5000, before the 6000 its header declares"):
        _read(path, 0, [3000, 3000], 1024, checksum)
    assert checksum.digest() == _digest(data[:4024])  # the chunks before the shortfall, in order


def test_an_error_on_the_helper_thread_reaches_the_caller(tmp_path):
    path, _ = _file(tmp_path, 4096)

    class Broken(Checksum):
        def update_here(self, chunk):
            raise RuntimeError("hash failed")

    with pytest.raises(RuntimeError, match="hash failed"):
        _read(path, 0, [4096], 256, Broken())


def _drop(path: str) -> None:
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_restore_of_a_large_checkpoint_warm_and_cold(tmp_path, cache):
    gen = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(3 << 20, generator=gen), "b": torch.randint(0, 9, (100,), generator=gen), "c": torch.randn(2 << 20, generator=gen)}
    url = save(state, str(tmp_path / "ckpt"))
    for verify in (True, False):
        if cache == "cold":
            _drop(url)
        out = restore(url, like={k: torch.empty_like(v) for k, v in state.items()}, verify=verify)
        assert all(torch.equal(out[k], state[k]) for k in state)


def test_a_flipped_byte_in_a_large_file_is_caught(tmp_path):
    state = {"w": torch.randn(5 << 20, generator=torch.Generator().manual_seed(2))}
    url = save(state, str(tmp_path / "ckpt"))
    path = os.path.join(url, "state.safetensors")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - (7 << 20))  # inside the data, several chunks in
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        restore(url, like={"w": torch.empty(5 << 20)})
