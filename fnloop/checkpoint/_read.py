"""Reading a checkpoint folder: the checked ``meta.json`` and the verified tensor file.

Example:
    >>> import torch
    >>> from fnloop.checkpoint import save
    >>> from fnloop.checkpoint._read import read_meta, load_tensors
    >>> url = save({"w": torch.ones(2)}, "memory://doc/read-example", overwrite=True)
    >>> meta = read_meta(url)
    >>> load_tensors(url, meta, verify=True)["w"]
    tensor([1., 1.])
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from fnloop.checkpoint import _fs, _leaves, _safetensors
from fnloop.errors import CheckpointError

__all__ = ["FORMAT", "FORMAT_VERSION", "STATE_FILE", "META_FILE", "read_meta", "load_tensors", "own"]

FORMAT = "fnloop-checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"


def _valid_entry(e: Any) -> bool:
    if not isinstance(e, dict) or not isinstance(e.get("path"), str):
        return False
    if e.get("kind") == "tensor":
        shape = e.get("shape")
        return (
            e.get("dtype") in _leaves.DTYPES_BY_NAME
            and isinstance(shape, list)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        )
    if e.get("kind") == "options":  # step options: their tensors are checked when rebuilt
        return isinstance(e.get("tensors"), list) and isinstance(e.get("key"), (list, type(None)))
    if e.get("kind") != "value" or "value" not in e:
        return False
    try:
        _leaves.decode_value(e["value"], e.get("type", ""))
    except ValueError:
        return False
    return True


def _check_meta(meta: Any, where: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{where}: not an fnloop checkpoint (format {found!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format_version {version!r} is not supported by this fnloop (it reads {FORMAT_VERSION}); "
            "use the fnloop version that wrote it (see fnloop_version in the file)"
        )
    sha, leaves = meta.get("sha256"), meta.get("leaves")
    if not isinstance(sha, str) or len(sha) != 64 or not isinstance(leaves, list):
        raise CheckpointError(f"{where}: malformed, 'sha256' must be a hex digest and 'leaves' a list")
    if not isinstance(meta.get("metrics", {}), dict) or not isinstance(meta.get("state_bytes", 0), int):
        raise CheckpointError(f"{where}: malformed, 'metrics' must be an object and 'state_bytes' an integer")
    for i, e in enumerate(leaves):
        if not _valid_entry(e):
            raise CheckpointError(f"{where}: malformed leaf entry leaves[{i}] = {e!r}; the checkpoint is damaged")
    return meta


def read_meta(url: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed and checked ``meta.json`` of the checkpoint at ``url`` (metrics decoded).

    Raises:
        CheckpointError: no folder, no ``meta.json`` (an unfinished save), malformed JSON,
            another format or an unknown ``format_version``.

    Example:
        >>> import torch
        >>> from fnloop.checkpoint import save
        >>> url = save({"w": torch.zeros(1)}, "memory://doc/meta-example", metrics={"loss": 0.5}, overwrite=True)
        >>> read_meta(url)["metrics"]
        {'loss': 0.5}
    """
    url = os.fspath(url)
    fs, path = _fs.resolve(url)
    where = _fs.join_url(url, META_FILE)
    try:
        raw = fs.cat_file(f"{path}/{META_FILE}")
    except FileNotFoundError:
        if fs.exists(f"{path}/{STATE_FILE}"):
            reason = "meta.json is missing, so the save never finished (a folder without meta.json is not a checkpoint)"
        elif fs.exists(path):
            reason = "the folder has no meta.json, so it is not a checkpoint"
        else:
            reason = "no checkpoint here (the folder does not exist)"
        raise CheckpointError(f"{url}: {reason}") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read ({e})") from e
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed JSON ({e}); the checkpoint is damaged") from e
    meta = _check_meta(meta, where)
    meta["metrics"] = _leaves.decode_metrics(meta.get("metrics", {}))
    return meta


def load_tensors(url: str, meta: dict[str, Any], verify: bool) -> dict[str, torch.Tensor]:
    """Every tensor of ``state.safetensors`` by key path, on CPU, after checking size and sha256.

    The tensors are views of one buffer holding the file. Nothing is unpickled: the header
    is JSON, the data raw bytes, and the hash is checked before the header is parsed.

    Example:
        >>> import torch
        >>> from fnloop.checkpoint import save
        >>> url = save({"n": torch.arange(2)}, "memory://doc/load-tensors", overwrite=True)
        >>> load_tensors(url, read_meta(url), verify=True)
        {'n': tensor([0, 1])}
    """
    fs, path = _fs.resolve(url)
    where = _fs.join_url(url, STATE_FILE)
    state_path = f"{path}/{STATE_FILE}"
    try:
        if _fs.is_local(fs):
            size = os.path.getsize(state_path)
            with open(state_path, "rb", buffering=0) as f:
                buf, digest = _safetensors.read_into(f.readinto, size, hash=verify)
        else:
            size = fs.size(state_path)
            with fs.open(state_path, "rb") as f:
                buf, digest = _safetensors.read_into(f.readinto, size, hash=verify)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing; the checkpoint is incomplete") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read ({e})") from e
    expected = meta.get("state_bytes")
    if expected and buf.numel() != expected:
        raise CheckpointError(f"{where}: truncated or replaced, {buf.numel()} bytes where meta.json records {expected}")
    if verify and digest != meta["sha256"]:
        raise CheckpointError(
            f"{where}: checksum mismatch (sha256 {digest[:16]}..., meta.json records {meta['sha256'][:16]}...); "
            "the file is corrupt or was replaced, restore another checkpoint"
        )
    tensors = _safetensors.parse(buf, where)
    want = _leaves.stored_tensors(meta["leaves"])
    bad = sorted(set(want) ^ set(tensors))
    bad += [
        p
        for p, t in tensors.items()
        if p in want and (want[p]["dtype"] != str(t.dtype).removeprefix("torch.") or want[p]["shape"] != list(t.shape))
    ]
    if bad:
        raise CheckpointError(f"{where}: does not agree with meta.json on {bad[:10]}; the checkpoint is damaged")
    return tensors


def own(tensors: dict[str, torch.Tensor], keep: set[str]) -> dict[str, torch.Tensor]:
    """The tensors in ``keep``, copied out of the file buffer when the rest of it is dropped.

    Example:
        >>> import torch
        >>> own({"a": torch.ones(1), "b": torch.zeros(1)}, {"a"})
        {'a': tensor([1.])}
    """
    if len(keep) == len(tensors):
        return tensors
    return {k: v.clone() if v.device.type == "cpu" else v for k, v in tensors.items() if k in keep}
