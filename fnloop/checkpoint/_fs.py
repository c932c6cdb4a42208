"""Filesystem helpers for checkpoints: fsspec URLs, atomic local commits, temporary folders.

Every checkpoint location is a URL or a plain path that :func:`fsspec.core.url_to_fs`
understands (``/x``, ``relative/x``, ``file:///x``, ``memory://x``, ``s3://bucket/x``).
Local disks get the durable protocol: write into a temporary sibling, fsync every file and
the folder, rename into place, fsync the parent. Temporary names carry the host and process
that own them, so a reader never removes the folder of a save that is still running.

Example:
    >>> from fnloop.checkpoint import _fs
    >>> fs, path = _fs.resolve("memory://ckpt/step-1")
    >>> path
    '/ckpt/step-1'
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from fnloop.errors import CheckpointError

__all__ = [
    "TMP_PREFIX",
    "resolve",
    "is_local",
    "join_url",
    "fsync_path",
    "tmp_name",
    "is_stale_tmp",
    "remove_stale_tmp",
    "list_names",
    "remove_tree",
    "write_durable",
    "write_file_atomic",
    "open_regular",
    "rename_noreplace",
    "exchange",
    "create_exclusive",
    "read_bounded",
]

TMP_PREFIX = ".tmp-"
STALE_AFTER_S = 24 * 3600.0
"""A temporary entry made on another host is removed only once it is this old."""

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def resolve(url: str | os.PathLike[str]) -> tuple[Any, str]:
    """``(filesystem, path)`` for a URL or a plain path.

    Example:
        >>> fs, path = resolve("memory://a/b")
        >>> path
        '/a/b'
    """
    text = os.fspath(url)
    if not isinstance(text, str) or "\x00" in text:
        raise CheckpointError(f"{text!r}: not a usable checkpoint location (a NUL character or bytes); use a path or an fsspec URL")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{text!r}: not valid UTF-8 (a lone surrogate); use a path or an fsspec URL") from None
    try:
        return fsspec.core.url_to_fs(text)
    except (ValueError, ImportError) as e:
        raise CheckpointError(f"{os.fspath(url)}: cannot open this location ({e}); use a path or an fsspec URL") from e


def is_local(fs: Any) -> bool:
    """Whether ``fs`` is the local disk (where rename and fsync give an atomic, durable commit).

    Example:
        >>> is_local(resolve("/tmp")[0])
        True
    """
    return isinstance(fs, LocalFileSystem)


def join_url(url: str | os.PathLike[str], *names: str) -> str:
    """``url/name/...`` keeping the scheme of ``url``.

    Example:
        >>> join_url("memory://runs/", "step-1", "meta.json")
        'memory://runs/step-1/meta.json'
    """
    return "/".join([os.fspath(url).rstrip("/"), *names])


def fsync_path(path: str) -> None:
    """fsync a local file or folder (a folder fsync makes renames inside it durable).

    Example:
        >>> fsync_path("/tmp")
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(name: str) -> str:
    """A temporary sibling name for ``name`` tagged with this host and process.

    Example:
        >>> tmp_name("step-1").startswith(".tmp-")
        True
    """
    return f"{TMP_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}-{name}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_tmp(name: str, path: str) -> bool:
    """Whether the local temporary entry ``name`` at ``path`` was left by a save that died.

    An entry of this host is stale when its process is gone; one of another host (shared
    storage) when it is older than ``STALE_AFTER_S``.

    Example:
        >>> is_stale_tmp("step-1", "/tmp/step-1")
        False
    """
    if not name.startswith(TMP_PREFIX):
        return False
    parts = name[len(TMP_PREFIX) :].split("-", 3)
    if len(parts) == 4 and parts[0] == _HOST and parts[1].isdigit():
        return not _pid_alive(int(parts[1]))
    try:
        return time.time() - os.lstat(path).st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def remove_stale_tmp(directory: str) -> list[str]:
    """Remove the stale temporary entries directly inside a local ``directory``; return their names.

    Example:
        >>> remove_stale_tmp("/nonexistent-folder")
        []
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if is_stale_tmp(entry.name, entry.path):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass
            removed.append(entry.name)
    return removed


def list_names(fs: Any, path: str) -> Iterator[str]:
    """Names of the entries directly inside ``path`` (none when it does not exist), fresh from the store.

    Example:
        >>> list(list_names(resolve("memory://nothing-here")[0], "/nothing-here"))
        []
    """
    if is_local(fs):
        try:
            yield from (e.name for e in os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return
        return
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return
    for entry in entries:
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        if name:
            yield name


def remove_tree(fs: Any, path: str, *, marker: str | None = None) -> None:
    """Delete the folder ``path``; ``marker`` (e.g. ``meta.json``) goes first so a crash leaves no valid folder.

    On a local disk the folder is first renamed to a temporary name, which is atomic.

    Example:
        >>> fs, p = resolve("memory://rm-me")
        >>> fs.pipe(p + "/meta.json", b"{}")
        >>> remove_tree(fs, p, marker="meta.json"); fs.exists(p)
        False
    """
    if is_local(fs):
        parent, name = os.path.split(path.rstrip("/"))
        doomed = os.path.join(parent, tmp_name(name))
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        fsync_path(parent)
        shutil.rmtree(doomed, ignore_errors=True)
        return
    if marker is not None:
        try:
            fs.rm_file(f"{path}/{marker}")
        except FileNotFoundError:
            pass
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def write_durable(path: str, data: bytes) -> None:
    """Create the local file ``path`` holding ``data``, fsynced (the folder is not).

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "x"); write_durable(p, b"ab"); os.path.getsize(p)
        2
    """
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_file_atomic(fs: Any, path: str, data: bytes) -> None:
    """Replace the file ``path`` by ``data`` so a reader sees the old or the new content, never a mix.

    Local: temporary sibling, fsync, ``os.replace``, fsync of the folder. Other filesystems:
    write a temporary sibling, then move it over ``path``.

    Example:
        >>> fs, p = resolve("memory://idx/index.json")
        >>> write_file_atomic(fs, p, b"{}"); fs.cat_file(p)
        b'{}'
    """
    parent, name = path.rstrip("/").rsplit("/", 1)
    tmp = f"{parent}/{tmp_name(name)}"
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        try:
            write_durable(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_path(parent)
        return
    fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def open_regular(path: str, where: str) -> Any:
    """The local file ``path`` opened for binary reading, refusing anything but a regular file.

    A FIFO, socket or device where a checkpoint or config file is expected would block or never
    end: it is opened without blocking, checked, and refused with a :class:`CheckpointError`.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "f"); write_durable(p, b"x")
        >>> with open_regular(p, p) as f: f.read()
        b'x'
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise CheckpointError(f"{where}: {kind}, where a regular file is expected; replace it with the file")
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_bounded(fs: Any, path: str, limit: int, where: str) -> bytes:
    """The whole file ``path`` if it holds at most ``limit`` bytes; raise :class:`CheckpointError`
    if not (a larger file is refused by its size, unread).

    Example:
        >>> fs, p = resolve("memory://bounded/x"); fs.pipe_file(p, b"abc")
        >>> read_bounded(fs, p, 10, "x")
        b'abc'
    """
    too_large = CheckpointError(f"{where}: larger than {limit} bytes; it is not a file fnloop wrote, or it is damaged")
    if is_local(fs):
        with open_regular(path, where) as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise too_large
            data = f.read(limit + 1)
    else:
        info = fs.info(path)
        if info.get("type", "file") != "file":
            raise CheckpointError(f"{where}: a {info.get('type')}, where a file is expected; replace it with the file")
        size = info.get("size")
        if isinstance(size, int) and size > limit:
            raise too_large
        with fs.open(path, "rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise too_large
    return data


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc: list[Any] = []


def _renameat2() -> Any:
    if not _libc:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.append(getattr(lib, "renameat2", None))
        except OSError:
            _libc.append(None)
    return _libc[0]


def rename_noreplace(src: str, dst: str) -> None:
    """Rename the local folder ``src`` to ``dst``, raising ``FileExistsError`` if ``dst`` exists.

    Atomic with ``renameat2(RENAME_NOREPLACE)`` (Linux); elsewhere ``dst`` is first claimed with
    an exclusive ``mkdir`` and the empty folder then replaced, so of two writers exactly one wins.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp(); os.mkdir(d + "/a"); os.mkdir(d + "/b")
        >>> try:
        ...     rename_noreplace(d + "/a", d + "/b")
        ... except FileExistsError:
        ...     print("b exists")
        b exists
    """
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), dst)
    os.mkdir(dst)
    os.rename(src, dst)


