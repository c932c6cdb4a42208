"""A folder of checkpoints named by step: when to save, what to keep, saving in the background.

Example:
    >>> import torch
    >>> from fnloop.checkpoint import CheckpointManager
    >>> with CheckpointManager("memory://doc/manager-example", keep_last=2) as mgr:
    ...     for step in (1, 2, 3):
    ...         _ = mgr.save({"w": torch.full((2,), float(step))}, step=step)
    ...     [u.rsplit("/", 1)[1] for u in mgr.all()]
    ['step-00000002', 'step-00000003']
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import torch

from fnloop.checkpoint import _fs, _leaves, _policy, _sharded
from fnloop.checkpoint._background import BackgroundWriter
from fnloop.execution import pin
from fnloop.state import TrainState
from fnloop.checkpoint.format import META_FILE, non_finite, read_meta, restore, write
from fnloop.errors import CheckpointError, ConfigError, FnloopError

__all__ = ["CheckpointManager", "NonFiniteState"]


class NonFiniteState(CheckpointError):
    """``CheckpointManager.save`` refused a state holding nan or inf (``save_non_finite=False``)."""


def _positive(name: str, value: Any, kind: type = int) -> None:
    ok = value is None or (
        isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value > 0
    )
    if not ok:
        what = "a positive number of seconds" if kind is float else "a positive integer"
        raise ConfigError(f"CheckpointManager({name}={value!r}): must be None or {what}")


class CheckpointManager:
    """Save, list, prune and restore the checkpoints in ``directory_url``, one subfolder per step.

    Args:
        directory_url: a path or fsspec URL; subfolders are named ``filename.format(step=...)``.
        keep_last: keep the newest n checkpoints.
        keep_best: keep the n best by ``monitor`` (read from each checkpoint's ``meta.json`` metrics).
        keep_every_n_steps: keep checkpoints whose step is a multiple of n.
            A checkpoint survives if any keep rule holds; with no rule set, all are kept;
            the newest is never deleted. Pruning runs after each successful save.
        monitor: the metric name ``best()`` and ``keep_best`` rank by.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        every_n_steps, every_n_epochs, every_n_seconds: triggers of :meth:`should_save`.
        save_last: :meth:`should_save` with ``final=True`` answers True (save at the end).
        async_save: ``save`` returns at once; one background thread writes. A ``TrainState``
            is written from its own tensors (no copy: a state is immutable, and a donated step on
            a state being written runs its pure path instead of updating it in place); other
            trees are copied first. One save in flight at most; a background error is raised by
            the next ``save``, ``wait`` or ``close``.
        filename: the folder name template, with one ``{step}`` field.
        save_non_finite: save nan/inf states too.

    ``save`` refuses a state whose params or optimizer state hold nan or inf (a
    :class:`NonFiniteState` error, unless ``save_non_finite``), so the last checkpoint stays a
    finite one; pruning never deletes the newest finite checkpoint.
    Stale temporary folders left by a crashed save are removed at construction; a folder
    without ``meta.json`` is never listed. One writing process per directory is assumed.

    Example:
        >>> mgr = CheckpointManager("memory://doc/manager-args", keep_best=1, monitor="loss")
        >>> _ = mgr.save({"w": torch.zeros(1)}, step=1, metrics={"loss": 0.3})
        >>> _ = mgr.save({"w": torch.ones(1)}, step=2, metrics={"loss": 0.9})
        >>> mgr.best().endswith("step-00000001"); mgr.close()
        True
    """

    def __init__(
        self,
        directory_url: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        keep_every_n_steps: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        every_n_seconds: float | None = None,
        save_last: bool = True,
        async_save: bool = False,
        filename: str = "step-{step:08d}",
        save_non_finite: bool = False,
    ) -> None:
        counts = {
            "keep_last": keep_last,
            "keep_best": keep_best,
            "keep_every_n_steps": keep_every_n_steps,
            "every_n_steps": every_n_steps,
            "every_n_epochs": every_n_epochs,
        }
        for name, value in counts.items():
            _positive(name, value)
        _positive("every_n_seconds", every_n_seconds, float)
        if not isinstance(save_non_finite, bool):
            raise ConfigError(f"CheckpointManager(save_non_finite={save_non_finite!r}): accepted values are True or False")
        self.save_non_finite = save_non_finite
        if mode not in ("min", "max"):
            raise ConfigError(f"CheckpointManager(mode={mode!r}): must be 'min' or 'max'")
        if monitor is not None and not isinstance(monitor, str):
            raise ConfigError(f"CheckpointManager(monitor={monitor!r}): must be a metric name (str)")
        if keep_best is not None and monitor is None:
            raise ConfigError("CheckpointManager(keep_best=...): needs monitor='<metric name>' to rank checkpoints")
        self.directory = os.fspath(directory_url).rstrip("/") or "/"
        self.monitor = monitor
        self.async_save = bool(async_save)
        self._format_name, self._parse_name = _policy.name_codec(filename)
        self._save_policy = _policy.SavePolicy(every_n_steps, every_n_epochs, every_n_seconds, bool(save_last))
        self._keep_policy = _policy.KeepPolicy(keep_last, keep_best, keep_every_n_steps, mode)
        self._fs, self._path = _fs.resolve(self.directory)
        if _fs.is_local(self._fs):
            _fs.remove_stale_tmp(self._path)
        self._metrics: dict[str, tuple[float | None, bool]] = {}
        self._background = BackgroundWriter() if self.async_save else None
        self._closed = False
        listed = self._list()
        self._last = _policy.LastSave(step=listed[-1][0] if listed else None, time=time.monotonic())

    # --- decisions -------------------------------------------------------------------
    @property
    def last_saved_step(self) -> int | None:
        """Step of the last save (of this manager, or the newest checkpoint found at construction)."""
        return self._last.step

    @property
    def last_save_time(self) -> float:
        """``time.monotonic()`` of the last save (construction time before the first one)."""
        return self._last.time

    def should_save(
        self, step: int, epoch: int | None = None, now: float | None = None, *, final: bool = False
    ) -> bool:
        """Whether the save triggers ask for a save at ``step``; pure, nothing is recorded.

        Args:
            step: the step about to be saved.
            epoch: epochs completed so far (``LoopState.epoch`` once the driver advanced it).
            now: ``time.monotonic()`` by default.
            final: training ended (answers ``save_last``).

        Example:
            >>> mgr = CheckpointManager("memory://doc/should-save", every_n_steps=10)
            >>> mgr.should_save(10), mgr.should_save(11)
            (True, False)
        """
        now = time.monotonic() if now is None else now
        return _policy.save_due(self._save_policy, self._last, int(step), epoch, now, final=final)

    # --- listing ---------------------------------------------------------------------
    def _url(self, name: str) -> str:
        return _fs.join_url(self.directory, name)

    def _list(self) -> list[tuple[int, str]]:
        found = []
        for name in _fs.list_names(self._fs, self._path):
            step = None if name.startswith(_fs.TMP_PREFIX) else self._parse_name(name)
            if step is not None and self._fs.exists(f"{self._path}/{name}/{META_FILE}"):
                found.append((step, name))
        return sorted(found)

    def all(self) -> list[str]:
        """URLs of every committed checkpoint, sorted by step.

        Example:
            >>> CheckpointManager("memory://doc/empty-dir").all()
            []
        """
        return [self._url(name) for _, name in self._list()]

    def latest(self) -> str | None:
        """URL of the checkpoint with the highest step, or None.

        Example:
            >>> CheckpointManager("memory://doc/empty-dir").latest() is None
            True
        """
        listed = self._list()
        return self._url(listed[-1][1]) if listed else None

    def _info(self, name: str) -> tuple[float | None, bool]:
        """``(monitored value, finite)`` from the checkpoint's ``meta.json``, read once."""
        if name not in self._metrics:
            try:
                meta = read_meta(self._url(name))
                value, finite = meta["metrics"].get(self.monitor), meta.get("finite", True) is not False
            except CheckpointError as err:  # a damaged sibling is skipped, not fatal to the others
                warnings.warn(f"CheckpointManager: skipping a damaged checkpoint: {err}", UserWarning, stacklevel=3)
                value, finite = None, False
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            self._metrics[name] = (float(value) if ok else None, finite)
        return self._metrics[name]

    def _checkpoints(self) -> list[_policy.Checkpoint]:
        return [_policy.Checkpoint(s, n, *self._info(n)) for s, n in self._list()]

    def best(self) -> str | None:
        """URL of the best checkpoint by ``monitor`` and ``mode``, or None if none has the metric.

        Example:
            >>> CheckpointManager("memory://doc/empty-dir", monitor="loss").best() is None
            True
        """
        if self.monitor is None:
            raise ConfigError("CheckpointManager.best(): needs monitor='<metric name>' at construction")
        ranked = _policy.rank_best(self._checkpoints(), self._keep_policy.mode)
        return self._url(ranked[0]) if ranked else None

    # --- saving ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise FnloopError(f"CheckpointManager({self.directory!r}) is closed; create a new one")

    def _write(self, tree: Any, name: str, metrics: dict[str, Any], finite: bool | None) -> None:
        write(tree, self._url(name), metrics=metrics, overwrite=True, finite=finite)
        self._metrics.pop(name, None)
        if _sharded.is_follower(tree):  # a sharded save: rank 0 prunes
            return
        keep = self._keep_policy
        pruning = (keep.keep_last, keep.keep_best, keep.keep_every_n_steps) != (None, None, None)
        for doomed in _policy.to_delete(self._checkpoints() if pruning else [], keep, protect=name):
            _fs.remove_tree(self._fs, f"{self._path}/{doomed}", marker=META_FILE)
            self._metrics.pop(doomed, None)

    def save(
        self,
        state: Any,
        *,
        metrics: dict[str, Any] | None = None,
        step: int | None = None,
        epoch: int | None = None,
    ) -> str:
        """Save ``state`` as the checkpoint of ``step`` (default ``int(state.step)``); return its URL.

        A checkpoint already at that step is replaced. With ``async_save`` the call returns at
        once. A ``TrainState`` is written as it is (no copy): fnloop never writes into its tensors
        meanwhile (a donated step on that state runs its pure path instead), and neither should
        you. Any other tree is copied first, so its owner may change it after the call.

        Args:
            state: a ``TrainState`` or any pytree.
            metrics: numbers stored in ``meta.json`` (``monitor`` is read from them).
            step: the step; required when ``state`` has no integer ``step``.
            epoch: epochs completed, recorded for ``every_n_epochs`` (default ``state.loop.epoch``).

        Example:
            >>> mgr = CheckpointManager("memory://doc/save-step")
            >>> mgr.save({"w": torch.zeros(1)}, step=5).rsplit("/", 1)[1]
            'step-00000005'
        """
        self._check_open()
        self.wait()
        if step is None:
            step = getattr(state, "step", None)
            if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
                step = int(step)
            if not isinstance(step, int) or isinstance(step, bool):
                raise ConfigError("CheckpointManager.save(step=...): this state has no integer `step`; pass step=")
        if epoch is None:
            epoch = getattr(getattr(state, "loop", None), "epoch", None)
        name = self._format_name(int(step))
        plain = _leaves.decode_metrics(_leaves.encode_metrics(metrics))
        tensors, _, _ = _leaves.split(state, self._url(name))
        bad = [] if self.save_non_finite else non_finite(state, tensors)
        if bad:
            raise NonFiniteState(
                f"{self._url(name)}: not saved, the state at step {step} holds nan or inf in {bad}; the latest "
                f"checkpoint ({self.latest() or 'none yet'}) stays the newest finite one. Pass "
                "CheckpointManager(save_non_finite=True) to save such states"
            )
        finite = None if self.save_non_finite else True  # checked just now; else the writer checks
        last = _policy.LastSave(step=int(step), epoch=epoch, time=time.monotonic())
        if self._background is None or _sharded.is_sharded(state):  # every rank saves a sharded state together
            self._write(state, name, plain, finite)
            self._last = last
            return self._url(name)
        self._last = last
        if isinstance(state, TrainState):  # immutable: written as it is, kept from in-place updates
            self._background.submit(self._write_pinned, state, pin(state), name, plain, finite)
        else:  # any other tree may be changed in place by its owner: copied first
            self._background.submit(self._write, self._background.snapshot(state), name, plain, finite)
        return self._url(name)

    def _write_pinned(self, state: Any, unpin: Any, name: str, metrics: dict[str, Any], finite: bool | None) -> None:
        try:
            self._write(state, name, metrics, finite)
        finally:
            unpin()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written; raise its error if it failed.

        Example:
            >>> CheckpointManager("memory://doc/wait", async_save=True).wait()
        """
        if self._background is not None:
            self._background.wait()

    def close(self) -> None:
        """Finish the save in flight (raising its error), stop the thread and free the copy buffers.

        Example:
            >>> CheckpointManager("memory://doc/close").close()
        """
        try:
            if self._background is not None:
                self._background.close()
        finally:
            self._closed = True

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- restoring -------------------------------------------------------------------
    def resolve(self, which: str | int = "last") -> str:
        """URL of ``"last"``/``"latest"``, ``"best"``, a step number, or a URL (returned as is).

        Example:
            >>> CheckpointManager("memory://doc/resolve").resolve(3).rsplit("/", 1)[1]
            'step-00000003'
        """
        if isinstance(which, int) and not isinstance(which, bool):
            return self._url(self._format_name(which))
        which = os.fspath(which)
        if which in ("last", "latest", "best"):
            self.wait()
            url = self.best() if which == "best" else self.latest()
            if url is None:
                found = len(self.all())
                raise CheckpointError(f"{self.directory}: no {which!r} checkpoint here ({found} checkpoints found)")
            return url
        return which

    def restore(self, which: str | int = "last", like: Any = None, *, map_location: Any = None) -> Any:
        """Restore ``"last"``, ``"best"``, a step or a URL into a tree shaped like ``like``.

        Example:
            >>> mgr = CheckpointManager("memory://doc/restore-last")
            >>> _ = mgr.save({"w": torch.ones(1)}, step=1)
            >>> mgr.restore("last", like={"w": torch.zeros(1)})
            {'w': tensor([1.])}
        """
        self.wait()
        return restore(self.resolve(which), like, map_location=map_location)
