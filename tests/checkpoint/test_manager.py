"""CheckpointManager: listing, keep policies, save triggers, async saves, restore shortcuts."""

from __future__ import annotations

import math
import os
import threading
import uuid

import fsspec
import pytest
import torch

import fnloop.checkpoint.manager as manager_module
from fnloop.checkpoint import CheckpointManager, read_meta, restore, save
from fnloop.checkpoint import _fs
from fnloop.errors import CheckpointError, ConfigError, FnloopError


@pytest.fixture(params=["memory", "local"])
def base(request, tmp_path):
    """A fresh directory URL on the memory filesystem or the local disk."""
    if request.param == "local":
        yield str(tmp_path / "runs")
        return
    name = f"/fnloop-mgr-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    memory = fsspec.filesystem("memory")
    if memory.exists(name):
        memory.rm(name, recursive=True)


def tree(step: int) -> dict:
    return {"w": torch.full((4, 3), float(step)), "n": torch.arange(3) * step, "loop": {"epoch": step // 10}}


def steps(mgr: CheckpointManager) -> list[int]:
    return [int(url.rsplit("-", 1)[1]) for url in mgr.all()]


def fill(mgr: CheckpointManager, step_metrics: dict[int, float | None]) -> None:
    for step, value in step_metrics.items():
        mgr.save(tree(step), step=step, metrics=None if value is None else {"loss": value})
    mgr.wait()


# --- keep policies ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, [1, 2, 3, 4, 5, 6]),
        ({"keep_last": 2}, [5, 6]),
        ({"keep_last": 1}, [6]),
        ({"keep_best": 2, "monitor": "loss"}, [2, 4, 6]),
        ({"keep_best": 2, "monitor": "loss", "mode": "max"}, [3, 5, 6]),
        ({"keep_every_n_steps": 3}, [3, 6]),
        ({"keep_every_n_steps": 4, "keep_last": 1}, [4, 6]),
        ({"keep_last": 1, "keep_best": 1, "monitor": "loss", "keep_every_n_steps": 5}, [2, 5, 6]),
    ],
)
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_keep_policies(base, options, expected, async_save):
    with CheckpointManager(base, async_save=async_save, **options) as mgr:
        fill(mgr, {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.2, 5: 0.8, 6: 0.4})
        assert steps(mgr) == expected


def test_keep_best_ignores_missing_and_nan_metrics_and_keeps_newest(base):
    with CheckpointManager(base, keep_best=1, monitor="loss") as mgr:
        fill(mgr, {1: 0.3, 2: math.nan, 3: None, 4: 0.7})
        assert steps(mgr) == [1, 4]
        assert mgr.best().endswith("step-00000001")
        fill(mgr, {5: None})
        assert steps(mgr) == [1, 5]


def test_best_ties_prefer_the_later_step_and_needs_monitor(base):
    with CheckpointManager(base, monitor="acc", mode="max") as mgr:
        assert mgr.best() is None
        for step, acc in [(1, 0.5), (2, 0.9), (3, 0.9), (4, 0.1)]:
            mgr.save(tree(step), step=step, metrics={"acc": torch.tensor(acc)})
        assert mgr.best().endswith("step-00000003")
    with pytest.raises(ConfigError, match="monitor"):
        CheckpointManager(base).best()


def test_a_lower_step_just_saved_is_not_pruned(base):
    with CheckpointManager(base, keep_last=1) as mgr:
        fill(mgr, {10: None})
        url = mgr.save(tree(3), step=3)
        assert steps(mgr) == [3, 10] and url in mgr.all()


# --- listing -------------------------------------------------------------------------
def test_all_and_latest_sort_by_step_and_skip_uncommitted(base):
    with CheckpointManager(base, filename="ckpt{step}") as mgr:
        assert mgr.latest() is None and mgr.all() == []
        for step in (9, 10, 100, 2):
            mgr.save(tree(step), step=step)
        fs, path = fsspec.core.url_to_fs(base)
        for folder in ("ckpt500", ".tmp-x-1-abc-ckpt600", "notes"):
            fs.makedirs(f"{path}/{folder}", exist_ok=True)
        fs.pipe_file(f"{path}/ckpt500/state.safetensors", b"partial")
        fs.pipe_file(f"{path}/.tmp-x-1-abc-ckpt600/meta.json", b"{}")
        fs.pipe_file(f"{path}/notes/meta.json", b"{}")
        assert [u.rsplit("/", 1)[1] for u in mgr.all()] == ["ckpt2", "ckpt9", "ckpt10", "ckpt100"]
        assert mgr.latest() == f"{base}/ckpt100"
        assert restore(mgr.latest(), like=tree(0))["n"].tolist() == [0, 100, 200]


