"""Large read buffers ask for transparent huge pages (fewer page faults while the read fills
them); the hint never changes what is read."""

from __future__ import annotations

import sys

import pytest
import torch

from fnloop.checkpoint import _stream, restore, save


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                begin, end = (int(x, 16) for x in head.split("-"))
                inside = begin <= address < end
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")]


def test_large_tensors_restore_bitwise_into_advised_memory(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {"big": torch.randn(3 * _stream.HUGE // 4 + 123, generator=gen), "small": torch.arange(10)}
    url = save(state, str(tmp_path / "ckpt"))
    for verify in (True, False):
        back = restore(url, like=state, verify=verify)
        assert torch.equal(back["big"], state["big"]) and torch.equal(back["small"], state["small"])


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() != "madvise", reason="needs Linux with THP set to madvise")
def test_a_large_buffer_is_advised_for_huge_pages():
    buf, view = _stream._buffer(_stream.HUGE * 2, "test")
    middle = buf.data_ptr() + _stream.HUGE
    assert "hg" in _vm_flags(middle)
    small, _ = _stream._buffer(1 << 16, "test")
    assert len(view) == _stream.HUGE * 2 and small.numel() == 1 << 16


def test_the_hint_is_a_no_op_on_odd_ranges():
    _stream.huge_pages(1, 10)  # no whole page inside: nothing is asked
    buf = torch.zeros(_stream.HUGE + 7, dtype=torch.uint8)
    _stream.huge_pages(buf.data_ptr() + 3, buf.numel() - 3)
    assert int(buf.sum()) == 0
