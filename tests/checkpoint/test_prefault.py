"""Large read buffers have their pages mapped before the read fills them (one system call
instead of a page fault per page); that never changes what is read."""

from __future__ import annotations

import ctypes
import mmap
import sys

import pytest
import torch

from fnloop.checkpoint import _stream, restore, save


def test_large_tensors_restore_bitwise_into_prefaulted_memory(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {"big": torch.randn(3 * _stream.PREFAULT // 4 + 123, generator=gen), "small": torch.arange(10)}
    url = save(state, str(tmp_path / "ckpt"))
    for verify in (True, False):
        back = restore(url, like=state, verify=verify)
        assert torch.equal(back["big"], state["big"]) and torch.equal(back["small"], state["small"])


def _populate_supported() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    release = tuple(int(x) for x in __import__("platform").release().split("-")[0].split(".")[:2])
    return release >= (5, 14)


def _resident_pages(address: int, n: int) -> int:
    """How many of the pages of ``[address, address + n)`` are in memory (``mincore``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    begin = address // page * page
    pages = -(-(address + n - begin) // page)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(begin, pages * page, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec)


@pytest.mark.skipif(not _populate_supported(), reason="MADV_POPULATE_WRITE needs Linux 5.14 or later")
def test_the_prefault_thread_maps_every_page_of_large_buffers():
    n = 64 << 20
    region = mmap.mmap(-1, n)  # a fresh anonymous mapping: no page mapped yet, whatever the allocator holds
    big = torch.frombuffer(region, dtype=torch.uint8)
    small = torch.empty(1 << 16, dtype=torch.uint8)
    pages = -(-n // mmap.PAGESIZE)
    assert _resident_pages(big.data_ptr(), n) < pages // 2  # the check below can fail
    mapper = _stream._Prefaulter([small, big])
    assert mapper._thread is not None
    mapper._thread.join(timeout=60)
    mapper.close()
    assert _resident_pages(big.data_ptr(), n) >= pages - 1
    del big
    region.close()


@pytest.mark.parametrize("thread", ["maps nothing", "maps as usual"])
def test_reads_are_right_however_far_the_thread_got(tmp_path, monkeypatch, thread):
    gen = torch.Generator().manual_seed(1)
    state = {f"t{i}": torch.randn(3 << 20, generator=gen) for i in range(3)}
    url = save(state, str(tmp_path / "ckpt"))
    if thread == "maps nothing":
        monkeypatch.setattr(_stream._Prefaulter, "_run", lambda self: None)
    for verify in (True, False):
        back = restore(url, like=state, verify=verify)
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_odd_ranges_are_left_alone():
    _stream.prefault(1, 10)  # no whole page inside: nothing is asked
    buf = torch.zeros(_stream.PREFAULT + 7, dtype=torch.uint8)
    _stream.prefault(buf.data_ptr() + 3, buf.numel() - 3)
    assert int(buf.sum()) == 0  # mapping pages that hold data keeps the data