def test_save_replaces_the_same_step_and_returns_its_url(base):
    with CheckpointManager(base) as mgr:
        first = mgr.save(tree(1), step=4, metrics={"loss": 1.0})
        second = mgr.save(tree(2), step=4, metrics={"loss": 2.0})
        assert first == second == f"{base}/step-00000004"
        assert read_meta(first)["metrics"] == {"loss": 2.0}
        assert restore(first, like=tree(0))["w"][0, 0].item() == 2.0


def test_stale_temporary_folders_are_removed_at_construction(tmp_path):
    directory = tmp_path / "runs"
    save(tree(1), str(directory / "step-00000001"))
    host, dead_pid = _fs._HOST, 2**22 + 7
    stale = directory / f".tmp-{host}-{dead_pid}-abcdef123456-step-00000002"
    mine = directory / f".tmp-{host}-{os.getpid()}-abcdef123456-step-00000003"
    foreign = directory / ".tmp-00000000-5-abcdef123456-step-00000004"
    for folder in (stale, mine, foreign):
        folder.mkdir()
        (folder / "state.safetensors").write_bytes(b"x")
    mgr = CheckpointManager(str(directory))
    assert not stale.exists() and mine.exists() and foreign.exists()
    assert steps(mgr) == [1]


# --- save triggers --------------------------------------------------------------------
def test_should_save_by_steps_epochs_seconds_and_final(base):
    mgr = CheckpointManager(base, every_n_steps=5)
    assert [s for s in range(0, 16) if mgr.should_save(s)] == [5, 10, 15]
    mgr.save(tree(5), step=5)
    assert not mgr.should_save(5) and mgr.should_save(10)
    assert mgr.should_save(7, final=True)
    assert not mgr.should_save(5, final=True), "never twice at the same step"

    mgr = CheckpointManager(base + "-e", every_n_epochs=2)
    assert [e for e in range(5) if mgr.should_save(100 + e, epoch=e)] == [2, 4]
    mgr.save(tree(1), step=21, epoch=2)
    assert not mgr.should_save(22, epoch=2) and mgr.should_save(40, epoch=4)
    assert mgr.should_save(23, epoch=None) is False

    mgr = CheckpointManager(base + "-t", every_n_seconds=30.0, save_last=False)
    t0 = mgr.last_save_time
    assert not mgr.should_save(1, now=t0 + 29.9) and mgr.should_save(1, now=t0 + 30.0)
    mgr.save(tree(1), step=1)
    assert not mgr.should_save(2, now=mgr.last_save_time + 10) and mgr.should_save(2, now=mgr.last_save_time + 31)
    assert not mgr.should_save(3, final=True)


def test_should_save_epoch_defaults_to_state_loop_epoch(base):
    import fnloop.optim as flo
    from fnloop.state import TrainState

    state = TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
    state = state.replace(step=torch.tensor(12), loop=state.loop.replace(epoch=3))
    mgr = CheckpointManager(base, every_n_epochs=3)
    assert mgr.should_save(12, epoch=3)
    assert mgr.save(state).endswith("step-00000012")
    assert mgr.last_saved_step == 12 and not mgr.should_save(13, epoch=3)


def test_a_new_manager_starts_from_the_latest_step(base):
    with CheckpointManager(base, every_n_steps=10) as mgr:
        mgr.save(tree(20), step=20)
    again = CheckpointManager(base, every_n_steps=10)
    assert again.last_saved_step == 20 and not again.should_save(20) and again.should_save(30)


