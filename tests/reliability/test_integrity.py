"""Everything a restore returns is verified: the tensor file by its checksum, ``meta.json`` by its
own, leaf types exactly, the optimizer by kind and hyperparameters, registry paths confined."""

from __future__ import annotations

import json
import os

import fsspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fnloop as fl
import fnloop.optim as flo
from fnloop import registry
from fnloop.checkpoint import read_meta, restore, save
from fnloop.errors import CheckpointError
from scenarios import assert_same_tree, read_meta_json, small_state, write_meta_json

_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("integrity") / "ck")
    save(small_state(), url)
    with open(os.path.join(url, "meta.json"), "rb") as f:
        return url, f.read()


@_SETTINGS
@given(data=st.data())
def test_any_bit_flip_of_meta_json_is_a_named_error(saved, tmp_path_factory, data):
    url, original = saved
    position = data.draw(st.integers(0, len(original) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    damaged = bytearray(original)
    damaged[position] ^= 1 << bit
    with open(os.path.join(url, "meta.json"), "wb") as f:
        f.write(damaged)
    try:
        with pytest.raises(CheckpointError, match="meta.json"):
            restore(url, like=small_state())
    finally:
        with open(os.path.join(url, "meta.json"), "wb") as f:
            f.write(original)


def test_global_step_edited_in_place_is_caught(tmp_path):
    url = save(small_state(step=3), str(tmp_path / "ck"))
    text = (tmp_path / "ck" / "meta.json").read_text()
    start = text.index('"path": "loop/global_step"')
    at = text.index('"value": 3', start) + len('"value": ')
    (tmp_path / "ck" / "meta.json").write_text(text[:at] + "2" + text[at + 1 :])  # one bit: '3' -> '2'
    with pytest.raises(CheckpointError, match="checksum mismatch of meta.json"):
        restore(url, like=small_state())
    assert int(restore(save(small_state(step=3), str(tmp_path / "ok")), like=small_state()).loop.global_step) == 3


@_SETTINGS
@given(value=st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v) or abs(v) > 2**53),
    st.sampled_from(["nan", "inf", "-inf", "3", 1e308, True, None, [3]]),
))
def test_int_leaf_accepts_only_ints(tmp_path_factory, value):
    url = save(small_state(), str(tmp_path_factory.mktemp("ints") / "ck"))
    meta = read_meta_json(url)
    for entry in meta["leaves"]:
        if entry["path"] == "loop/global_step":
            entry["value"], entry["type"] = value, "float" if isinstance(value, float) or value in ("nan", "inf", "-inf") else "int"
    write_meta_json(url, meta)  # self-consistent: the type check must catch it
    with pytest.raises(CheckpointError, match="loop/global_step"):
        restore(url, like=small_state())


_OPTIMIZERS = {
    "adam": lambda: flo.adam(lr=1e-2),
    "adamw": lambda: flo.adamw(lr=1e-2),
    "adam-lr": lambda: flo.adam(lr=2e-2),
    "adam-betas": lambda: flo.adam(lr=1e-2, betas=(0.8, 0.999)),
    "sgd": lambda: flo.sgd(lr=1e-2),
    "sgd-momentum": lambda: flo.sgd(lr=1e-2, momentum=0.9),
    "adamw-schedule": lambda: flo.adamw(lr=flo.warmup_cosine(1e-2, warmup_steps=2, decay_steps=10)),
}


@pytest.mark.parametrize("saved_with", sorted(_OPTIMIZERS))
@pytest.mark.parametrize("restored_into", sorted(_OPTIMIZERS))
def test_optimizer_kind_and_hyperparameters_must_match(tmp_path, saved_with, restored_into):
    url = save(small_state(_OPTIMIZERS[saved_with]()), str(tmp_path / "ck"))
    like = small_state(_OPTIMIZERS[restored_into]())
    if saved_with == restored_into:
        assert_same_tree(small_state(_OPTIMIZERS[saved_with]()), restore(url, like=like), structure=False)
        return
    with pytest.raises(CheckpointError, match="another optimizer"):
        restore(url, like=like)
    fl.restore_weights(url, like=like)  # the weights alone still load


def test_optimizer_is_recorded(tmp_path):
    url = save(small_state(flo.adamw(lr=1e-2, weight_decay=0.05)), str(tmp_path / "ck"))
    recorded = json.dumps(read_meta(url)["optimizer"])
    assert "scale_by_adam" in recorded and "add_decayed_weights" in recorded and "0.05" in recorded


@pytest.mark.parametrize("version", ["../other/v1", "/etc", "v1/../../x", "v", "", 3, None, "v1\n"])
def test_registry_index_entries_stay_inside_the_model_folder(tmp_path, version):
    root = str(tmp_path / "reg")
    registry.publish({"w": torch.ones(2)}, root, "m")
    registry.publish({"w": torch.zeros(2)}, root, "other")
    path = os.path.join(root, "m", "index.json")
    with open(path) as f:
        index = json.load(f)
    index["versions"][0]["version"] = version
    with open(path, "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match="index.json"):
        registry.load(root, "m", "latest")


def test_meta_json_written_before_format_3_still_restores(tmp_path):
    state = small_state()
    url = save(state, str(tmp_path / "ck"))
    meta = read_meta_json(url)
    meta["format_version"] = 2
    del meta["meta_checksum"], meta["optimizer"], meta["finite"]
    write_meta_json(url, meta, resealed=False)
    assert_same_tree(state, restore(url, like=small_state()), structure=False)


def test_remote_tensor_file_name_is_confined(tmp_path):
    url = f"memory://integrity-{os.getpid()}/ck"
    save(small_state(), url)
    save(small_state(step=4), url, overwrite=True)  # an object store: a new tensor file, named in meta.json
    meta = read_meta_json(url)
    assert meta["state_file"].startswith("state.") and int(restore(url, like=small_state()).step) == 4
    fs, path = fsspec.core.url_to_fs(url)
    assert sorted(n.rsplit("/", 1)[1] for n in fs.ls(path, detail=False)) == ["meta.json", meta["state_file"]]
    for name in ("../x/state.safetensors", "/etc/passwd", "meta.json"):
        meta["state_file"] = name
        write_meta_json(url, meta)
        with pytest.raises(CheckpointError, match="state_file"):
            restore(url, like=small_state())


def test_a_version_flipped_to_an_older_format_is_caught(tmp_path):
    """'3' -> '2' is one bit: a sealed meta.json claiming format 2 (which had no seal) is still checked."""
    url = save(small_state(step=3), str(tmp_path / "ck"))
    path = tmp_path / "ck" / "meta.json"
    text = path.read_text()
    assert '"format_version": 3' in text
    path.write_text(text.replace('"format_version": 3', '"format_version": 2', 1))
    with pytest.raises(CheckpointError, match="checksum mismatch of meta.json"):
        restore(url, like=small_state())
