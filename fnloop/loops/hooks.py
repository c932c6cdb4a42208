"""Calling the callbacks' hooks: in order, each one seeing the state the previous one returned.

Only the callbacks that override a hook are called for it (resolved once per hook name), so a
hook nobody uses costs one dictionary look-up per batch.

Example:
    >>> import fnloop as fl
    >>> class Count(fl.Callback):
    ...     def on_train_epoch_start(self, state):
    ...         return state + 1
    >>> hooks = Hooks([Count(), fl.Callback(), Count()])
    >>> hooks("on_train_epoch_start", 0), hooks.wants("on_fit_start")
    (2, False)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from fnloop.callbacks.base import Callback
from fnloop.errors import StepError

__all__ = ["Hooks", "guarded"]


def _overrides(cb: Any, name: str) -> bool:
    own = getattr(type(cb), name, None)
    return own is not None and own is not getattr(Callback, name, None)


class Hooks:
    """The callbacks of one stage, called hook by hook.

    Args:
        callbacks: the callbacks, in the order their hooks run.
    """

    def __init__(self, callbacks: Sequence[Any]) -> None:
        self.callbacks = list(callbacks)
        self._by_name: dict[str, list[Any]] = {}

    def overriding(self, name: str) -> list[Any]:
        """The callbacks that override hook ``name``, in order (resolved once)."""
        found = self._by_name.get(name)
        if found is None:
            found = self._by_name[name] = [cb for cb in self.callbacks if _overrides(cb, name)]
        return found

    def wants(self, name: str) -> bool:
        """Whether any callback overrides hook ``name``.

        Example:
            >>> Hooks([]).wants("on_train_batch_start")
            False
        """
        return bool(self.overriding(name))

    def __call__(self, name: str, state: Any, *args: Any) -> Any:
        """Call hook ``name`` of every callback that has it; a returned state replaces the current one.

        Example:
            >>> Hooks([])("on_fit_start", "s")
            's'
        """
        for cb in self.overriding(name):
            out = getattr(cb, name)(state, *args)
            if out is not None:
                if not isinstance(out, type(state)):
                    raise StepError(
                        f"{type(cb).__name__}.{name} returned a {type(out).__name__}; a hook returns the state "
                        f"(a {type(state).__name__}, e.g. state.replace(...)) or None"
                    )
                state = out
        return state

    def notify(self, name: str, *args: Any) -> None:
        """Call hook ``name`` for its effects only (``on_exception``, ``on_log``); results are ignored.

        Example:
            >>> Hooks([]).notify("on_log", {"loss": 1.0}, 3)
        """
        for cb in self.overriding(name):
            getattr(cb, name)(*args)

    def save_metadata(self, state: Any, metadata: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint metadata after every ``on_save_checkpoint(state, metadata)``: each
        callback may return a new dict (None keeps it).

        Example:
            >>> Hooks([]).save_metadata(None, {"val/loss": 0.5})
            {'val/loss': 0.5}
        """
        for cb in self.overriding("on_save_checkpoint"):
            out = cb.on_save_checkpoint(state, dict(metadata))
            if out is not None:
                metadata = dict(out)
        return metadata

    @contextlib.contextmanager
    def on_failure(self, state: Any) -> Iterator[None]:
        """Inside the block, an exception calls ``on_exception(state, exc)`` and propagates.

        Example:
            >>> with Hooks([]).on_failure(None):
            ...     pass
        """
        try:
            yield
        except BaseException as exc:
            self.on_exception(state, exc)
            raise

    def on_exception(self, state: Any, exc: BaseException) -> None:
        """Every ``on_exception(state, exc)``, each one run even when one before it fails; such a
        failure is logged and noted on ``exc`` (the error to report stays the original).

        Example:
            >>> Hooks([]).on_exception(None, ValueError("x"))
        """
        for cb in self.overriding("on_exception"):
            guarded(exc, f"{type(cb).__name__}.on_exception", cb.on_exception, state, exc)


def guarded(exc: BaseException, what: str, fn: Any, *args: Any) -> None:
    """``fn(*args)`` while handling ``exc``: an error it raises is logged and noted on ``exc``.

    Example:
        >>> err = ValueError("first")
        >>> guarded(err, "cleanup", int, "x"); "cleanup raised" in err.__notes__[0]
        True
    """
    try:
        fn(*args)
    except Exception as err:  # the original error is the one to report
        note = f"fnloop: while handling this error, {what} raised {err!r}"
        logging.getLogger("fnloop").error(note)
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(note)
