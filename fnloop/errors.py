"""Exceptions raised by fnloop.

Every error a user can meet is an :class:`FnloopError`; its message names the flag, file,
key path or step involved and says what to do.
"""

from __future__ import annotations

__all__ = ["FnloopError", "ConfigError", "TreeMismatchError", "StepError", "CheckpointError"]


class FnloopError(Exception):
    """Base class of every error raised by fnloop."""


class ConfigError(FnloopError, ValueError, TypeError):
    """A flag, option or argument has a value (or a type) fnloop does not accept; it is also a
    ``ValueError`` and a ``TypeError``, so code written against Python's conventions catches it."""


class TreeMismatchError(FnloopError, ValueError):
    """Two pytrees that must have the same structure do not (the message lists key paths)."""


class StepError(FnloopError, RuntimeError):
    """A step received inputs it cannot work with (bad loss, wrong device, ...)."""


class CheckpointError(FnloopError, OSError):
    """A checkpoint cannot be written or read; the message names the file and the reason."""
