"""The device, precision and distribution flags: accepted values, errors that name the flag, the
launcher's environment read, device placement, and the same keys in the CLI config."""

from __future__ import annotations

import pathlib

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo
from fnloop.cli.job import build_job
from fnloop.cli.parser import build_parser
from fnloop.connectors.device import parse_devices, state_to_device
from fnloop.connectors.launch import connect, plan, worker_command

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def digits(tmp_path, monkeypatch):
    """examples/digits.yaml naming ``digits_task`` from the examples folder (another installed
    package may be called ``examples``)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    config = tmp_path / "digits.yaml"
    config.write_text((EXAMPLES / "digits.yaml").read_text().replace("examples.digits_task.", "digits_task."))
    return str(config)

ACCEPTED = [
    dict(accelerator="cpu"), dict(accelerator="auto"), dict(devices=1), dict(devices=2), dict(devices="auto"),
    dict(devices="2"), dict(devices=[0, 1]), dict(devices=-1), dict(num_nodes=1), dict(strategy="auto"),
    dict(strategy="ddp"), dict(precision="bf16-mixed"), dict(sync_batchnorm=True), dict(use_distributed_sampler=False),
]
REJECTED = [
    (dict(accelerator="tpu"), "accelerator"), (dict(devices=0), "devices"), (dict(devices="many"), "devices"),
    (dict(devices=[]), "devices"), (dict(devices=True), "devices"), (dict(num_nodes=0), "num_nodes"),
    (dict(strategy="deepspeed"), "strategy"), (dict(strategy="fsdp"), "strategy"), (dict(precision="int8"), "precision"),
    (dict(sync_batchnorm="yes"), "sync_batchnorm"), (dict(use_distributed_sampler=1), "use_distributed_sampler"),
]


@pytest.mark.parametrize("flags", ACCEPTED, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_accepted_flags(flags):
    fl.Trainer(**flags)


@pytest.mark.parametrize("flags, name", REJECTED, ids=lambda x: str(x))
def test_rejected_flags_name_the_flag(flags, name):
    with pytest.raises(fl.ConfigError, match=rf"Trainer\({name}="):
        fl.Trainer(**flags)


def test_cuda_flag_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(fl.ConfigError, match=r"accelerator='cuda'.*no CUDA"):
        fl.Trainer(accelerator="cuda")


def test_devices_parse():
    assert parse_devices(3, "cpu") == 3
    assert parse_devices([0, 2], "cpu") == 2
    assert parse_devices("0,1", "cuda") == [0, 1]


def test_plan_reads_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    accelerator, _, world, strategy = plan(fl.Trainer(accelerator="cpu"))
    assert (accelerator, world, strategy.backend(torch.device("cpu"))) == ("cpu", 2, "gloo")
    with pytest.raises(fl.ConfigError, match="devices=3.*started 2 processes"):
        plan(fl.Trainer(accelerator="cpu", devices=3))


def test_several_nodes_need_a_launcher():
    with pytest.raises(fl.ConfigError, match="num_nodes=2.*torchrun --nnodes 2"):
        plan(fl.Trainer(accelerator="cpu", num_nodes=2))


def test_single_process_connect_and_placement():
    parallel = connect(fl.Trainer(accelerator="cpu"))
    assert (parallel.rank, parallel.world_size, parallel.device, parallel.is_global_zero) == (0, 1, torch.device("cpu"), True)
    assert parallel.agree(True, False) == (True, False)
    assert parallel.reduce_metrics({"a": 1.0}, 3) == {"a": 1.0}
    state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.adam(lr=0.1))
    assert state_to_device(state, "cpu") is state
    batch = {"x": torch.ones(2), "n": 3}
    assert fl.to_device(batch, "cpu")["x"] is batch["x"]
    assert "-m" in worker_command() or worker_command()[1:]  # runs this program again


def test_cli_config_keys(digits):
    parser = build_parser()
    args = ["fit", "--config", digits, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.precision", "bf16-mixed",
            "--trainer.accelerator", "cpu", "--trainer.num_nodes", "1", "--trainer.use_distributed_sampler", "false"]
    stage, cfg = parser.parse(args)
    t = build_job(stage, cfg, parser.stage_parsers[stage]).trainer
    assert (t.devices, t.strategy, t.precision, t.accelerator, t.use_distributed_sampler) == (2, "ddp", "bf16-mixed", "cpu", False)


def test_cli_rejects_a_bad_precision_naming_the_key(digits):
    parser = build_parser()
    with pytest.raises(fl.ConfigError, match="trainer.precision"):
        stage, cfg = parser.parse(["fit", "--config", digits, "--trainer.precision", "int8"])
        build_job(stage, cfg, parser.stage_parsers[stage])
