"""Every bad input is an fnloop error that names the flag, key, file or batch; the CLI exits 2 for
a config error and 1 for any other, without a traceback."""

from __future__ import annotations

import signal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnloop as fl
from fnloop import registry
from fnloop.checkpoint import restore, restore_params, save
from fnloop.errors import ConfigError, FnloopError
from scenarios import REPO, cli


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"stop_signals": [99999]}, "stop_signals[0]"),
        ({"stop_signals": ["SIGNOPE"]}, "stop_signals[0]"),
        ({"stop_signals": [signal.SIGKILL]}, "stop_signals[0]"),
        ({"stop_signals": [None]}, "stop_signals[0]"),
        ({"stop_signals": 15}, "stop_signals"),
        ({"stop_signals": "SIGTERM"}, "stop_signals"),
        ({"donate": "no"}, "donate"),
        ({"donate": 0}, "donate"),
        ({"deterministic": "false"}, "deterministic"),
        ({"enable_progress_bar": "off"}, "enable_progress_bar"),
        ({"max_time": float("nan")}, "max_time"),
    ],
)
def test_bad_trainer_flags_are_config_errors_naming_the_flag(flags, named):
    with pytest.raises(ConfigError) as err:
        fl.Trainer(**flags)
    assert f"Trainer({named}=" in str(err.value)


def test_stop_signals_by_name_and_number_are_accepted():
    fl.Trainer(stop_signals=["SIGTERM", signal.SIGUSR1, int(signal.SIGINT)])
    with fl.connectors.signals.stop_signals(["SIGUSR2"]) as request:
        assert not request.requested


@pytest.mark.parametrize("where", ["cuda:x", "gpu", 3.5, object(), True, "meta:0:1"])
def test_bad_map_location_is_a_config_error(tmp_path, where):
    url = save({"w": torch.ones(1)}, str(tmp_path / "ck"))
    for load in (lambda: restore(url, map_location=where), lambda: restore_params(url, map_location=where)):
        with pytest.raises(ConfigError, match="map_location"):
            load()


@settings(max_examples=60, deadline=None)
@given(name=st.one_of(
    st.text(min_size=1).map(lambda s: s + "\x00"),
    st.text(min_size=1, max_size=5).map(lambda s: s + "\ud800"),
    st.text(alphabet="ab", min_size=256, max_size=300),
    st.sampled_from(["", ".", "..", "a/b", "a\\b", "line\nbreak", "index.json", ".hidden"]),
))
def test_bad_registry_names_are_config_errors(tmp_path_factory, name):
    root = str(tmp_path_factory.getbasetemp() / "registry-names")
    for call in (
        lambda: registry.publish({"w": torch.ones(1)}, root, name),
        lambda: registry.load(root, name),
        lambda: registry.versions(root, name),
        lambda: registry.delete(root, name, "v1"),
    ):
        with pytest.raises(ConfigError, match="registry name"):
            call()


DIGITS = str(REPO / "examples" / "digits.yaml")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--loss_fn", "math.pi"], "loss_fn"),
        (["--loss_fn", "torch.nn.CrossEntropyLoss"], "loss_fn"),
        (["--loss_fn", "math.sqrt"], "loss_fn"),
        (["--trainer.donate", "maybe"], "donate"),
        (["--trainer.stop_signals", "[99999]"], "stop_signals"),
    ],
    ids=["value", "class", "one-argument", "donate", "stop_signals"],
)
def test_cli_bad_values_exit_2_naming_the_key(tmp_path, capsys, monkeypatch, args, named):
    code, err = cli(["fit", "--config", DIGITS, "--trainer.default_root_dir", str(tmp_path / "runs"), *args], tmp_path, capsys, monkeypatch)
    assert code == 2, err
    assert named in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_cli_config_of_invalid_utf8_exits_2_naming_the_file(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"seed: 1\nname: caf\xe9\n")
    code, err = cli(["fit", "--config", str(bad)], tmp_path, capsys, monkeypatch)
    assert code == 2 and "bad.yaml" in err and "UTF-8" in err and "Traceback" not in err, err


def test_fnloop_errors_are_fnloop_errors():
    for cls in (fl.errors.ConfigError, fl.errors.CheckpointError, fl.errors.StepError):
        assert issubclass(cls, FnloopError)


def _mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def _fit_state():
    from scenarios import small_state

    state = small_state(fl.optim.sgd(lr=1e-2), step=0)
    return state.replace(loop=state.loop.replace(global_step=0, epoch=0))


def test_wrong_shaped_batch_mid_epoch_names_the_batch_and_step():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 4, generator=g), torch.randn(2, 2, generator=g)) for _ in range(6)]
    data[3] = (torch.randn(2, 5), torch.randn(2, 2))
    trainer = fl.Trainer(max_epochs=1, enable_progress_bar=False)
    with pytest.raises(fl.errors.StepError) as err:
        trainer.fit(_fit_state(), fl.train_step(_mse), data)
    assert "batch 3" in str(err.value) and "step 3" in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError)


class _ReturnsNumber(fl.Callback):
    def on_train_batch_end(self, state, metrics):
        return 5


def test_hook_returning_something_else_than_a_state_is_named():
    trainer = fl.Trainer(max_epochs=1, enable_progress_bar=False, callbacks=[_ReturnsNumber()])
    with pytest.raises(FnloopError) as err:
        trainer.fit(_fit_state(), fl.train_step(_mse), [(torch.randn(2, 4), torch.randn(2, 2))])
    assert "_ReturnsNumber.on_train_batch_end" in str(err.value) and "int" in str(err.value)


@pytest.mark.parametrize("url", ["ck\x00pt", "ck\ud800"])
def test_bad_checkpoint_locations_are_checkpoint_errors(tmp_path, url):
    target = str(tmp_path / url)
    for call in (
        lambda: save({"w": torch.ones(1)}, target),
        lambda: restore(target),
        lambda: fl.CheckpointManager(target),
    ):
        with pytest.raises(fl.errors.CheckpointError, match="not"):
            call()
