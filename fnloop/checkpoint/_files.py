"""What every checkpoint writer shares: refusing to replace what it should not, writing a tensor
file with its checksum, encoding ``meta.json``.

Example:
    >>> encode_meta({"step": 1}).decode().splitlines()[1:3]
    [' "step": 1,', ' "meta_checksum": "xxh3_128:35df05822a140f87e1042a6e8647677a"']
"""

from __future__ import annotations

import json
from typing import Any

import torch

from fnloop.checkpoint import _safetensors
from fnloop.checkpoint._checksum import ALGORITHM, for_stream
from fnloop.checkpoint._read import STATE_NAME
from fnloop.checkpoint._seal import seal
from fnloop.errors import CheckpointError

__all__ = ["refuse_existing", "write_state", "encode_meta"]


def refuse_existing(exists_meta: bool, names: list[str], url: str, overwrite: bool) -> None:
    """Raise unless ``overwrite`` or the folder at ``url`` (holding ``names``) may be written."""
    if overwrite:
        return
    if exists_meta:
        raise CheckpointError(
            f"{url}: a checkpoint already exists here; pass overwrite=True to replace it or pick another URL"
        )
    other = [n for n in names if not STATE_NAME.fullmatch(n)]
    if other:
        raise CheckpointError(
            f"{url}: the folder exists and is not a checkpoint (it holds {sorted(other)[:5]}); "
            "pass overwrite=True to replace it or pick another URL"
        )


def write_state(out: _safetensors.Writable, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the tensor file to ``out``, recording its checksum and length in ``meta``."""
    checksum = for_stream(ALGORITHM, sum(t.numel() * t.element_size() for t in tensors.values()))
    try:
        meta["state_bytes"] = _safetensors.write(out, tensors, checksum)
        meta["checksum"] = checksum.digest()
    finally:
        checksum.close()


def encode_meta(meta: dict[str, Any]) -> bytes:
    """``meta.json``'s bytes, sealed with its own checksum (``meta_checksum``)."""
    seal(meta)
    return json.dumps(meta, indent=1, allow_nan=False, ensure_ascii=False).encode("utf-8")
