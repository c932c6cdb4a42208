"""OS signals turned into a stop request that the fit loop reads at step boundaries.

During ``fit``, SIGTERM and SIGUSR1 (configurable) ask the loop to finish the current step,
save a checkpoint and return with status ``interrupted``. A first SIGINT does the same; a
second raises ``KeyboardInterrupt`` at once, except inside a step that updates a donated state
in place, where it is raised as soon as that step returns (the state is then consistent). Handlers are installed only in the main thread and
the previous ones are restored when the block exits.

Example:
    >>> import fnloop as fl
    >>> with fl.connectors.signals.stop_signals() as sig:
    ...     sig.requested
    False
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from fnloop.errors import ConfigError

__all__ = ["StopRequest", "stop_signals", "check_stop_signals", "last_received", "DEFAULT_SIGNALS"]

DEFAULT_SIGNALS: tuple[int, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None
)


_last_received: list[int | None] = [None]
_UNCATCHABLE = {getattr(signal, n) for n in ("SIGKILL", "SIGSTOP") if hasattr(signal, n)}


def check_stop_signals(signals: Any) -> tuple[int, ...] | None:
    """``signals`` as a tuple of signal numbers, or raise :class:`ConfigError` naming the bad entry.

    Example:
        >>> check_stop_signals(["SIGTERM", 10])
        (<Signals.SIGTERM: 15>, <Signals.SIGUSR1: 10>)
    """
    if signals is None:
        return None
    if isinstance(signals, (str, bytes)) or not isinstance(signals, Sequence):
        raise ConfigError(f"Trainer(stop_signals={signals!r}): accepted values are a list of signals (e.g. [signal.SIGTERM]) or None")
    out = []
    for i, value in enumerate(signals):
        try:
            if isinstance(value, bool):
                raise ValueError
            sig = signal.Signals[value] if isinstance(value, str) else signal.Signals(value)
        except (KeyError, ValueError, TypeError):
            sig = None
        if sig is None or sig in _UNCATCHABLE:
            raise ConfigError(
                f"Trainer(stop_signals[{i}]={value!r}): not a signal this process can catch; use signal numbers or "
                "names such as signal.SIGTERM, 'SIGUSR1'"
            )
        out.append(sig)
    return tuple(out)


def last_received() -> int | None:
    """The first stop signal received inside the latest ``stop_signals`` block of this process
    (the latest ``fit``), or None; a command line turns it into its exit code.

    Example:
        >>> with stop_signals():
        ...     pass
        >>> last_received() is None
        True
    """
    return _last_received[0]


class StopRequest:
    """Set by the handlers; ``signum`` is the first signal received."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self.sigints = 0
        self.defer = False  # set while a step updates the state in place: it must not be cut short
        self.deferred_interrupt = False

    def handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self.sigints += 1
            if self.sigints > 1:
                if self.defer:
                    self.deferred_interrupt = True
                else:
                    raise KeyboardInterrupt
        if self.signum is None:
            self.signum = _last_received[0] = signum
        self.requested = True


@contextlib.contextmanager
def stop_signals(signals: Sequence[int] | None = None) -> Iterator[StopRequest]:
    """Install stop handlers for ``signals`` (default SIGTERM, SIGUSR1, SIGINT) inside the block.

    Outside the main thread nothing is installed (the request never fires).
    """
    request = StopRequest()
    _last_received[0] = None
    chosen = DEFAULT_SIGNALS if signals is None else check_stop_signals(signals) or ()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {}
    try:
        for signum in chosen:
            previous[signum] = signal.signal(signum, request.handle)
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
