"""examples/sweep_digits.py: 8 learning rates in one fit, each member's test accuracy printed."""

from __future__ import annotations

import re


def test_sweep_digits_quick_trains_8_members(load_example, capsys):
    accs = load_example("sweep_digits")["main"](["--quick"])
    out = capsys.readouterr().out
    printed = re.findall(r"^lr=(\S+)  test accuracy: (\d\.\d{4})$", out, flags=re.M)
    assert [float(lr) for lr, _ in printed] == [1e-4, 3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 3e-2]
    assert all(abs(float(a) - acc) <= 5e-5 for (_, a), acc in zip(printed, accs))
    assert max(accs) >= 0.93  # the good learning rates learn digits in a few epochs
    assert accs[0] < max(accs)  # 1e-4 is too small for a few epochs
    assert "best: lr=" in out
