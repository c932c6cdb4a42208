"""Checkpoints: save and restore whole training states on any fsspec URL, and manage a folder of them.

Example:
    >>> import torch
    >>> from fnloop.checkpoint import save, restore
    >>> url = save({"w": torch.ones(2)}, "memory://doc/package-example", overwrite=True)
    >>> restore(url, like={"w": torch.zeros(2)})["w"]
    tensor([1., 1.])
"""

from __future__ import annotations

from fnloop.checkpoint.format import FORMAT as FORMAT
from fnloop.checkpoint.format import FORMAT_VERSION as FORMAT_VERSION
from fnloop.checkpoint.format import read_meta as read_meta
from fnloop.checkpoint.format import restore as restore
from fnloop.checkpoint.format import restore_params as restore_params
from fnloop.checkpoint.format import restore_weights as restore_weights
from fnloop.checkpoint.format import save as save
from fnloop.checkpoint.manager import CheckpointManager as CheckpointManager

__all__ = [
    "CheckpointManager",
    "FORMAT",
    "FORMAT_VERSION",
    "read_meta",
    "restore",
    "restore_params",
    "restore_weights",
    "save",
]
from fnloop.checkpoint.callback import ModelCheckpoint as ModelCheckpoint
from fnloop.checkpoint.callback import resume_from as resume_from
