"""``fnloop fit --trainer.devices 2 --trainer.strategy ddp``: fnloop starts the second rank itself
(torch's elastic multiprocessing API), rank 0 writes the run folder, both ranks test.

The comparison of the full digits run on 1 and 2 devices (test accuracy within 1 point) takes
minutes: it runs with ``FNLOOP_SLOW_TESTS=1``.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
ACCURACY = re.compile(r"^test accuracy: (\d\.\d{4})$", re.M)


def fnloop_fit(tmp_path: pathlib.Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    config = tmp_path / "digits.yaml"  # digits_task from the examples folder (another package may be called examples)
    config.write_text((EXAMPLES / "digits.yaml").read_text().replace("examples.digits_task.", "digits_task."))
    path = os.pathsep.join(filter(None, [str(ROOT), str(EXAMPLES), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "fnloop", "fit", "--config", str(config), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_fit_on_two_processes_from_the_command_line(tmp_path):
    run = fnloop_fit(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
                     "--trainer.loggers", "[csv]")
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"finished after 1 epochs \(20 steps\)", run.stdout)  # 1257 images, 2 x 32 per step
    assert len(ACCURACY.findall(run.stdout)) == 1  # rank 0 prints
    assert sorted(p.name for p in (tmp_path / "runs" / "digits").iterdir()) == ["version_0"]
    folder = tmp_path / "runs" / "digits" / "version_0"
    assert (folder / "metrics.csv").exists() and (folder / "config.yaml").exists()
    assert len(list((folder / "checkpoints").iterdir())) == 1


@pytest.mark.skipif(not os.environ.get("FNLOOP_SLOW_TESTS"), reason="minutes: set FNLOOP_SLOW_TESTS=1")
def test_two_processes_reach_the_accuracy_of_one(tmp_path):
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    one = fnloop_fit(tmp_path / "one", timeout=900)
    two = fnloop_fit(tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp", timeout=900)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    acc1, acc2 = float(ACCURACY.search(one.stdout).group(1)), float(ACCURACY.search(two.stdout).group(1))
    assert abs(acc1 - acc2) <= 0.01, (acc1, acc2)