@pytest.mark.parametrize(
    ("options", "argument"),
    [
        ({"keep_best": 2}, "keep_best"),
        ({"mode": "maximum", "monitor": "x"}, "mode"),
        ({"keep_last": 0}, "keep_last"),
        ({"keep_last": 1.5}, "keep_last"),
        ({"keep_every_n_steps": -1}, "keep_every_n_steps"),
        ({"every_n_steps": True}, "every_n_steps"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_seconds": 0}, "every_n_seconds"),
        ({"monitor": 3}, "monitor"),
        ({"filename": "ckpt"}, "filename"),
        ({"filename": "a/{step}"}, "filename"),
        ({"filename": ".{step}"}, "filename"),
        ({"filename": "{step}-{epoch}"}, "filename"),
        ({"filename": "{step:x}"}, "filename"),
    ],
)
def test_constructor_validation(base, options, argument):
    with pytest.raises(ConfigError, match=argument):
        CheckpointManager(base, **options)


def test_save_needs_a_step_and_storable_leaves(base):
    mgr = CheckpointManager(base, async_save=True)
    with pytest.raises(ConfigError, match="step="):
        mgr.save({"w": torch.ones(1)})
    with pytest.raises(CheckpointError, match="obj"):
        mgr.save({"w": torch.ones(1), "obj": object()}, step=1)
    with pytest.raises(ConfigError, match="metrics"):
        mgr.save({"w": torch.ones(1)}, step=1, metrics={"v": torch.ones(3)})
    mgr.close()
    assert mgr.all() == []
    with pytest.raises(FnloopError, match="closed"):
        mgr.save({"w": torch.ones(1)}, step=1)


# --- async saves ---------------------------------------------------------------------
def test_async_writes_the_same_bytes_as_sync(base):
    state = {"big": torch.randn(256, 256), "i": torch.arange(10), "loop": {"epoch": 1, "status": "running"}}
    with CheckpointManager(base + "-sync") as sync, CheckpointManager(base + "-async", async_save=True) as background:
        a = sync.save(state, step=3, metrics={"loss": 0.5})
        b = background.save(state, step=3, metrics={"loss": 0.5})
        background.wait()
        assert read_meta(a)["checksum"] == read_meta(b)["checksum"]
        assert read_meta(b)["metrics"] == {"loss": 0.5}


def test_async_snapshot_is_independent_of_the_source(base):
    live = {"w": torch.zeros(512, 512), "v": torch.zeros(3)[::1]}
    with CheckpointManager(base, async_save=True) as mgr:
        first = mgr.save(live, step=1)
        live["w"].add_(1.0)
        live["v"].fill_(7)
        second = mgr.save(live, step=2)
        live["w"].mul_(5.0)
        third = mgr.save({"w": torch.full((512, 512), 3.0), "v": torch.ones(3)}, step=3)
        mgr.wait()
    like = {"w": torch.empty(512, 512), "v": torch.empty(3)}
    assert torch.all(restore(first, like=like)["w"] == 0) and torch.all(restore(first, like=like)["v"] == 0)
    assert torch.all(restore(second, like=like)["w"] == 1) and torch.all(restore(second, like=like)["v"] == 7)
    assert torch.all(restore(third, like=like)["w"] == 3)


def test_async_runs_one_save_at_a_time(base, monkeypatch):
    active, peak, lock = [0], [0], threading.Lock()
    real_save = manager_module.write

    def tracked(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real_save(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(manager_module, "write", tracked)
    with CheckpointManager(base, async_save=True, keep_last=2) as mgr:
        for step in range(1, 9):
            mgr.save({"w": torch.randn(128, 128)}, step=step)
    assert peak[0] == 1 and steps(mgr) == [7, 8]


@pytest.mark.parametrize("where", ["wait", "save", "close"])
def test_async_errors_are_raised_later_never_swallowed(base, monkeypatch, where):
    def broken(*args, **kwargs):
        raise CheckpointError("disk on fire")

    mgr = CheckpointManager(base, async_save=True)
    monkeypatch.setattr(manager_module, "write", broken)
    mgr.save({"w": torch.ones(2)}, step=1)
    monkeypatch.undo()
    calls = {"wait": mgr.wait, "close": mgr.close, "save": lambda: mgr.save({"w": torch.ones(2)}, step=2)}
    with pytest.raises(CheckpointError, match="disk on fire"):
        calls[where]()
    if where != "close":
        mgr.save({"w": torch.ones(2)}, step=3)
        mgr.close()
        assert steps(mgr) == [3]


# --- restore shortcuts ---------------------------------------------------------------
def test_restore_last_best_step_and_url(base):
    with CheckpointManager(base, monitor="loss", async_save=True) as mgr:
        with pytest.raises(CheckpointError, match="no 'last' checkpoint"):
            mgr.restore("last", like=tree(0))
        fill(mgr, {1: 0.9, 2: 0.1, 3: 0.5})
        like = tree(0)
        assert mgr.restore("last", like=like)["n"].tolist() == [0, 3, 6]
        assert mgr.restore("latest", like=like)["n"].tolist() == [0, 3, 6]
        assert mgr.restore("best", like=like)["n"].tolist() == [0, 2, 4]
        assert mgr.restore(1, like=like)["n"].tolist() == [0, 1, 2]
        assert mgr.restore(mgr.all()[0], like=like)["n"].tolist() == [0, 1, 2]
        assert sorted(mgr.restore("last")) == ["n", "w"]
