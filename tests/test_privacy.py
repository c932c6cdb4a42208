"""The RDP accountant against Opacus's (test-only dependency): epsilon to 1e-3 (it agrees far closer)."""

from __future__ import annotations

import itertools
import warnings

import pytest

from fnloop import privacy

opacus_rdp = pytest.importorskip("opacus.accountants")

CASES = list(itertools.product([0.6, 1.1, 3.0], [0.004, 0.05, 1.0], [1, 1000], [1e-5]))


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), CASES)
def test_epsilon_equals_opacus(sigma, q, steps, delta):
    accountant = opacus_rdp.RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the best order is at an end of the range
        expected = accountant.get_epsilon(delta)
    assert privacy.epsilon(sigma, q, steps, delta) == pytest.approx(expected, abs=1e-3)


def test_edges():
    assert privacy.rdp(1.0, 0.0, 100, [2, 3.5]) == [0.0, 0.0]
    assert privacy.rdp(2.0, 1.0, 3, [2]) == [3 * 2 / (2 * 2.0**2)]  # no sampling: the Gaussian mechanism
    assert privacy.epsilon(0.0, 0.1, 1, 1e-5) == float("inf")
    with pytest.raises(ValueError, match="delta"):
        privacy.epsilon(1.0, 0.1, 1, 0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        privacy.rdp(1.0, 1.5, 1)
