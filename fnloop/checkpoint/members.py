"""``ModelCheckpoint`` over a stacked state: the best checkpoints of each member.

With ``monitor`` and ``keep_best=k``, a fit of ``fl.stack(states)`` keeps, besides the checkpoints
of the whole stack (ranked by the mean over members, the plain ``monitor`` name), the k best
of every member by its own value (``<monitor>/member_<i>``), each member alone
(:func:`fnloop.members.member_state`) in ``<directory>/member_<i>/step-XXXXXXXX``: a checkpoint
of one state, which restores into ``fl.TrainState.create(model, tx)`` like any other, with the
member's metrics under the names a fit of it alone logs.

The bookkeeping is in the state (so a resumed fit decides as an uninterrupted one): the entry
``state.loop.callbacks["ModelCheckpoint/members"]`` holds ``{"members": [{"best_k": [[score,
step], ...]}, ...]}``, best first. A member that stopped (early stopping) saves nothing more.

Member i's best state back::

    best = checkpoint.restore_member(i, like=fl.TrainState.create(model, tx))
    # or, without the callback object:
    mgr = fl.CheckpointManager(f"{directory}/member_{i}", keep_best=k, monitor="val/loss")
    best = mgr.restore("best", like=fl.TrainState.create(model, tx))

Example:
    >>> import fnloop as fl
    >>> cb = fl.ModelCheckpoint("memory://doc/members", keep_best=2, monitor="val/loss")
    >>> MemberBest(cb.manager).directory(3)
    'memory://doc/members/member_3'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fnloop.callbacks.base import callback_state, with_callback_state
from fnloop.checkpoint.manager import CheckpointManager, NonFiniteState
from fnloop.members import active, member_metrics, member_state, member_values

__all__ = ["MemberBest", "RECORD_KEY"]

RECORD_KEY = "ModelCheckpoint/members"
"""The entry of ``state.loop.callbacks`` with each member's best ``[score, step]`` pairs."""


class MemberBest:
    """The per-member best-k checkpoints of a :class:`CheckpointManager` with ``monitor`` and ``keep_best``."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.parent = manager
        self.monitor = manager.monitor
        self.mode = manager._keep_policy.mode
        self.keep = manager._keep_policy.keep_best
        self._managers: dict[int, CheckpointManager] = {}

    @property
    def enabled(self) -> bool:
        return self.monitor is not None and self.keep is not None

    def directory(self, i: int) -> str:
        """The folder of member i's best checkpoints."""
        return f"{self.parent.directory}/member_{i}"

    def manager(self, i: int) -> CheckpointManager:
        """Member i's manager (it keeps the ``keep_best`` best by ``monitor``)."""
        if i not in self._managers:
            folder = self.directory(i)
            self._managers[i] = CheckpointManager(folder, keep_best=self.keep, monitor=self.monitor, mode=self.mode)
        return self._managers[i]

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def update(self, state: Any, metrics: Mapping[str, float]) -> Any:
        """After a validation: save each training member whose value enters its k best; the
        state with the updated records (unchanged when the metrics have no member values)."""
        n = int(state.step.shape[0])
        values = member_values(metrics, self.monitor, n) if self.enabled else None
        if values is None:
            return state
        mask = active(state) or [True] * n
        records = [dict(r) for r in callback_state(state, RECORD_KEY, {"members": [{"best_k": []}] * n})["members"]]
        step = state.loop.global_step
        for i, value in enumerate(values):
            best = [list(p) for p in records[i]["best_k"] if p[1] != step]  # a new save at a step replaces the old
            if not mask[i] or not math.isfinite(value):
                continue
            if len(best) >= self.keep and not self._better(value, best[-1][0]):
                continue
            try:
                alone, its_metrics = member_state(state, i), member_metrics(metrics, i)
                self.manager(i).save(alone, metrics=its_metrics, step=step, epoch=state.loop.epoch)
            except NonFiniteState:  # this member diverged: its finite checkpoints stay
                continue
            best.append([value, step])
            best.sort(key=lambda p: p[0], reverse=self.mode == "max")  # stable: the earlier of equal scores first
            records[i] = {"best_k": best[: self.keep]}
        return with_callback_state(state, RECORD_KEY, {"members": records})
