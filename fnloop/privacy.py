"""Privacy accounting of DP-SGD with Rényi differential privacy (RDP).

A DP-SGD step is the sampled Gaussian mechanism: each example enters the batch with probability
``sample_rate`` (q), per-example gradients are clipped to norm C and Gaussian noise of standard
deviation ``noise_multiplier * C`` (sigma C) is added to their sum. Its RDP of order alpha
(Mironov, Talwar and Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
2019) is ``log(A_alpha) / (alpha - 1)``, where for an integer alpha

    A_alpha = sum_{k=0..alpha} binom(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2))

and for a fractional alpha A_alpha is the sum of two convergent series with erfc factors
(section 3.3 of the paper), split at z0 = sigma^2 log(1/q - 1) + 1/2. RDP adds up over steps,
and converts to (epsilon, delta)-DP with the bound of Balle et al. (2020), minimised over orders:

    epsilon = rdp(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1)

Everything is computed in log space with Python floats (no tensors, no host sync in a step).

Example:
    >>> round(epsilon(noise_multiplier=1.1, sample_rate=256 / 60000, steps=60 * 234, delta=1e-5), 2)
    2.59
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

__all__ = ["DEFAULT_ORDERS", "rdp", "epsilon", "epsilon_from_rdp"]

DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
"""The orders alpha the bound is minimised over: 1.1 to 10.9 by 0.1, then 12 to 63."""

_NEG_INF = -math.inf


def _log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b))."""
    hi, lo = max(a, b), min(a, b)
    return hi if lo == _NEG_INF else hi + math.log1p(math.exp(lo - hi))


def _log_erfc(x: float) -> float:
    """log(erfc(x)), also where erfc underflows (asymptotic series for large x)."""
    if x < 25.0:
        return math.log(math.erfc(x))
    inv = 1.0 / (2.0 * x * x)
    series = 1.0 - inv + 3.0 * inv**2 - 15.0 * inv**3 + 105.0 * inv**4
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log(series)


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    log_a = _NEG_INF
    log_binom = 0.0  # log binom(alpha, k), built up term by term
    for k in range(alpha + 1):
        if k:
            log_binom += math.log(alpha - k + 1) - math.log(k)
        term = log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_fraction(q: float, sigma: float, alpha: float) -> float:
    """The two series of a fractional order, summed with their signs in log space until the
    terms no longer change the sum."""
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    pos, neg = _NEG_INF, _NEG_INF  # log of the sums of the positive and of the negative terms
    log_binom, sign = 0.0, 1.0  # log |binom(alpha, i)| and its sign
    i = 0
    while True:
        if i:
            factor = alpha - i + 1
            log_binom += math.log(abs(factor)) - math.log(i)
            sign = sign if factor > 0 else -sign
        j = alpha - i
        first = log_binom + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
        first += math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        second = log_binom + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma**2)
        second += math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        term = _log_add(first, second)
        if sign > 0:
            pos = _log_add(pos, term)
        else:
            neg = _log_add(neg, term)
        i += 1
        if i > alpha + 1 and term < max(pos, neg) - 30:  # past the peak and below 1e-13 of the sum
            break
    return pos + math.log1p(-math.exp(neg - pos)) if neg != _NEG_INF else pos


@functools.lru_cache(maxsize=4096)
def _rdp_one(q: float, sigma: float, alpha: float) -> float:
    """The RDP of one step at one order (the series are slow to sum: remembered)."""
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer():
        return _log_a_integer(q, sigma, int(alpha)) / (alpha - 1)
    return _log_a_fraction(q, sigma, alpha) / (alpha - 1)


def rdp(noise_multiplier: float, sample_rate: float, steps: int, orders: Sequence[float] = DEFAULT_ORDERS) -> list[float]:
    """The RDP of ``steps`` steps of the sampled Gaussian mechanism, one value per order.

    Example:
        >>> rdp(1.0, 1.0, 1, orders=[2, 3])
        [1.0, 1.5]
    """
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"rdp: sample_rate must be in [0, 1], got {sample_rate!r}")
    if noise_multiplier < 0:
        raise ValueError(f"rdp: noise_multiplier must be >= 0, got {noise_multiplier!r}")
    return [_rdp_one(sample_rate, noise_multiplier, a) * steps for a in orders]


def epsilon_from_rdp(rdps: Sequence[float], delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """The smallest epsilon over ``orders`` at ``delta`` for these RDP values.

    Example:
        >>> round(epsilon_from_rdp([1.0, 1.5], 1e-5, orders=[2, 3]), 3)
        6.302
    """
    if not 0 < delta < 1:
        raise ValueError(f"epsilon: delta must be in (0, 1), got {delta!r}")
    best = math.inf
    for a, r in zip(orders, rdps):
        eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if not math.isnan(eps):
            best = min(best, eps)
    return best


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """Epsilon at ``delta`` after ``steps`` DP-SGD steps with this noise and sampling rate.

    Example:
        >>> epsilon(noise_multiplier=0.0, sample_rate=0.01, steps=10, delta=1e-5)
        inf
    """
    return epsilon_from_rdp(rdp(noise_multiplier, sample_rate, steps, orders), delta, orders)
