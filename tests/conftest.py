"""Test-wide setup: shared scenario modules importable by name, one torch thread.

The scenario modules (``kernel_scenarios``, ``loop_scenarios``, ``optim_scenarios``) hold the
small models, data and reference loops several test files share. One torch thread keeps the
suite fast and its timings steady on small CI machines, where intra-op threads only contend.
"""

from __future__ import annotations

import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
for folder in (HERE, HERE / "loops", HERE / "optim"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

torch.set_num_threads(1)
