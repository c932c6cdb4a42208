"""The direct-I/O writer of local tensor files: exact bytes at every length, and the fallbacks
where a filesystem refuses ``O_DIRECT`` (at open, or at the first write)."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from fnloop.checkpoint import _direct, restore, save

LENGTHS = [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 17]


def _payload(n: int) -> bytes:
    return bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8).numpy())


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("piece", [1000, 4096, 10_000])
def test_exact_bytes_through_small_buffers(tmp_path, length, piece):
    data = _payload(length)
    path = str(tmp_path / "f.bin")
    with _direct.direct_file(path, buffer_size=4096, buffers=2) as f:
        for start in range(0, length, piece):
            f.write(data[start : start + piece])
    with open(path, "rb") as f:
        assert f.read() == data


def test_a_filesystem_without_direct_io_gets_buffered_writes(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & _direct._O_DIRECT:
            fd = real_open(path, flags & ~_direct._O_DIRECT, *args)  # Linux creates the file, then refuses
            os.close(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    if not _direct.available():
        pytest.skip("no O_DIRECT on this platform")
    monkeypatch.setattr(os, "open", refuse_direct)
    state = {"w": torch.randn(3000), "n": torch.arange(7)}
    url = save(state, str(tmp_path / "ck"))
    out = restore(url, like=state)
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_a_refused_direct_write_turns_direct_io_off_and_continues(tmp_path, monkeypatch):
    if not _direct.available():
        pytest.skip("no O_DIRECT on this platform")
    import fcntl

    real_pwrite = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & _direct._O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = _payload(3 * 4096 + 5)
    path = str(tmp_path / "g.bin")
    with _direct.direct_file(path, buffer_size=4096) as f:
        f.write(data)
    assert refused == [0]
    with open(path, "rb") as f:
        assert f.read() == data


def test_other_write_errors_propagate_and_free_the_buffers(tmp_path, monkeypatch):
    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError, match="No space left"):
        with _direct.direct_file(str(tmp_path / "h.bin"), buffer_size=4096) as f:
            f.write(bytes(5 * 4096))
