"""Reading a checkpoint folder: the checked ``meta.json`` (format 2, or 1 with its sha256) and the
verified tensor file.

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
import re
from typing import Any

import torch

from fnloop.checkpoint import _fs, _leaves, _pread
from fnloop.checkpoint._seal import SEAL_KEY, check_seal
from fnloop.checkpoint._checksum import Checksum, for_stream, split_digest
from fnloop.checkpoint._safetensors import MAX_HEADER, Malformed
from fnloop.checkpoint._stream import read_tensors
from fnloop.errors import CheckpointError

__all__ = [
    "FORMAT", "FORMAT_VERSION", "SHARDED_FORMAT_VERSION", "READS", "STATE_FILE", "STATE_NAME", "META_FILE",
    "read_meta", "load_tensors", "own",
]

FORMAT = "fnloop-checkpoint"
FORMAT_VERSION = 3
"""Written by this fnloop: ``"checksum": "xxh3_128:<hex>"`` of the tensor file and
``"meta_checksum"`` of ``meta.json`` itself."""
SHARDED_FORMAT_VERSION = 4
"""Written by this fnloop for a sharded (FSDP) state: one tensor file per rank (see ``_sharded``),
``meta.json`` sealed as in format 3."""
READS = (1, 2, 3, 4)
"""Format versions this fnloop restores; version 1 recorded ``"sha256": "<hex>"``, versions 1 and 2
have no checksum of ``meta.json``."""
MAX_META = 256 << 20
"""A ``meta.json`` larger than this is refused before it is parsed."""
STATE_FILE = "state.safetensors"
STATE_NAME = re.compile(r"state(\.[0-9a-f]{32})?\.safetensors")
"""Names of the tensor file in a folder: ``meta.json`` may name ``state.<hex>.safetensors``
(a checkpoint replaced on an object store), never a path."""
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


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_meta(meta: Any, where: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{where}: not an fnloop checkpoint (format {found!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if version not in READS or isinstance(version, bool):
        raise CheckpointError(
            f"{where}: format_version {version!r} is not supported by this fnloop (it reads {', '.join(map(str, READS))}); "
            "use the fnloop version that wrote it (see fnloop_version in the file)"
        )
    if version >= 3 or SEAL_KEY in meta:  # a sealed file claiming an older version: a flipped bit in the version
        check_seal(meta, where)
    if version == 1:  # the sha256 of format 1, in the form of the current checksum record
        sha = meta.get("sha256")
        meta["checksum"] = f"sha256:{sha}" if isinstance(sha, str) else None
    leaves = meta.get("leaves")
    if split_digest(meta.get("checksum")) is None or not isinstance(leaves, list):
        key = "sha256" if version == 1 else "checksum"
        raise CheckpointError(f"{where}: malformed, {key!r} must be a hex digest and 'leaves' a list")
    if not isinstance(meta.get("metrics", {}), dict) or not _count(meta.get("state_bytes", 0)):
        raise CheckpointError(f"{where}: malformed, 'metrics' must be an object and 'state_bytes' an integer >= 0")
    state_file = meta.get("state_file", STATE_FILE)
    if not isinstance(state_file, str) or not STATE_NAME.fullmatch(state_file):
        raise CheckpointError(f"{where}: malformed, 'state_file' {state_file!r} is not a tensor file name of this folder")
    if meta.get("step") is not None and not _count(meta.get("step")):
        raise CheckpointError(f"{where}: malformed, 'step' must be an integer >= 0 or null")
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
        raw = _fs.read_bounded(fs, f"{path}/{META_FILE}", MAX_META, where)
    except FileNotFoundError:
        if fs.exists(f"{path}/{STATE_FILE}"):
            reason = "meta.json is missing, so the save never finished (a folder without meta.json is not a checkpoint)"
        elif fs.exists(path):
            reason = "the folder has no meta.json, so it is not a checkpoint"
        else:
            reason = "no checkpoint here (the folder does not exist)"
        raise CheckpointError(f"{url}: {reason}") from None
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read ({e})") from e
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(f"{where}: malformed JSON ({reason}); the checkpoint is damaged") from None
    meta = _check_meta(meta, where)
    meta["metrics"] = _leaves.decode_metrics(meta.get("metrics", {}))
    return meta


def _mismatch(where: str, found: str, recorded: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: checksum mismatch ({found[:24]}..., meta.json records {recorded[:24]}...); "
        "the file is corrupt or was replaced, restore another checkpoint"
    )


def _read_file(
    fs: Any, state_path: str, size: int, where: str, checksum: Checksum | None, want: dict[str, dict[str, Any]]
) -> dict[str, torch.Tensor]:
    if _fs.is_local(fs):
        with _fs.open_regular(state_path, where) as f:
            return read_tensors(f.readinto, size, where, checksum, want, f.fileno())
    with fs.open(state_path, "rb") as f:
        return read_tensors(f.readinto, size, where, checksum, want)


def _size(fs: Any, state_path: str, where: str) -> int:
    if _fs.is_local(fs):
        with _fs.open_regular(state_path, where) as f:
            return os.fstat(f.fileno()).st_size
    info = fs.info(state_path)
    if info.get("type", "file") != "file":
        raise CheckpointError(f"{where}: a {info.get('type')}, where a file is expected; the checkpoint is damaged")
    return int(info["size"])


def _declared_bytes(want: dict[str, dict[str, Any]]) -> int:
    total = 0
    for d in want.values():
        n = _leaves.DTYPES_BY_NAME[d["dtype"]].itemsize
        for s in d["shape"]:
            n *= s
        total += n
    return total


def load_tensors(url: str, meta: dict[str, Any], verify: bool, *, file: str = STATE_FILE) -> dict[str, torch.Tensor]:
    """Every tensor of ``state.safetensors`` (or ``file``) by key path, on CPU, after checking size and checksum.

    Each tensor is read straight into its own memory (small ones share a buffer), and each
    chunk is checksummed as soon as it lands. Nothing is unpickled: the header is JSON, the
    data raw bytes. ``verify=False`` skips the checksum (the size, the header and its
    agreement with ``meta.json`` are still checked).

    Example:
        >>> import torch
        >>> from fnloop.checkpoint import save
        >>> url = save({"n": torch.arange(2)}, "memory://doc/load-tensors", overwrite=True)
        >>> load_tensors(url, read_meta(url), verify=True)
        {'n': tensor([0, 1])}
    """
    fs, path = _fs.resolve(url)
    state_file = file if file != STATE_FILE else meta.get("state_file", STATE_FILE)
    where = _fs.join_url(url, state_file)
    state_path = f"{path}/{state_file}"
    recorded = meta["checksum"]
    want = _leaves.stored_tensors(meta["leaves"])
    declared = _declared_bytes(want)
    try:
        size = _size(fs, state_path, where)
        expected = meta.get("state_bytes")
        if expected and size != expected:
            raise CheckpointError(f"{where}: truncated or replaced, {size} bytes where meta.json records {expected}")
        if not declared + 8 < size <= declared + 8 + MAX_HEADER:  # bound every read before it starts
            raise CheckpointError(
                f"{where}: truncated or replaced, {size} bytes for the {declared} bytes of tensors meta.json declares"
            )
        algorithm = recorded.partition(":")[0]
        # a local file is hashed by the reader's own helper thread (_pread); others on a worker thread
        parallel_read = _fs.is_local(fs) and _pread.supported()
        checksum = (Checksum(algorithm) if parallel_read else for_stream(algorithm, size, reading=True)) if verify else None
        try:
            tensors = _read_file(fs, state_path, size, where, checksum, want)
        except Malformed:
            if checksum is not None and checksum.digest() != recorded:
                raise _mismatch(where, checksum.digest(), recorded) from None
            raise  # the bytes are the ones saved: another writer made this file
        finally:
            if checksum is not None:
                checksum.close()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing; the checkpoint is incomplete") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read ({e})") from e
    found = checksum.digest() if checksum is not None else recorded
    if found != recorded:
        raise _mismatch(where, found, recorded)
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
