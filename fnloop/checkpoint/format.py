"""Save and restore a pytree as a checkpoint folder: ``state.safetensors`` + ``meta.json``.

``state.safetensors`` holds every tensor leaf under its key path (``params/0.weight``,
``opt_state/0/mu/0.weight``); ``meta.json`` holds the format version, fnloop and torch
versions, the step, metrics, the checksum of the tensor file (``"xxh3_128:<hex>"``; format 1
recorded a sha256 and still restores), every leaf (tensors: dtype and shape; other leaves:
their value) and a readable tree structure. ``meta.json`` is written last and is the commit
marker: a folder without it is not a checkpoint. Local saves are written to a temporary
sibling with direct I/O, fsynced and renamed into place. Loading never unpickles.

The checksum catches corruption (a torn or partial write, truncation, bit rot, a file
swapped by mistake); it is not a signature: whoever can write the folder can rewrite
``meta.json`` too.

Example:
    >>> import torch
    >>> from fnloop.checkpoint import save, restore
    >>> url = save({"w": torch.ones(2), "epoch": 3}, "memory://doc/format-example", overwrite=True)
    >>> restore(url, like={"w": torch.zeros(2), "epoch": 0})
    {'w': tensor([1., 1.]), 'epoch': 3}
"""

from __future__ import annotations

import os
import shutil
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from fnloop.checkpoint import _direct, _finite, _fs, _leaves, _sharded
from fnloop.checkpoint._files import encode_meta as _encode_meta
from fnloop.checkpoint._files import refuse_existing as _refuse_existing
from fnloop.checkpoint._files import write_state as _write_state
from fnloop.checkpoint._seal import compare_optimizer, describe_optimizer
from fnloop.checkpoint._read import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    SHARDED_FORMAT_VERSION,
    STATE_FILE,
    STATE_NAME,
    load_tensors,
    own,
    read_meta,
)
from fnloop.errors import CheckpointError, ConfigError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "STATE_FILE",
    "META_FILE",
    "save",
    "restore",
    "restore_params",
    "restore_weights",
    "read_meta",
]


def _fnloop_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fnloop")
    except metadata.PackageNotFoundError:
        import sys

        return str(getattr(sys.modules.get("fnloop"), "__version__", "0+unknown"))


def _step_of(tree: Any) -> int | None:
    step = getattr(tree, "step", None)
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        return int(step)
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    return None


def _save_local(
    fs: Any, path: str, url: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], overwrite: bool
) -> None:
    final = os.path.abspath(path)
    parent, name = os.path.split(final)
    if os.path.exists(final) and not os.path.isdir(final):
        raise CheckpointError(f"{url}: exists and is a file, not a checkpoint folder; remove it or pick another URL")
    names = list(_fs.list_names(fs, final)) if os.path.isdir(final) else []
    _refuse_existing(os.path.exists(os.path.join(final, META_FILE)), names, url, overwrite)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, _fs.tmp_name(name))
    os.mkdir(tmp)
    old = None
    try:
        with _direct.direct_file(os.path.join(tmp, STATE_FILE)) as f:
            _write_state(f, tensors, meta)
        _fs.write_durable(os.path.join(tmp, META_FILE), _meta_bytes(meta))
        _fs.fsync_path(tmp)
        if os.path.exists(final):  # overwrite, or a leftover without meta.json
            _refuse_existing(os.path.exists(os.path.join(final, META_FILE)), [], url, overwrite)
            if _fs.exchange(tmp, final):  # one atomic swap: a checkpoint is at `final` at every moment
                old, tmp = tmp, os.path.join(parent, _fs.tmp_name(name))
                _fs.fsync_path(parent)
                shutil.rmtree(old, ignore_errors=True)
                return
            old = os.path.join(parent, _fs.tmp_name(name))  # no atomic swap here: move it aside
            os.rename(final, old)
        try:
            _fs.rename_noreplace(tmp, final)  # never over a checkpoint another writer committed meanwhile
        except FileExistsError:
            raise _taken(url) from None
        _fs.fsync_path(parent)
    except BaseException:
        if old is not None and not os.path.exists(final):
            os.rename(old, final)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:  # another writer's checkpoint is in place: it stays
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _taken(url: str) -> CheckpointError:
    return CheckpointError(
        f"{url}: another writer committed a checkpoint here while this one was being written; it is kept. "
        "Pick another URL, or pass overwrite=True to replace it"
    )