def exchange(a: str, b: str) -> bool:
    """Swap the local entries ``a`` and ``b`` in one atomic step (``renameat2(RENAME_EXCHANGE)``);
    False where the platform or filesystem cannot, and nothing changed.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp(); os.mkdir(d + "/a"); os.mkdir(d + "/b"); open(d + "/a/x", "w").close()
        >>> exchange(d + "/a", d + "/b") and os.listdir(d + "/b")
        ['x']
    """
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def create_exclusive(fs: Any, path: str, data: bytes | None = None) -> Any:
    """Create the file ``path`` only if it does not exist (``FileExistsError`` otherwise).

    Returns the open binary file when ``data`` is None (the caller writes and closes it).
    Object stores get a conditional write (``mode="xb"``) where the fsspec backend has one.

    Example:
        >>> fs, p = resolve("memory://excl/a"); create_exclusive(fs, p, b"1")
        >>> try:
        ...     create_exclusive(fs, p, b"2")
        ... except FileExistsError:
        ...     print("taken")
        taken
    """
    try:
        f = fs.open(path, "xb")
    except (ValueError, NotImplementedError, TypeError):  # a backend without conditional writes
        if fs.exists(path):
            raise FileExistsError(errno.EEXIST, "File exists", path) from None
        f = fs.open(path, "wb")
    if data is None:
        return f
    with f:
        f.write(data)
    return None
