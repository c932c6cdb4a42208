"""Reads are bounded by what the metadata declares: sparse or huge files, deep JSON, special
files and one damaged checkpoint among good ones end in named errors or warnings, fast."""

from __future__ import annotations

import os
import resource

import pytest
import torch

import fnloop as fl
from fnloop import registry
from fnloop.checkpoint import CheckpointManager, _read, restore, save
from fnloop.errors import CheckpointError
from scenarios import REPO, cli, deep_json, read_meta_json, small_state, within, write_meta_json


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("size", [4 << 30, 1 << 40])
def test_sparse_huge_state_file_is_refused_before_reading(tmp_path, size):
    url = save(small_state(), str(tmp_path / "ck"))
    with open(tmp_path / "ck" / "state.safetensors", "r+b") as f:
        f.truncate(size)
    before = _max_rss_mb()
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        restore(url, like=small_state())
    meta = read_meta_json(url)
    del meta["state_bytes"]  # a consistent meta.json that does not record the size: still bounded by the leaves
    write_meta_json(url, meta)
    with pytest.raises(CheckpointError, match="tensors meta.json declares"):
        restore(url, like=small_state())
    assert _max_rss_mb() - before < 256


def test_declared_tensor_larger_than_the_file_is_refused_before_allocating(tmp_path):
    url = save({"w": torch.zeros(4)}, str(tmp_path / "ck"))
    meta = read_meta_json(url)
    meta["leaves"][0]["shape"] = [1 << 40]
    write_meta_json(url, meta)
    with pytest.raises(CheckpointError, match="state.safetensors"):
        restore(url)


def test_allocation_failure_is_a_named_error(tmp_path, monkeypatch):
    url = save({"w": torch.zeros(4)}, str(tmp_path / "ck"))

    def no_memory(n, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(torch, "empty", no_memory)
    with pytest.raises(CheckpointError, match="cannot allocate"):
        restore(url)


@pytest.mark.parametrize("where", ["meta.json", "index.json"])
def test_deeply_nested_json_is_a_named_error(tmp_path, where):
    root = str(tmp_path / "reg")
    registry.publish({"w": torch.ones(1)}, root, "m")
    if where == "meta.json":
        (tmp_path / "reg" / "m" / "v1" / "meta.json").write_bytes(deep_json(100_000))
        with pytest.raises(CheckpointError, match="nested too deeply"):
            registry.load(root, "m")
    else:
        (tmp_path / "reg" / "m" / "index.json").write_bytes(deep_json(100_000))
        with pytest.raises(CheckpointError, match="nested too deeply"):
            registry.versions(root, "m")


def test_deep_callback_state_is_a_named_error(tmp_path):
    url = save(small_state(), str(tmp_path / "ck"))
    meta = read_meta_json(url)
    for entry in meta["leaves"]:
        if entry["path"] == "loop/status":
            entry.update(value=deep_json(100_000).decode(), type="callbacks")
    write_meta_json(url, meta)
    with pytest.raises(CheckpointError, match="malformed leaf entry"):
        restore(url, like=small_state())


def test_oversized_meta_json_is_refused_unparsed(tmp_path, monkeypatch):
    url = save(small_state(), str(tmp_path / "ck"))
    monkeypatch.setattr(_read, "MAX_META", 1000)
    with pytest.raises(CheckpointError, match="larger than 1000 bytes"):
        restore(url, like=small_state())


@pytest.mark.parametrize("name", ["meta.json", "state.safetensors"])
def test_fifo_in_place_of_a_checkpoint_file_does_not_block(tmp_path, name):
    url = save(small_state(), str(tmp_path / "ck"))
    os.unlink(tmp_path / "ck" / name)
    os.mkfifo(tmp_path / "ck" / name)
    with pytest.raises(CheckpointError, match="FIFO"):
        within(lambda: restore(url, like=small_state()))


def test_one_damaged_checkpoint_does_not_break_the_manager(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2, monitor="loss")
    for step in (1, 2, 3):
        mgr.save({"w": torch.full((2,), float(step))}, step=step, metrics={"loss": 1.0 / step})
    (tmp_path / "ckpt" / "step-00000003" / "meta.json").write_bytes(deep_json(100_000))
    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2, monitor="loss")
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint"):
        assert mgr.best().endswith("step-00000002")
    mgr.save({"w": torch.full((2,), 4.0)}, step=4, metrics={"loss": 0.1})  # pruning reads it once, warned above
    assert mgr.restore("best", like={"w": torch.zeros(2)})["w"].tolist() == [4.0, 4.0]
    mgr.close()


def test_damaged_checkpoint_in_cli_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    run = tmp_path / "runs" / "digits" / "version_0"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run / "checkpoints" / "step-00000001" / "meta.json").write_bytes(deep_json(100_000))
    args = ["test", "--config", str(REPO / "examples" / "digits.yaml"), "--ckpt_path", "last",
            "--trainer.default_root_dir", str(tmp_path / "runs")]
    code, err = cli(args, tmp_path, capsys, monkeypatch)
    assert code in (1, 2) and "Traceback" not in err and "nested too deeply" in err, err


def test_manager_listing_survives_a_fifo_sibling(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=1)
    mgr.save({"w": torch.ones(1)}, step=1)
    os.mkdir(tmp_path / "ckpt" / "step-00000002")
    os.mkfifo(tmp_path / "ckpt" / "step-00000002" / "meta.json")
    with pytest.warns(UserWarning, match="FIFO"):  # opened without blocking (see the test above)
        mgr.save({"w": torch.ones(1)}, step=3)
    assert fl.CheckpointManager(str(tmp_path / "ckpt")).latest().endswith("step-00000003")
