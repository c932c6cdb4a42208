"""MLFlowLogger on the real mlflow client: a fit and a test written to a local sqlite store and
read back with ``MlflowClient``; and the same over HTTP against an ``mlflow server`` this test
starts on 127.0.0.1 and always stops."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import fnloop as fl

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


def _fit_and_test(uri, tmp_path, **logger_kwargs):
    logger = fl.MLFlowLogger("fnloop-test", run_name="r1", tracking_uri=uri, tags={"team": "vision"}, **logger_kwargs)
    ckpt = fl.ModelCheckpoint(str(tmp_path / "ckpt"), keep_last=1)
    trainer = sc.quiet_trainer(max_epochs=2, log_every_n_steps=2, logger=logger, callbacks=[ckpt], num_sanity_val_steps=0)
    data = sc.batches(4)
    state = trainer.fit(sc.linear_state(), fl.train_step(sc.mse), data, val_step=fl.eval_step(sc.mse), val_data=data[:2])
    tested = trainer.test(state, fl.eval_step(sc.mse), data)
    return logger, tested


def _check_run(uri, logger, tested, *, artifacts):
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["team"] == "vision" and run.info.run_name == "r1"
    assert run.data.params["trainer.max_epochs"] == "2"
    assert run.data.params["trainer.log_every_n_steps"] == "2"
    history = client.get_metric_history(logger.run_id, "train/loss")
    assert sorted(m.step for m in history) == [2, 4, 6, 8]
    assert [m.step for m in client.get_metric_history(logger.run_id, "train/loss_epoch")] == [4, 8]
    assert sorted(m.step for m in client.get_metric_history(logger.run_id, "val/loss")) == [4, 8]
    (test_loss,) = client.get_metric_history(logger.run_id, "test/loss")  # the test went to the same run
    assert test_loss.value == pytest.approx(tested["test/loss"]) and test_loss.step == 8
    names = [a.path for a in client.list_artifacts(logger.run_id, "checkpoints")]
    if artifacts:
        assert names == ["checkpoints/step-00000008"]
        files = {os.path.basename(a.path) for a in client.list_artifacts(logger.run_id, names[0])}
        assert "meta.json" in files
    else:
        assert names == []


def test_fit_then_test_into_a_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger, tested = _fit_and_test(uri, tmp_path, log_model=True)
    _check_run(uri, logger, tested, artifacts=True)


def test_without_log_model_no_checkpoint_is_uploaded(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger, tested = _fit_and_test(uri, tmp_path)
    _check_run(uri, logger, tested, artifacts=False)


def test_a_missing_mlflow_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(fl.errors.ConfigError, match="pip install mlflow"):
        fl.MLFlowLogger("x", tracking_uri="sqlite:///unused.db").client


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if exe is None:
        pytest.skip("no mlflow executable")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not answer within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        proc.stderr.close()


def test_fit_then_test_over_http_to_an_mlflow_server(server, tmp_path):
    logger, tested = _fit_and_test(server, tmp_path, log_model=True)
    _check_run(server, logger, tested, artifacts=True)
