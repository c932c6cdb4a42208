"""The driver's stages in a 2-rank DDP run on CPU (gloo); see ``_procs/driver_worker.py``.

* every validation loader is sharded and its metrics reduced across ranks: both ranks get the
  metrics a 1-process run computes over the whole loader (means weighted by samples, ``*_max``
  the maximum);
* predict gives every rank all the predictions; rank 0 alone writes the prediction files, prints
  the model summary and writes the logs.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

import fnloop as fl
from fnloop.callbacks import read_predictions
from fnloop.connectors.launch import free_port

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE / "_procs"))
import driver_worker as w  # noqa: E402

TIMEOUT = 90


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-driver")
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = []
    try:
        for rank in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "_procs" / "driver_worker.py"), str(out)], cwd=str(out),
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        deadline = time.monotonic() + TIMEOUT
        results = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) + (p.returncode,) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [r[2] for r in results] == [0, 0], [r[1][-2000:] for r in results]
    return out, [r[0] for r in results], [torch.load(out / f"driver-{rank}.pt") for rank in range(2)]


def _reference(params: dict, stage: str) -> dict[str, float]:
    """The metrics of one process over the whole loaders, with the params the ranks reached."""
    module = w.model()
    module.load_state_dict(params)
    state = fl.TrainState.create(module, fl.optim.sgd(lr=0.1), seed=0)
    trainer = fl.Trainer(enable_progress_bar=False, logger=False, accelerator="cpu")
    run = trainer.validate if stage == "val" else trainer.test
    return run(state, fl.eval_step(w.metric_fn), {"a": w.loader(1), "b": w.loader(2)}, verbose=False)


def test_every_loader_is_reduced_across_ranks(run):
    _, _, (r0, r1) = run
    assert r0["validate"] == r1["validate"]
    assert sorted(r0["validate"]) == ["val/err_max/a", "val/err_max/b", "val/loss/a", "val/loss/b"]
    expected = _reference(r0["params"], "val")
    for name, value in expected.items():
        assert r0["validate"][name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    assert r0["fit"] and r0["fit"] == r1["fit"]  # fit's validation runs too
    assert r0["fit"][-1] == pytest.approx(r0["validate"], rel=1e-6)


def test_predictions_are_whole_on_every_rank_and_written_by_rank_zero(run):
    out, _, (r0, r1) = run
    assert len(r0["preds"]) == len(r1["preds"]) == w.N // w.BATCH
    for a, b in zip(r0["preds"], r1["preds"]):
        assert torch.equal(a, b)
    written = read_predictions(out / "preds")
    assert len(written) == len(r0["preds"])
    for a, b in zip(written, r0["preds"]):
        assert torch.equal(a, b)


def test_rank_zero_alone_prints_the_summary_and_writes_logs(run):
    out, stdouts, _ = run
    assert "Total params" in stdouts[0]
    assert "Total params" not in stdouts[1]
    assert (out / "root").is_dir()
    assert not (out / "runs").exists()  # no rank fell back to the working directory's default folder
