"""Run folders: version numbering, explicit versions, races between creators."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from fnloop.errors import ConfigError
from fnloop.loggers import RunDir, next_version, resolve_run_dir
from fnloop.loggers import run_dir as run_dir_module
from fnloop.loggers.rank import RANK_ENV_VARS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    for var in RANK_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def test_versions_count_up(tmp_path):
    paths = [resolve_run_dir(tmp_path, "exp") for _ in range(3)]
    assert paths == [os.path.join(tmp_path, "exp", f"version_{n}") for n in range(3)]
    assert all(os.path.isdir(p) for p in paths)
    assert next_version(tmp_path, "exp") == 3
    assert resolve_run_dir(tmp_path, "other").endswith(os.path.join("other", "version_0"))


def test_next_version_skips_past_the_highest_and_ignores_other_entries(tmp_path):
    for entry in ("version_0", "version_4", "version_x", "notes"):
        os.makedirs(tmp_path / "exp" / entry)
    (tmp_path / "exp" / "version_9.txt").write_text("")
    assert next_version(tmp_path, "exp") == 5
    assert resolve_run_dir(tmp_path, "exp").endswith("version_5")


def test_no_name_puts_versions_under_root(tmp_path):
    assert resolve_run_dir(tmp_path, None) == os.path.join(tmp_path, "version_0")
    assert resolve_run_dir(tmp_path, "") == os.path.join(tmp_path, "version_1")


def test_explicit_versions_are_reused(tmp_path):
    first = resolve_run_dir(tmp_path, "exp", version=3)
    assert first == os.path.join(tmp_path, "exp", "version_3")
    assert resolve_run_dir(tmp_path, "exp", version=3) == first  # a resumed run
    assert resolve_run_dir(tmp_path, "exp", version="ablation").endswith("ablation")
    assert next_version(tmp_path, "exp") == 4


@pytest.mark.parametrize("version", [-1, "", "a/b", "..", 1.5, True])
def test_bad_versions_name_the_flag(tmp_path, version):
    with pytest.raises(ConfigError, match="version="):
        resolve_run_dir(tmp_path, "exp", version=version)


def test_unwritable_root_names_the_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="root_dir"):
        resolve_run_dir(blocker, "exp")


def test_a_version_taken_meanwhile_is_skipped(tmp_path, monkeypatch):
    real_makedirs = os.makedirs
    calls = []

    def makedirs_losing_the_first_race(path, exist_ok=False):
        if os.path.basename(path).startswith("version_"):
            calls.append(os.path.basename(path))
            if len(calls) == 1:
                real_makedirs(path)  # another process creates it between scan and create
                raise FileExistsError(path)
        return real_makedirs(path, exist_ok=exist_ok)

    monkeypatch.setattr(run_dir_module.os, "makedirs", makedirs_losing_the_first_race)
    assert resolve_run_dir(tmp_path, "exp").endswith("version_1")
    assert calls == ["version_0", "version_1"]


def test_threads_never_share_a_version(tmp_path):
    with ThreadPoolExecutor(max_workers=8) as pool:
        paths = list(pool.map(lambda _: resolve_run_dir(tmp_path, "exp"), range(40)))
    assert len(set(paths)) == 40
    assert sorted(os.listdir(tmp_path / "exp")) == sorted(f"version_{n}" for n in range(40))


CREATOR = textwrap.dedent(
    """
    import sys
    from fnloop.loggers.run_dir import resolve_run_dir
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(15):
        print(resolve_run_dir(sys.argv[1], "exp"), flush=True)
    """
)


def test_processes_never_share_a_version(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CREATOR, str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:  # start both at once
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=60)[0].split() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0]
    created = outputs[0] + outputs[1]
    assert len(created) == 30 and len(set(created)) == 30


def test_run_dir_is_lazy_and_resolves_once(tmp_path):
    run = RunDir(tmp_path, "exp")
    assert not run.resolved and os.listdir(tmp_path) == []
    assert run.path == run.path == os.path.join(tmp_path, "exp", "version_0")
    assert run.resolved and os.listdir(tmp_path / "exp") == ["version_0"]


def test_run_dir_with_explicit_folder(tmp_path):
    run = RunDir(log_dir=tmp_path / "here" / "there")
    assert run.path == os.path.join(tmp_path, "here", "there") and os.path.isdir(run.path)


def test_run_dir_on_rank_one_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert RunDir(tmp_path, "exp").path is None
    assert RunDir(log_dir=tmp_path / "x").path == os.path.join(tmp_path, "x")
    assert os.listdir(tmp_path) == []
