"""Concurrent writers: create-or-fail is atomic, registry versions are allocated once each, a
replaced checkpoint stays until its successor is committed, and a run folder belongs to one run."""

from __future__ import annotations

import os
import uuid

import fsspec
import pytest
import torch

from fnloop import registry
from fnloop.checkpoint import format as ckformat
from fnloop.checkpoint import restore, save
from fnloop.errors import CheckpointError
from scenarios import REPO, cli, race_publish, race_save, run_two


def test_two_processes_saving_one_url_one_wins_and_keeps_its_weights(tmp_path):
    rounds = 12
    out = run_two(race_save, (str(tmp_path), rounds))
    for r in range(rounds):
        winners = [tag for tag, rows in out.items() if rows[r][1]]
        assert len(winners) == 1, (r, out[1][r], out[2][r])
        loser = 3 - winners[0]
        assert "already exists" in out[loser][r][2] or "another writer" in out[loser][r][2]
        assert restore(str(tmp_path / f"r{r}"))["w"].eq(float(winners[0])).all()
        assert sorted(os.listdir(tmp_path / f"r{r}")) == ["meta.json", "state.safetensors"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_two_processes_publishing_one_name_get_unique_indexed_versions(tmp_path):
    count = 8
    out = run_two(race_publish, (str(tmp_path), count))
    published = [row for rows in out.values() for row in rows]
    versions = [v for v, _ in published]
    assert len(set(versions)) == 2 * count
    indexed = [e["version"] for e in registry.versions(str(tmp_path), "m")]
    assert sorted(indexed) == sorted(versions) and len(indexed) == len(set(indexed))
    for version, value in published:
        assert registry.load(str(tmp_path), "m", version)["w"].eq(value).all(), version


def test_threads_publishing_on_an_object_store_take_turns_through_the_lock_file():
    import concurrent.futures

    root = f"memory://writers-{uuid.uuid4().hex}"

    def publish(i):
        return registry.publish({"w": torch.full((8,), float(i))}, root, "m"), float(i)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        published = list(pool.map(publish, range(12)))
    assert len({v for v, _ in published}) == 12
    assert sorted(e["version"] for e in registry.versions(root, "m")) == sorted(v for v, _ in published)
    for version, value in published:
        assert registry.load(root, "m", version)["w"].eq(value).all()


def _url(kind: str, tmp_path) -> str:
    return str(tmp_path / "ck") if kind == "local" else f"memory://writers-{uuid.uuid4().hex}/ck"


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_checkpoint_committed_meanwhile_by_another_writer_is_kept(tmp_path, monkeypatch, kind):
    url = _url(kind, tmp_path)
    write_state = ckformat._write_state
    calls = []

    def other_writer_commits_meanwhile(out, tensors, meta):
        if not calls:
            calls.append(1)
            save({"w": torch.full((4,), 7.0)}, url)  # the other writer, between our check and our commit
        write_state(out, tensors, meta)

    monkeypatch.setattr(ckformat, "_write_state", other_writer_commits_meanwhile)
    with pytest.raises(CheckpointError, match="another writer|already exists"):
        save({"w": torch.zeros(4)}, url)
    assert restore(url)["w"].eq(7.0).all()


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_failed_resave_keeps_the_old_checkpoint(tmp_path, monkeypatch, kind):
    url = _url(kind, tmp_path)
    save({"w": torch.ones(4)}, url)
    write_state = ckformat._write_state

    def fails_midway(out, tensors, meta):
        out.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckformat, "_write_state", fails_midway)
    with pytest.raises(CheckpointError, match="No space left"):
        save({"w": torch.zeros(4)}, url, overwrite=True)
    monkeypatch.setattr(ckformat, "_write_state", write_state)
    assert restore(url)["w"].eq(1.0).all()
    save({"w": torch.full((4,), 2.0)}, url, overwrite=True)
    assert restore(url)["w"].eq(2.0).all()
    fs, path = fsspec.core.url_to_fs(url)
    assert len([n for n in fs.ls(path, detail=False) if "safetensors" in n]) == 1


def test_registry_publish_retries_past_a_version_folder_taken_without_the_lock(tmp_path):
    root = str(tmp_path)
    registry.publish({"w": torch.ones(1)}, root, "m")
    save({"params": {"w": torch.zeros(1)}, "buffers": {}}, str(tmp_path / "m" / "v2"))  # an older writer's v2
    assert registry.publish({"w": torch.full((1,), 3.0)}, root, "m") == "v3"
    assert registry.load(root, "m", "v3")["w"].item() == 3.0


def test_second_fit_into_a_run_folder_with_checkpoints_is_refused(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    save({"w": torch.ones(1)}, str(run_dir / "checkpoints" / "step-00000005"))
    args = ["fit", "--config", str(REPO / "examples" / "digits.yaml"), "--run_dir", str(run_dir), "--trainer.max_epochs", "1"]
    code, err = cli(args, tmp_path, capsys, monkeypatch)
    assert code == 2, err
    assert "earlier run" in err and "--ckpt_path last" in err and "Traceback" not in err
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-00000005"]


def test_a_reader_always_finds_a_checkpoint_while_it_is_replaced(tmp_path):
    import threading

    url = str(tmp_path / "ck")
    save({"w": torch.zeros(1024)}, url)
    done, seen, errors = threading.Event(), set(), []

    def read():
        while not done.is_set():
            try:
                seen.add(float(restore(url)["w"][0]))
            except CheckpointError as e:  # only the folder swapped between two reads of one restore
                if "does not exist" in str(e) or "not a checkpoint" in str(e):
                    errors.append(str(e))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 30):
            save({"w": torch.full((1024,), float(i))}, url, overwrite=True)
    finally:
        done.set()
        reader.join(60)
    assert not errors, errors[:3]
    assert restore(url)["w"].eq(29.0).all()