def _save_remote(
    fs: Any, path: str, url: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], overwrite: bool
) -> None:
    """Object stores have no folder rename: a new checkpoint claims its files with conditional
    writes; a replaced one gets a new tensor file, and the old files go once the new
    ``meta.json`` (naming its tensor file) is in place, so a failed save leaves the old one."""
    meta_path = f"{path}/{META_FILE}"
    fs.invalidate_cache(path)
    has_meta = fs.exists(meta_path)
    names = list(_fs.list_names(fs, path))
    _refuse_existing(has_meta, names, url, overwrite)
    fs.makedirs(path, exist_ok=True)
    state_name = f"state.{uuid.uuid4().hex}.safetensors" if has_meta else STATE_FILE
    if state_name != STATE_FILE:
        meta["state_file"] = state_name
    elif STATE_FILE in names:  # a leftover of a save that never committed
        fs.rm_file(f"{path}/{STATE_FILE}")
    try:
        with _fs.create_exclusive(fs, f"{path}/{state_name}") as f:
            _write_state(f, tensors, meta)
        if overwrite:
            fs.pipe_file(meta_path, _meta_bytes(meta))
        else:
            _fs.create_exclusive(fs, meta_path, _meta_bytes(meta))
    except FileExistsError:
        raise _taken(url) from None
    for stale in names:
        if stale != state_name and STATE_NAME.fullmatch(stale):
            fs.rm_file(f"{path}/{stale}")


def save(
    tree: Any, url: str | os.PathLike[str], *, metrics: dict[str, Any] | None = None, overwrite: bool = False
) -> str:
    """Save a pytree (a ``TrainState`` or any fnloop pytree) as a checkpoint folder at ``url``.

    Args:
        tree: the pytree; tensor leaves of any device and layout, other leaves int, float,
            bool, str or None. A sharded state (DTensor leaves, ``strategy="fsdp"``) is saved by
            every rank together: call ``save`` on all of them with the same ``url`` (a
            filesystem they share); each writes its shard, rank 0 the commit marker.
        url: a path or fsspec URL (``/x``, ``file:///x``, ``memory://x``, ``s3://b/x``).
        metrics: numbers stored in ``meta.json`` (a checkpoint manager ranks by them).
        overwrite: replace a checkpoint already at ``url`` instead of raising.

    Returns:
        ``url`` as a string.

    Raises:
        CheckpointError: a checkpoint exists at ``url``, a leaf cannot be stored, or a write failed.

    Example:
        >>> import torch
        >>> save({"w": torch.zeros(3)}, "memory://doc/save-example", overwrite=True)
        'memory://doc/save-example'
    """
    return write(tree, url, metrics=metrics, overwrite=overwrite)


def write(tree: Any, url: str | os.PathLike[str], *, metrics: Any = None, overwrite: bool = False, finite: bool | None = None) -> str:
    """:func:`save`, with ``finite`` (no tensor holds nan or inf) given when the caller checked already."""
    from fnloop.execution import check_not_donated

    check_not_donated(tree, "save")
    url = os.fspath(url)
    tensors, entries, spec = _leaves.split(tree, url)
    sharded = _sharded.is_sharded(tree)
    if finite is None and sharded:  # the ranks agree on it together, before they write
        finite = not non_finite(tree, tensors, limit=1)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fnloop_version": _fnloop_version(),
        "torch_version": torch.__version__,
        "step": _step_of(tree),
        "metrics": _leaves.encode_metrics(metrics),
        "checksum": "",
        "state_bytes": 0,
        "leaves": entries,
        "treespec": _leaves.describe(spec),
        # else checked while the tensor file is written (meta.json comes after it): see _meta_bytes
        "finite": finite if finite is not None else _in_background(_finite.non_finite, tensors, 1),
    }
    if getattr(tree, "tx", None) is not None:
        meta["optimizer"] = describe_optimizer(tree.tx)
    if sharded:  # every rank writes its shard, rank 0 the commit marker
        _sharded.save_sharded(tensors, meta, url, overwrite)
        return url
    fs, path = _fs.resolve(url)
    try:
        if _fs.is_local(fs):
            _save_local(fs, path, url, tensors, meta, overwrite)
        else:
            _save_remote(fs, path, url, tensors, meta, overwrite)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{url}: cannot write the checkpoint ({e})") from e
    return url


def _in_background(fn: Any, *args: Any) -> Future[Any]:
    """``fn(*args)`` running on a thread of its own."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="fnloop-save")
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    """``meta.json``'s bytes. A save checks its tensors for nan and inf on another thread while
    it writes them (torch's reductions release the GIL): a pass over the state that would
    otherwise come before the first byte reaches the disk. The answer is waited for here."""
    if isinstance(meta["finite"], Future):
        meta["finite"] = not meta["finite"].result()
    return _encode_meta(meta)


def non_finite(tree: Any, tensors: dict[str, torch.Tensor], limit: int = 5) -> list[str]:
    """Key paths of ``tree``'s tensors (``tensors``, split from it) that hold nan or inf; for a
    sharded state, of every rank's shard (all ranks get the same answer: they save together)."""
    bad = _finite.non_finite(tensors, limit)
    return _sharded.everywhere(bad)[:limit] if _sharded.is_sharded(tree) else bad


def _device(map_location: Any) -> Any:
    """``map_location`` checked: None, a ``torch.device`` or a device string such as ``"cuda:0"``."""
    if map_location is None:
        return None
    try:
        if isinstance(map_location, bool) or not isinstance(map_location, (str, torch.device, int)):
            raise TypeError
        return torch.device(map_location)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"map_location={map_location!r}: not a device; pass None, a torch.device or a string such as 'cpu' or 'cuda:0'"
        ) from None


