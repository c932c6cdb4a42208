"""Sharded checkpoints: a state whose leaves are DTensors (FSDP) saved by every rank at once.

The folder holds one tensor file per rank, ``shard-<rank>-of-<world>.safetensors`` (each rank's
chunk of every sharded leaf under its key path; rank 0's file also holds the whole leaves), and
one ``meta.json`` (format 3), written by rank 0 last, once every rank has written and fsynced
its file: the commit marker of the whole. Each leaf entry records the global shape, and a
sharded one the ``[start, stop)`` rows of dim 0 each file holds; ``"shards"`` lists each file
with its checksum and length. A restore reads and verifies every file, assembles the full
tensors, and places them like ``like``: DTensors sliced for this rank on any world size, or
plain tensors on one process. Local saves go to a temporary folder renamed into place.

Example:
    >>> _file(1, 2)
    'shard-00001-of-00002.safetensors'
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import torch

from fnloop.checkpoint import _direct, _fs
from fnloop.checkpoint._files import encode_meta, refuse_existing, write_state
from fnloop.checkpoint._read import META_FILE, SHARDED_FORMAT_VERSION, load_tensors
from fnloop.connectors.fsdp import chunks, distribute_like, is_sharded
from fnloop.errors import CheckpointError
from fnloop.tree import tree_flatten_with_path, tree_map

__all__ = ["is_sharded", "is_follower", "save_sharded", "rows_of", "load_sharded", "place_like"]

_FILE = re.compile(r"shard-(\d{5})-of-(\d{5})\.safetensors")


def _file(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def is_follower(tree: Any) -> bool:
    """``tree`` is sharded and this process is not rank 0 (it writes its shard, not the marker)."""
    return is_sharded(tree) and _rank_world()[0] != 0


def _all(value: Any) -> list[Any]:
    """``value`` of every rank (torch's ``all_gather_object``)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def everywhere(paths: list[str]) -> list[str]:
    """The union of every rank's ``paths`` (in rank order), so that all ranks decide alike."""
    return list(dict.fromkeys(p for mine in _all(paths) for p in mine))


def _from_zero(value: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def save_sharded(tensors: dict[str, torch.Tensor], meta: dict[str, Any], url: str, overwrite: bool) -> None:
    """Every rank's shard of ``tensors`` (key path -> DTensor or whole tensor) into the folder
    ``url``, then rank 0's ``meta.json`` (``meta``: the leaf entries with global shapes)."""
    from torch.distributed.tensor import DTensor

    rank, world = _rank_world()
    mine = {}
    for e in meta["leaves"]:
        t = tensors.get(e["path"])
        if isinstance(t, DTensor):
            e["shards"] = [list(c) for c in chunks(e["shape"][0], world)]
            mine[e["path"]] = t.to_local()
    if rank == 0:
        mine.update({p: t for p, t in tensors.items() if not isinstance(t, DTensor)})
    name = _file(rank, world)
    fs, path = _fs.resolve(url)
    local = _fs.is_local(fs)
    final = os.path.abspath(path) if local else path
    target = None
    if rank == 0:  # rank 0 checks the place and makes the folder the ranks write into
        try:
            if local:
                names = list(_fs.list_names(fs, final)) if os.path.isdir(final) else []
                refuse_existing(os.path.exists(os.path.join(final, META_FILE)), names, url, overwrite)
                os.makedirs(os.path.dirname(final), exist_ok=True)
                target = os.path.join(os.path.dirname(final), _fs.tmp_name(os.path.basename(final)))
                os.mkdir(target)
            else:
                fs.invalidate_cache(path)
                has_meta = fs.exists(f"{path}/{META_FILE}")
                refuse_existing(has_meta, list(_fs.list_names(fs, path)), url, overwrite)
                if has_meta:
                    fs.rm_file(f"{path}/{META_FILE}")
                fs.makedirs(path, exist_ok=True)
                target = path
        except Exception as e:  # every rank raises the same error
            target = e if isinstance(e, CheckpointError) else CheckpointError(f"{url}: cannot write the checkpoint ({e})")
    target = _from_zero(target)
    if isinstance(target, CheckpointError):
        raise target
    record: dict[str, Any] = {}
    try:
        if local:
            with _direct.direct_file(os.path.join(target, name)) as f:
                write_state(f, mine, record)
        else:
            with fs.open(f"{target}/{name}", "wb") as f:
                write_state(f, mine, record)
        written: Any = {"file": name, "checksum": record["checksum"], "state_bytes": record["state_bytes"]}
    except Exception as e:
        written = _error(e)
    files = _all(written)
    outcome = None
    if rank == 0:
        outcome = _commit(fs, local, target, final, meta, files, url)
    outcome = _from_zero(outcome)
    if outcome is not None:
        raise CheckpointError(outcome)


def _commit(fs: Any, local: bool, target: str, final: str, meta: dict[str, Any], files: list[Any], url: str) -> str | None:
    """Rank 0: the commit marker once every shard is written (None), or why not (the folder removed)."""
    failed = [f"rank {r}: {w}" for r, w in enumerate(files) if isinstance(w, str)]
    if failed:
        if local:
            shutil.rmtree(target, ignore_errors=True)
        return f"{url}: cannot write the checkpoint ({'; '.join(failed)})"
    meta["format_version"] = SHARDED_FORMAT_VERSION
    meta["shards"] = files
    meta["checksum"], meta["state_bytes"] = files[0]["checksum"], sum(f["state_bytes"] for f in files)
    old = None
    try:
        if not local:
            fs.pipe_file(f"{target}/{META_FILE}", encode_meta(meta))
            return None
        parent = os.path.dirname(final)
        _fs.write_durable(os.path.join(target, META_FILE), encode_meta(meta))
        _fs.fsync_path(target)
        if os.path.exists(final):
            old = os.path.join(parent, _fs.tmp_name(os.path.basename(final)))
            os.rename(final, old)
        os.rename(target, final)
        _fs.fsync_path(parent)
    except Exception as e:
        if old is not None and not os.path.exists(final):
            os.rename(old, final)
            old = None
        shutil.rmtree(target, ignore_errors=True)
        return f"{url}: cannot write the checkpoint ({e})"
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return None


def _check_shards(meta: dict[str, Any], where: str) -> list[dict[str, Any]]:
    files = meta.get("shards")
    world = len(files) if isinstance(files, list) else 0
    ok = world > 0 and all(
        isinstance(f, dict)
        and f.get("file") == _file(r, world)
        and isinstance(f.get("checksum"), str)
        and isinstance(f.get("state_bytes"), int)
        for r, f in enumerate(files)  # type: ignore[arg-type]
    )
    for e in meta["leaves"]:
        if ok and "shards" in e:
            rows = e["shape"][0] if e.get("kind") == "tensor" and e["shape"] else None
            ok = rows is not None and e["shards"] == [list(c) for c in chunks(rows, world)]
    if not ok:
        raise CheckpointError(
            f"{where}: malformed, 'shards' must list one shard file per rank and each leaf its rows; the checkpoint is damaged"
        )
    return files  # type: ignore[return-value]


def rows_of(like: Any) -> dict[str, tuple[int, int]]:
    """``{key path: (start, stop)}``: the rows of dim 0 this rank holds of each DTensor leaf of ``like``."""
    from torch.distributed.tensor import DTensor, Shard

    paths, leaves, _ = tree_flatten_with_path(like)
    out = {}
    for path, ref in zip(paths, leaves):
        if isinstance(ref, DTensor) and tuple(ref.placements) == (Shard(0),):
            mesh = ref.device_mesh
            out[path] = chunks(ref.shape[0], mesh.size())[mesh.get_local_rank()]
    return out


def load_sharded(
    url: str, meta: dict[str, Any], verify: bool, rows: dict[str, tuple[int, int]] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint by key path (each file checked for size and checksum):
    whole, assembled from the shard files, or for the key paths in ``rows`` only those rows of
    dim 0 (a rank's chunk); then only the files holding them, and rank 0's, are read."""
    files = _check_shards(meta, _fs.join_url(url, META_FILE))
    rows = rows or {}
    sharded = [e for e in meta["leaves"] if "shards" in e]

    def needed(e: dict[str, Any], r: int) -> bool:
        start, stop = e["shards"][r]
        a, b = rows.get(e["path"], (start, stop))
        return e["path"] not in rows or (start < stop and max(a, start) < min(b, stop))

    whole = [e for e in meta["leaves"] if "shards" not in e]  # in rank 0's file
    pieces = {}
    for r, f in enumerate(files):
        if r != 0 and not any(needed(e, r) for e in sharded):
            continue
        leaves = [{**e, "shape": [e["shards"][r][1] - e["shards"][r][0], *e["shape"][1:]]} for e in sharded]
        sub = {"checksum": f["checksum"], "state_bytes": f["state_bytes"], "leaves": leaves + (whole if r == 0 else [])}
        pieces[r] = load_tensors(url, sub, verify, file=f["file"])
    out = dict(pieces[0])
    for e in sharded:
        path = e["path"]
        a, b = rows.get(path, (0, e["shape"][0]))
        parts = [
            pieces[r][path][max(a, start) - start : min(b, stop) - start]
            for r, (start, stop) in enumerate(e["shards"])
            if r in pieces and max(a, start) < min(b, stop)
        ]
        out[path] = torch.cat(parts) if parts else pieces[0][path].new_empty((0, *e["shape"][1:]))
    return out


def place_like(tree: Any, like: Any) -> Any:
    """``tree`` (whole tensors, or this rank's chunks from :func:`load_sharded`) as DTensors placed
    like ``like``'s DTensor leaves."""
    from fnloop.connectors.fsdp import sharded_like

    def place(x: Any, ref: Any) -> Any:
        if not isinstance(x, torch.Tensor) or not hasattr(ref, "device_mesh") or x.shape == ref.shape:
            return distribute_like(x, ref)
        return sharded_like(x, ref)  # already this rank's chunk

    return tree_map(place, tree, like)
