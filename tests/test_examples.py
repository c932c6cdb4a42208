"""The README quickstart and the bundled examples run, in a quick mode."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quickstart_runs(capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    quickstart = next(b for b in blocks if "fl.train_step" in b and "Trainer" in b)
    namespace: dict = {}
    exec(compile(quickstart, "README quickstart", "exec"), namespace)
    state = namespace["state"]
    assert state.loop.status == "finished"
    out = capsys.readouterr().out
    assert "test/acc" in out


def test_digits_example_reaches_accuracy(load_example, capsys):
    acc = load_example("digits")["main"](["--quick"])
    assert acc >= 0.95
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name != "__init__.py"))
def test_every_example_has_a_quick_mode(script):
    assert "--quick" in (ROOT / "examples" / script).read_text()
