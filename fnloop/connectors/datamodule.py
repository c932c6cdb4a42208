"""Data modules: an object that builds the data of every stage (Lightning's ``LightningDataModule``).

A data module may define ``setup(stage)`` and any of ``train_data()``, ``val_data()``,
``test_data()`` and ``predict_data()``; Lightning's ``train_dataloader()`` etc. are accepted
when the fnloop name is missing, so an existing ``LightningDataModule`` works unchanged.

Example:
    >>> class Numbers:
    ...     def setup(self, stage):
    ...         self.data = [[1, 2], [3]]
    ...     def train_data(self):
    ...         return self.data
    >>> resolve_datamodule(Numbers(), "fit")
    {'train_data': [[1, 2], [3]]}
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

from fnloop.errors import ConfigError

__all__ = ["DataModule", "STAGE_DATA", "resolve_datamodule"]


class DataModule(Protocol):
    """Builds the data of each stage; every method is optional.

    Each ``*_data()`` returns anything :func:`fnloop.connectors.data.as_source` accepts.
    """

    def setup(self, stage: str) -> None: ...

    def train_data(self) -> Any: ...

    def val_data(self) -> Any: ...

    def test_data(self) -> Any: ...

    def predict_data(self) -> Any: ...


STAGE_DATA: dict[str, tuple[str, ...]] = {
    "fit": ("train_data", "val_data"),
    "validate": ("val_data",),
    "test": ("test_data",),
    "predict": ("predict_data",),
}
"""The data each stage asks for, by method name."""

_LIGHTNING_NAMES = {
    "train_data": "train_dataloader",
    "val_data": "val_dataloader",
    "test_data": "test_dataloader",
    "predict_data": "predict_dataloader",
}
_LIGHTNING_MODULES = ("lightning.", "pytorch_lightning.", "lightning_fabric.")
_SETUP_DONE: dict[int, set[str]] = {}


def _user_method(dm: Any, name: str) -> Any:
    """``dm.name`` when defined by the user (not a Lightning base-class placeholder), else None."""
    method = getattr(dm, name, None)
    if not callable(method):
        return None
    for klass in type(dm).__mro__:
        if name in vars(klass):
            if klass.__module__.startswith(_LIGHTNING_MODULES):
                return None
            break
    return method


def _setup_once(dm: Any, stage: str) -> None:
    setup = _user_method(dm, "setup")
    if setup is None:
        return
    key = id(dm)
    done = _SETUP_DONE.get(key)
    if done is None:
        try:
            weakref.finalize(dm, _SETUP_DONE.pop, key, None)
        except TypeError:  # not weak-referenceable: no way to remember it safely
            setup(stage)
            return
        done = _SETUP_DONE.setdefault(key, set())
    if stage not in done:
        setup(stage)
        done.add(stage)


def resolve_datamodule(dm: Any, stage: str) -> dict[str, Any]:
    """Call ``dm.setup(stage)`` (once per stage and data module) and collect that stage's data.

    Args:
        dm: the data module.
        stage: ``"fit"`` (train and val data), ``"validate"``, ``"test"`` or ``"predict"``.

    Returns:
        ``{"train_data": ..., "val_data": ...}`` with only the data the module provides (a
        method that is missing or returns None is left out).

    Example:
        >>> class Eval:
        ...     def val_dataloader(self):
        ...         return [[0.0]]
        >>> resolve_datamodule(Eval(), "validate")
        {'val_data': [[0.0]]}
    """
    if stage not in STAGE_DATA:
        raise ConfigError(
            f"resolve_datamodule: stage={stage!r} is not a stage; use one of "
            f"{', '.join(map(repr, STAGE_DATA))}."
        )
    _setup_once(dm, stage)
    found: dict[str, Any] = {}
    for name in STAGE_DATA[stage]:
        method = _user_method(dm, name) or _user_method(dm, _LIGHTNING_NAMES[name])
        if method is None:
            continue
        data = method()
        if data is not None:
            found[name] = data
    return found
