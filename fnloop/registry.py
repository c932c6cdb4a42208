"""A model registry on any fsspec URL: publish weights as numbered versions, load them back.

Layout: ``root/name/index.json`` lists the versions (metadata, creation time) and
``root/name/vN/`` holds each version in the checkpoint format (``state.safetensors`` +
``meta.json``, tree ``{"params": ..., "buffers": ...}``). A version is published by writing
its folder first and then replacing ``index.json`` atomically, so a reader never sees a
version whose weights are not all there. Publishers of one name take turns through a lock
(``root/name/.lock``: ``flock`` on a local disk, an exclusively created file elsewhere), and each
version folder is created only if it does not exist, so every version number is used once.

Example:
    >>> import torch
    >>> from fnloop import registry
    >>> v = registry.publish({"weight": torch.ones(2)}, "memory://doc/registry", "demo", metadata={"acc": 0.9})
    >>> registry.load("memory://doc/registry", "demo", v)["weight"]
    tensor([1., 1.])
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import torch

from fnloop.checkpoint import _fs
from fnloop.checkpoint.format import restore_params, save
from fnloop.errors import CheckpointError, ConfigError

__all__ = ["publish", "load", "versions", "delete"]

INDEX_FILE = "index.json"
INDEX_FORMAT = "fnloop-registry"
_VERSION = re.compile(r"v([0-9]+)\Z")


MAX_NAME_BYTES = 255
MAX_INDEX = 64 << 20
LOCK_FILE = ".lock"
LOCK_TIMEOUT_S = 120.0


def _check_name(name: str) -> None:
    ok = isinstance(name, str) and bool(name) and not name.startswith(".") and name != INDEX_FILE
    if ok:
        try:
            ok = len(name.encode("utf-8")) <= MAX_NAME_BYTES
        except UnicodeEncodeError:  # a lone surrogate
            ok = False
    if not ok or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name):
        raise ConfigError(
            f"registry name {name!r}: use a non-empty folder name of at most {MAX_NAME_BYTES} UTF-8 bytes, "
            "without '/', '\\', control characters (NUL, newline) or a leading '.'"
        )


def _index_url(root_url: str | os.PathLike[str], name: str) -> str:
    return _fs.join_url(root_url, name, INDEX_FILE)


def _read_index(root_url: str | os.PathLike[str], name: str) -> dict[str, Any] | None:
    url = _index_url(root_url, name)
    fs, path = _fs.resolve(url)
    try:
        raw = _fs.read_bounded(fs, path, MAX_INDEX, url)
    except FileNotFoundError:
        return None
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{url}: cannot read ({e})") from e
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(f"{url}: malformed JSON ({reason}); the registry entry is damaged") from None
    valid = isinstance(index, dict) and index.get("format") == INDEX_FORMAT and isinstance(index.get("versions"), list)
    valid = valid and all(isinstance(e, dict) for e in index["versions"])
    if not valid:
        raise CheckpointError(f"{url}: not an fnloop registry index (format {INDEX_FORMAT!r} with a 'versions' list)")
    return index


def _write_index(root_url: str | os.PathLike[str], name: str, index: dict[str, Any]) -> None:
    fs, path = _fs.resolve(_index_url(root_url, name))
    data = json.dumps(index, indent=1, allow_nan=False, ensure_ascii=False).encode("utf-8")
    try:
        _fs.write_file_atomic(fs, path, data)
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{_index_url(root_url, name)}: cannot write ({e})") from e


def _names(root_url: str | os.PathLike[str]) -> list[str]:
    fs, path = _fs.resolve(root_url)
    names = [n for n in _fs.list_names(fs, path) if not n.startswith(".")]
    return sorted(n for n in names if fs.exists(f"{path}/{n}/{INDEX_FILE}"))


def _index_or_raise(root_url: str | os.PathLike[str], name: str) -> dict[str, Any]:
    _check_name(name)
    index = _read_index(root_url, name)
    if index is None:
        raise CheckpointError(
            f"{_fs.join_url(root_url, name)}: no model {name!r} in the registry; models there: {_names(root_url)}"
        )
    return index


def _confined(entry: dict[str, Any], root_url: str | os.PathLike[str], name: str) -> dict[str, Any]:
    version = entry.get("version")
    if not isinstance(version, str) or not _VERSION.match(version):
        raise CheckpointError(
            f"{_index_url(root_url, name)}: entry version {version!r} is not of the form 'v<N>' (a folder of this "
            "model); the index is damaged or was edited, restore it or delete that entry"
        )
    return entry


def _find(index: dict[str, Any], root_url: str | os.PathLike[str], name: str, version: str) -> dict[str, Any]:
    entries = index["versions"]
    if version == "latest" and entries:
        return _confined(entries[-1], root_url, name)
    for entry in entries:
        if entry.get("version") == version:
            return _confined(entry, root_url, name)
    raise CheckpointError(
        f"{_fs.join_url(root_url, name)}: model {name!r} has no version {version!r}; "
        f"versions: {[e.get('version') for e in entries]}"
    )


def _weights(state_or_params: Any) -> dict[str, dict[str, torch.Tensor]]:
    if isinstance(state_or_params, dict):
        params, buffers = state_or_params, {}
    elif hasattr(state_or_params, "params") and hasattr(state_or_params, "buffers"):
        params, buffers = state_or_params.params, state_or_params.buffers
    else:
        raise ConfigError(
            f"registry.publish: got a {type(state_or_params).__name__}; pass a TrainState or a dict of tensors"
        )
    for key, value in {**params, **buffers}.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            kind = type(value).__name__
            raise ConfigError(f"registry.publish: entry {key!r} is a {kind}; weights must be str -> Tensor")
    return {"params": dict(params), "buffers": dict(buffers)}


def publish(
    state_or_params: Any, root_url: str | os.PathLike[str], name: str, *, metadata: dict[str, Any] | None = None
) -> str:
    """Publish the weights of a ``TrainState`` (params and buffers) or a dict of tensors as a new version.

    Args:
        state_or_params: a ``TrainState`` or ``{name: tensor}``.
        root_url: the registry root (path or fsspec URL).
        name: the model name (one folder name).
        metadata: JSON-serializable facts kept with the version (metrics, config, data).

    Returns:
        The new version, ``"v1"``, ``"v2"``, ...

    Example:
        >>> import torch
        >>> publish({"w": torch.zeros(1)}, "memory://doc/publish", "m")
        'v1'
    """
    from fnloop.execution import check_not_donated

    check_not_donated(state_or_params, "registry.publish")
    _check_name(name)
    weights = _weights(state_or_params)
    try:
        json.dumps(metadata or {}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"registry.publish(metadata=...): must be JSON-serializable without nan/inf ({e})") from None
    fs, path = _fs.resolve(_fs.join_url(root_url, name))
    with _publish_lock(fs, path, _fs.join_url(root_url, name, LOCK_FILE)):
        index = _read_index(root_url, name) or {"format": INDEX_FORMAT, "name": name, "next_version": 1, "versions": []}
        on_disk = [int(m.group(1)) for n in _fs.list_names(fs, path) if (m := _VERSION.match(n))]
        next_version = index.get("next_version", 1)
        number = max([next_version if isinstance(next_version, int) else 1, *(n + 1 for n in on_disk)])
        for _ in range(100):  # a writer without the lock (an older fnloop) may take a number meanwhile
            version = f"v{number}"
            try:
                save(weights, _fs.join_url(root_url, name, version))
                break
            except CheckpointError:
                if not fs.exists(f"{path}/{version}"):
                    raise
                number += 1
        else:
            raise CheckpointError(f"{_fs.join_url(root_url, name)}: could not claim a new version folder")
        index["versions"].append({"version": version, "created": time.time(), "metadata": metadata or {}})
        index["next_version"] = number + 1
        _write_index(root_url, name, index)
    return version


@contextlib.contextmanager
def _publish_lock(fs: Any, path: str, where: str) -> Iterator[None]:
    """Hold the lock of one model's folder: publishers and deleters of a name take turns."""
    lock = f"{path}/{LOCK_FILE}"
    if _fs.is_local(fs):
        os.makedirs(path, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
            yield
        finally:
            os.close(fd)
        return
    fs.makedirs(path, exist_ok=True)
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            _fs.create_exclusive(fs, lock, f"{os.getpid()} {time.time()}".encode())
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"{where}: held by another publisher for over {LOCK_TIMEOUT_S:.0f} s; if none is running "
                    "(one was killed), delete this file"
                ) from None
            time.sleep(0.05)
    try:
        yield
    finally:
        fs.rm_file(lock)


