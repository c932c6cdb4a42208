"""Pure decisions of a checkpoint manager: when to save, which checkpoints to keep, folder names.

Example:
    >>> from fnloop.checkpoint._policy import SavePolicy, LastSave, save_due
    >>> save_due(SavePolicy(every_n_steps=100), LastSave(step=100), step=200)
    True
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Callable, Sequence

from fnloop.errors import ConfigError

__all__ = ["SavePolicy", "LastSave", "KeepPolicy", "Checkpoint", "save_due", "rank_best", "to_delete", "name_codec"]


@dataclasses.dataclass(frozen=True)
class SavePolicy:
    """When a manager saves: every n steps, every n completed epochs, every n seconds, at the end."""

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    every_n_seconds: float | None = None
    save_last: bool = True


@dataclasses.dataclass(frozen=True)
class LastSave:
    """What the previous save was: its step, completed-epoch count and monotonic time."""

    step: int | None = None
    epoch: int | None = None
    time: float = 0.0


@dataclasses.dataclass(frozen=True)
class KeepPolicy:
    """Which checkpoints survive: the last n, the best n by the monitored metric, multiples of n steps."""

    keep_last: int | None = None
    keep_best: int | None = None
    keep_every_n_steps: int | None = None
    mode: str = "min"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint as the policies see it: step, folder name, monitored value."""

    step: int
    name: str
    metric: float | None = None
    finite: bool = True


def save_due(
    policy: SavePolicy,
    last: LastSave,
    step: int,
    epoch: int | None = None,
    now: float = 0.0,
    *,
    final: bool = False,
) -> bool:
    """Whether a save is due at ``step`` (``epoch`` = epochs completed, ``now`` = monotonic seconds).

    Never twice at the same step. ``final=True`` (the end of training) saves iff ``save_last``.
    Step and epoch triggers fire on multiples (> 0), so they do not drift on resume; the time
    trigger fires once ``every_n_seconds`` have passed since the last save.

    Example:
        >>> save_due(SavePolicy(every_n_epochs=2), LastSave(), step=7, epoch=2)
        True
    """
    if last.step is not None and step == last.step:
        return False
    if final:
        return policy.save_last
    n = policy.every_n_steps
    if n and step > 0 and step % n == 0:
        return True
    n = policy.every_n_epochs
    if n and epoch is not None and epoch > 0 and epoch % n == 0 and epoch != last.epoch:
        return True
    seconds = policy.every_n_seconds
    return bool(seconds and now - last.time >= seconds)


def rank_best(checkpoints: Sequence[Checkpoint], mode: str) -> list[str]:
    """Names of the checkpoints with a monitored value, best first (ties: the later step first).

    Missing and nan values are left out.

    Example:
        >>> rank_best([Checkpoint(1, "a", 0.5), Checkpoint(2, "b", 0.2), Checkpoint(3, "c")], "min")
        ['b', 'a']
    """
    sign = 1.0 if mode == "min" else -1.0
    scored = [c for c in checkpoints if c.metric is not None and not math.isnan(c.metric)]
    scored.sort(key=lambda c: (sign * c.metric, -c.step))  # type: ignore[operator]
    return [c.name for c in scored]


def to_delete(checkpoints: Sequence[Checkpoint], policy: KeepPolicy, *, protect: str | None = None) -> list[str]:
    """Names of the checkpoints that no keep rule (last n, best n, multiple of n steps) protects.

    With no keep option set nothing is deleted. The newest checkpoint, the newest finite one
    (saved from a state without nan or inf) and ``protect`` (the one just written) are always kept.

    Example:
        >>> cks = [Checkpoint(s, f"s{s}") for s in (1, 2, 3, 4)]
        >>> to_delete(cks, KeepPolicy(keep_last=2, keep_every_n_steps=2))
        ['s1']
    """
    if policy.keep_last is None and policy.keep_best is None and policy.keep_every_n_steps is None:
        return []
    by_step = sorted(checkpoints, key=lambda c: c.step)
    keep = {protect} if protect is not None else set()
    if by_step:
        keep.add(by_step[-1].name)
    finite = [c for c in by_step if c.finite]
    if finite:
        keep.add(finite[-1].name)
    if policy.keep_last:
        keep.update(c.name for c in by_step[-policy.keep_last :])
    if policy.keep_best:
        keep.update(rank_best(by_step, policy.mode)[: policy.keep_best])
    if policy.keep_every_n_steps:
        keep.update(c.name for c in by_step if c.step % policy.keep_every_n_steps == 0)
    return [c.name for c in by_step if c.name not in keep]


def name_codec(filename: str) -> tuple[Callable[[int], str], Callable[[str], int | None]]:
    """``(format, parse)`` for a folder-name template holding one ``{step}`` field.

    Raises :class:`ConfigError` naming ``filename`` when the template cannot round-trip steps.

    Example:
        >>> fmt, parse = name_codec("step-{step:08d}")
        >>> fmt(42), parse("step-00000042"), parse(".tmp-x")
        ('step-00000042', 42, None)
    """
    try:
        pieces = list(string.Formatter().parse(filename))
    except ValueError as e:
        raise ConfigError(f"filename={filename!r}: not a format string ({e})") from None
    fields = [p[1] for p in pieces if p[1] is not None]
    if fields != ["step"]:
        raise ConfigError(f"filename={filename!r}: must hold exactly one '{{step}}' field, e.g. 'step-{{step:08d}}'")
    pattern = "".join(re.escape(lit) + ("([0-9]+)" if field is not None else "") for lit, field, _, _ in pieces)
    regex = re.compile(pattern + r"\Z")

    def fmt(step: int) -> str:
        return filename.format(step=step)

    def parse(name: str) -> int | None:
        m = regex.match(name)
        return int(m.group(1)) if m else None

    for probe in (0, 7, 12345, 10**9 + 3):
        try:
            name = fmt(probe)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"filename={filename!r}: cannot format step {probe} ({e})") from None
        if "/" in name or name.startswith(".") or parse(name) != probe:
            raise ConfigError(
                f"filename={filename!r}: gives {name!r} for step {probe}; use one folder name without '/' or a "
                "leading '.', whose step reads back as an integer, e.g. 'step-{step:08d}'"
            )
    return fmt, parse