def restore(
    url: str | os.PathLike[str], like: Any = None, *, map_location: Any = None, verify: bool = True
) -> Any:
    """Read the checkpoint at ``url`` into a tree shaped like ``like``.

    Args:
        url: the checkpoint folder (path or fsspec URL).
        like: a tree with the structure of the saved one (e.g. a fresh ``TrainState``); static
            fields (``module``, ``tx``) come from it. Where ``like`` holds DTensors (a sharded
            state, on any world size), each rank keeps its chunk of the whole tensors read. ``None`` returns a flat
            ``{key path: tensor}`` dict of the tensor leaves.
        map_location: device for every tensor; default: the device of the matching leaf of ``like``.
        verify: check the checksum of ``state.safetensors`` (on by default; ``False`` skips it,
            the sizes, header and tree are still checked).

    Raises:
        CheckpointError: naming the file and the reason (missing or malformed meta.json,
            unknown format version, truncated or corrupt tensor file, not a safetensors file),
            or listing every key path that is missing, extra, reshaped or of another dtype.

    Example:
        >>> import torch
        >>> url = save({"w": torch.ones(2)}, "memory://doc/restore-example", overwrite=True)
        >>> restore(url)
        {'w': tensor([1., 1.])}
    """
    url = os.fspath(url)
    map_location = _device(map_location)
    meta = read_meta(url)
    sharded_like = like is not None and _sharded.is_sharded(like)
    tensors = _load(url, meta, verify, _sharded.rows_of(like) if sharded_like else None)
    if like is None:
        order = [e["path"] for e in meta["leaves"] if e["kind"] == "tensor"]
        return {p: tensors[p].to(map_location) if map_location is not None else tensors[p] for p in order}
    compare_optimizer(meta.get("optimizer"), getattr(like, "tx", None), _fs.join_url(url, META_FILE))
    stored_tree = meta.get("treespec", "")
    tree = _leaves.rebuild(like, meta["leaves"], tensors, url, map_location=map_location, stored_tree=stored_tree)
    return _sharded.place_like(tree, like) if sharded_like else tree


def _load(
    url: str, meta: dict[str, Any], verify: bool, rows: dict[str, tuple[int, int]] | None = None
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by key path, whole (a sharded one assembled from its files), or
    of a sharded checkpoint only the ``rows`` of dim 0 this rank keeps."""
    sharded = meta["format_version"] == SHARDED_FORMAT_VERSION
    return _sharded.load_sharded(url, meta, verify, rows) if sharded else load_tensors(url, meta, verify)


def restore_params(url: str | os.PathLike[str], *, map_location: Any = None) -> dict[str, torch.Tensor]:
    """The weights in a checkpoint, named like ``module.state_dict()`` (``"0.weight"``).

    For a ``TrainState`` checkpoint: its params and buffers without the ``params/`` and
    ``buffers/`` prefixes; for any other tree, every tensor leaf by key path.

    Example:
        >>> import torch
        >>> url = save({"params": {"w": torch.ones(1)}, "buffers": {}}, "memory://doc/params-example", overwrite=True)
        >>> restore_params(url)
        {'w': tensor([1.])}
    """
    url = os.fspath(url)
    map_location = _device(map_location)
    meta = read_meta(url)
    tensors = _load(url, meta, verify=True)
    paths = [e["path"] for e in meta["leaves"] if e["kind"] == "tensor"]
    weights = [p for p in paths if p.startswith(("params/", "buffers/"))]
    if not any(p.startswith("params/") for p in paths):
        weights = paths
    kept = own(tensors, set(weights))
    out = {p.split("/", 1)[1] if p.startswith(("params/", "buffers/")) else p: kept[p] for p in weights}
    return {k: v.to(map_location) for k, v in out.items()} if map_location is not None else out


def restore_weights(url: str | os.PathLike[str], like: Any, *, map_location: Any = None) -> Any:
    """``like`` with its ``params`` and ``buffers`` read from the checkpoint at ``url``.

    Step, optimizer state, RNG and loop counters stay those of ``like`` (a fresh
    ``TrainState``); the weights must match ``like.params``/``like.buffers`` exactly.

    Example:
        >>> import torch, fnloop as fl, fnloop.optim as flo
        >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
        >>> url = save(state, "memory://doc/weights-example", overwrite=True)
        >>> int(restore_weights(url, like=state).step)
        0
    """
    url = os.fspath(url)
    map_location = _device(map_location)
    meta = read_meta(url)
    tensors = _load(url, meta, verify=True)
    entries = [e for e in meta["leaves"] if e["path"].startswith(("params/", "buffers/"))]
    kept = own(tensors, {e["path"] for e in entries})
    weights = {"params": like.params, "buffers": like.buffers}
    sub = _leaves.rebuild(weights, entries, kept, url, map_location=map_location)
    return like.replace(params=sub["params"], buffers=sub["buffers"])
