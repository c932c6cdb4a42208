"""fnloop.registry: versioned publish / load / versions / delete on memory:// and local paths."""

from __future__ import annotations

import json
import time
import uuid

import fsspec
import pytest
import torch

import fnloop.optim as flo
from fnloop import registry
from fnloop.checkpoint import restore_weights
from fnloop.errors import CheckpointError, ConfigError
from fnloop.state import TrainState


@pytest.fixture(params=["memory", "local"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "registry")
        return
    name = f"/fnloop-registry-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    memory = fsspec.filesystem("memory")
    if memory.exists(name):
        memory.rm(name, recursive=True)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def _trained(offset: float) -> TrainState:
    state = TrainState.create(_model(), flo.sgd(lr=0.1, momentum=0.9))
    return state.replace(
        params={k: v + offset for k, v in state.params.items()},
        buffers={k: v + int(offset) for k, v in state.buffers.items()},
    )


def test_publish_load_versions_delete(root):
    first, second = _trained(1.0), _trained(2.0)
    before = time.time()
    assert registry.publish(first, root, "mlp", metadata={"val_acc": 0.8, "data": "v1"}) == "v1"
    assert registry.publish(second, root, "mlp", metadata={"val_acc": 0.9}) == "v2"

    latest = registry.load(root, "mlp")
    expected = {**second.params, **second.buffers}
    assert sorted(latest) == sorted(expected) and "0.weight" in latest and "1.running_mean" in latest
    assert all(torch.equal(latest[k], v) for k, v in expected.items())
    old = registry.load(root, "mlp", "v1")
    assert all(torch.equal(old[k], v) for k, v in {**first.params, **first.buffers}.items())

    listed = registry.versions(root, "mlp")
    assert [v["version"] for v in listed] == ["v1", "v2"]
    assert listed[0]["metadata"] == {"val_acc": 0.8, "data": "v1"} and listed[1]["metadata"] == {"val_acc": 0.9}
    assert all(before - 1 <= v["created"] <= time.time() + 1 for v in listed)

    registry.delete(root, "mlp", "v2")
    assert [v["version"] for v in registry.versions(root, "mlp")] == ["v1"]
    assert torch.equal(registry.load(root, "mlp")["0.weight"], first.params["0.weight"])
    fs, path = fsspec.core.url_to_fs(f"{root}/mlp/v2")
    assert not fs.exists(path)
    assert registry.publish(first, root, "mlp") == "v3", "a deleted version number is never reused"


def test_index_is_json_and_folders_are_checkpoints(root):
    registry.publish({"w": torch.ones(2)}, root, "tiny", metadata={"k": [1, 2]})
    fs, path = fsspec.core.url_to_fs(root)
    index = json.loads(fs.cat_file(f"{path}/tiny/index.json"))
    assert index["format"] == "fnloop-registry" and index["versions"][0]["version"] == "v1"
    assert sorted(n.rsplit("/", 1)[1] for n in fs.ls(f"{path}/tiny", detail=False) if not n.rsplit("/", 1)[1].startswith(".")) == ["index.json", "v1"]
    files = sorted(n.rsplit("/", 1)[1] for n in fs.ls(f"{path}/tiny/v1", detail=False))
    assert files == ["meta.json", "state.safetensors"]


def test_unknown_names_and_versions_list_what_exists(root):
    registry.publish({"w": torch.ones(2)}, root, "alpha")
    registry.publish({"w": torch.ones(2)}, root, "beta")
    with pytest.raises(CheckpointError, match="gamma") as err:
        registry.load(root, "gamma")
    assert "['alpha', 'beta']" in str(err.value)
    with pytest.raises(CheckpointError, match="v7") as err:
        registry.load(root, "alpha", "v7")
    assert "['v1']" in str(err.value)
    with pytest.raises(CheckpointError, match="v9"):
        registry.delete(root, "alpha", "v9")
    with pytest.raises(CheckpointError, match="gamma"):
        registry.versions(root, "gamma")
    registry.delete(root, "alpha", "v1")
    with pytest.raises(CheckpointError, match="'latest'"):
        registry.load(root, "alpha")


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (({"w": torch.ones(1)}, "a/b"), {}, "name"),
        (({"w": torch.ones(1)}, ".hidden"), {}, "name"),
        (({"w": torch.ones(1)}, "ok"), {"metadata": {"x": object()}}, "metadata"),
        (({"w": torch.ones(1)}, "ok"), {"metadata": {"x": float("nan")}}, "metadata"),
        (({"w": 3}, "ok"), {}, "'w'"),
        ((torch.ones(3), "ok"), {}, "TrainState"),
    ],
)
def test_bad_publish_arguments(root, args, kwargs, match):
    tree, name = args
    with pytest.raises(ConfigError, match=match):
        registry.publish(tree, root, name, **kwargs)


def test_train_state_init_from_a_published_version(root):
    published = _trained(5.0)
    version = registry.publish(published, root, "base-model")
    state = TrainState.create(_model(), flo.adamw(lr=1e-3), init_from=registry.load(root, "base-model", version))
    for name, value in {**published.params, **published.buffers}.items():
        got = state.params.get(name, state.buffers.get(name))
        assert torch.equal(got, value), name
    assert int(state.step) == 0
    assert torch.count_nonzero(state.opt_state[0].mu["0.weight"]) == 0
    fresh = TrainState.create(_model(), flo.adamw(lr=1e-3))
    again = restore_weights(f"{root}/base-model/{version}", like=fresh)
    assert all(torch.equal(again.params[k], published.params[k]) for k in published.params)


def test_orphan_version_folder_is_skipped(root):
    from fnloop.checkpoint import save

    save({"params": {"w": torch.zeros(1)}, "buffers": {}}, f"{root}/m/v1")
    assert registry.publish({"w": torch.ones(1)}, root, "m") == "v2"
    assert [v["version"] for v in registry.versions(root, "m")] == ["v2"]