def load(
    root_url: str | os.PathLike[str], name: str, version: str = "latest", *, map_location: Any = None
) -> dict[str, torch.Tensor]:
    """The weights of a published version: ``{"0.weight": tensor, ...}`` (params and buffers).

    Raises:
        CheckpointError: unknown name or version (the message lists what exists) or damaged files.

    Example:
        >>> import torch
        >>> _ = publish({"w": torch.ones(1)}, "memory://doc/load", "m")
        >>> load("memory://doc/load", "m")
        {'w': tensor([1.])}
    """
    entry = _find(_index_or_raise(root_url, name), root_url, name, version)
    return restore_params(_fs.join_url(root_url, name, entry["version"]), map_location=map_location)


def versions(root_url: str | os.PathLike[str], name: str) -> list[dict[str, Any]]:
    """Every version of ``name``, oldest first: ``{"version", "created" (unix time), "metadata"}``.

    Example:
        >>> import torch
        >>> _ = publish({"w": torch.ones(1)}, "memory://doc/versions", "m", metadata={"note": "first"})
        >>> [(v["version"], v["metadata"]) for v in versions("memory://doc/versions", "m")]
        [('v1', {'note': 'first'})]
    """
    return [dict(e) for e in _index_or_raise(root_url, name)["versions"]]


def delete(root_url: str | os.PathLike[str], name: str, version: str) -> None:
    """Remove a version: first from ``index.json``, then its folder.

    Example:
        >>> import torch
        >>> _ = publish({"w": torch.ones(1)}, "memory://doc/delete", "m")
        >>> delete("memory://doc/delete", "m", "v1"); versions("memory://doc/delete", "m")
        []
    """
    _check_name(name)
    fs, folder = _fs.resolve(_fs.join_url(root_url, name))
    with _publish_lock(fs, folder, _fs.join_url(root_url, name, LOCK_FILE)):
        index = _index_or_raise(root_url, name)
        entry = _find(index, root_url, name, version)
        index["versions"] = [e for e in index["versions"] if e is not entry]
        _write_index(root_url, name, index)
        _fs.remove_tree(fs, f"{folder}/{entry['version']}", marker="meta.json")
