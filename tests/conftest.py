"""Test-wide setup: shared scenario modules importable by name, one torch thread, examples.

The scenario modules (``kernel_scenarios``, ``loop_scenarios``, ``optim_scenarios``) hold the
small models, data and reference loops several test files share. One torch thread keeps the
suite fast and its timings steady on small CI machines, where intra-op threads only contend.
"""

from __future__ import annotations

import pathlib
import runpy
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
for folder in (HERE, HERE / "loops", HERE / "optim"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def load_example() -> Iterator[Callable[[str], dict[str, Any]]]:
    """``load_example("char_lm")``: the namespace of ``examples/char_lm.py``, run as a module
    with the examples folder importable (for ``digits_task`` and the like)."""
    examples = HERE.parent / "examples"
    sys.path.insert(0, str(examples))
    try:
        yield lambda name: runpy.run_path(str(examples / f"{name}.py"), run_name=f"{name}_example")
    finally:
        sys.path.remove(str(examples))
