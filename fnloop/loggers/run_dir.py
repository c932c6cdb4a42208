"""Run folders: ``<root_dir>/<name>/version_<n>/``, created once and shared by every sink.

:func:`resolve_run_dir` picks and creates the folder; the next free version is reserved with
``os.makedirs(exist_ok=False)``, so two processes starting at once never share a version.
:class:`RunDir` defers that choice to the first write (on global rank 0 only) and can be
handed to several sinks so that they all write into the same folder.

Example:
    >>> import tempfile
    >>> from fnloop.loggers.run_dir import resolve_run_dir
    >>> root = tempfile.mkdtemp()
    >>> resolve_run_dir(root, "exp").endswith("version_0")
    True
    >>> resolve_run_dir(root, "exp").endswith("version_1")
    True
"""

from __future__ import annotations

import os
import re

from fnloop.errors import ConfigError
from fnloop.loggers.rank import is_global_zero

__all__ = ["resolve_run_dir", "next_version", "RunDir"]

_VERSION_RE = re.compile(r"version_(\d+)")
_MAX_ATTEMPTS = 1000


def _base_dir(root_dir: str | os.PathLike[str], name: str | None) -> str:
    root = os.fspath(root_dir)
    if not root:
        raise ConfigError("root_dir is empty: give a folder for the runs, e.g. root_dir='runs'")
    return os.path.join(root, name) if name else root


def next_version(root_dir: str | os.PathLike[str], name: str | None = "default") -> int:
    """One more than the highest ``version_<n>`` entry under ``root_dir/name`` (0 if none).

    Gaps are not reused: with ``version_0`` deleted and ``version_1`` present this is 2.

    Example:
        >>> import tempfile
        >>> next_version(tempfile.mkdtemp(), "exp")
        0
    """
    base = _base_dir(root_dir, name)
    try:
        entries = os.listdir(base)
    except FileNotFoundError:
        return 0
    found = [int(m.group(1)) for e in entries if (m := _VERSION_RE.fullmatch(e))]
    return max(found) + 1 if found else 0


def _check_version(version: int | str | None) -> None:
    if version is None:
        return
    if isinstance(version, bool) or not isinstance(version, (int, str)):
        raise ConfigError(
            f"version={version!r} is not accepted: give None (next free version), an int >= 0 "
            "or a folder name"
        )
    if isinstance(version, int) and version < 0:
        raise ConfigError(f"version={version} is negative: give None, an int >= 0 or a folder name")
    if isinstance(version, str) and (not version or os.sep in version or version in (".", "..")):
        raise ConfigError(
            f"version={version!r} is not a plain folder name: drop path separators, or pass "
            "the whole path as log_dir"
        )


def resolve_run_dir(
    root_dir: str | os.PathLike[str] = "runs",
    name: str | None = "default",
    version: int | str | None = None,
) -> str:
    """Create and return the run folder ``root_dir/name/version_<n>``.

    Args:
        root_dir: folder holding every run.
        name: experiment name; ``None`` or ``""`` puts versions directly under ``root_dir``.
        version: ``None`` takes the next free integer (raced safely: the folder is created with
            ``exist_ok=False`` and the next number is tried when another process won it); an int
            ``n`` uses ``version_<n>``; a string is used as the folder name. A given version
            may already exist (a resumed run) and is then reused.

    Returns:
        The path of the folder, which exists on return.

    Raises:
        ConfigError: ``version`` is invalid or the folder cannot be created.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> resolve_run_dir(root, "exp", version=7).endswith(os.path.join("exp", "version_7"))
        True
    """
    _check_version(version)
    base = _base_dir(root_dir, name)
    try:
        if version is not None:
            folder = version if isinstance(version, str) else f"version_{version}"
            path = os.path.join(base, folder)
            os.makedirs(path, exist_ok=True)
            return path
        for _ in range(_MAX_ATTEMPTS):
            path = os.path.join(base, f"version_{next_version(root_dir, name)}")
            try:
                os.makedirs(path, exist_ok=False)
            except FileExistsError:
                continue
            return path
    except OSError as err:
        raise ConfigError(
            f"cannot create the run folder under {base!r} ({err}): pick a writable "
            "root_dir or pass log_dir"
        ) from err
    raise ConfigError(
        f"no free version folder under {base!r} after {_MAX_ATTEMPTS} attempts: pass "
        "version= or log_dir explicitly"
    )


class RunDir:
    """A run folder chosen on first use and shared by the sinks that hold it.

    Nothing is created before :attr:`path` is read on global rank 0. On any other rank the
    folder is never created and :attr:`path` is the explicit ``log_dir`` or ``None``.

    Args:
        root_dir: folder holding every run (ignored when ``log_dir`` is given).
        name: experiment name (ignored when ``log_dir`` is given).
        version: see :func:`resolve_run_dir`.
        log_dir: use exactly this folder (created if missing) instead of a versioned one.

    Example:
        >>> import tempfile
        >>> run = RunDir(tempfile.mkdtemp(), "exp")
        >>> run.resolved
        False
        >>> run.path.endswith("version_0") and run.resolved
        True
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str] = "runs",
        name: str | None = "default",
        version: int | str | None = None,
        *,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        _check_version(version)
        self.root_dir = os.fspath(root_dir)
        self.name = name
        self.version = version
        self.explicit = None if log_dir is None else os.fspath(log_dir)
        self._path: str | None = None
        self._writer: bool | None = None

    @property
    def key(self) -> tuple[str, str | None, int | str | None]:
        """``(root_dir, name, version)``: sinks with equal keys belong in one folder."""
        return (self.root_dir, self.name, self.version)

    @property
    def is_writer(self) -> bool:
        """Whether this process writes (global rank 0); read once, then cached."""
        if self._writer is None:
            self._writer = is_global_zero()
        return self._writer

    @property
    def resolved(self) -> bool:
        """Whether the folder was already chosen and created."""
        return self._path is not None

    @property
    def path(self) -> str | None:
        """The folder, created on first access on rank 0; see the class docstring."""
        if self._path is None:
            if not self.is_writer:
                return self.explicit
            if self.explicit is not None:
                try:
                    os.makedirs(self.explicit, exist_ok=True)
                except OSError as err:
                    raise ConfigError(
                        f"cannot create log_dir={self.explicit!r} ({err}): pick a writable folder"
                    ) from err
                self._path = self.explicit
            else:
                self._path = resolve_run_dir(self.root_dir, self.name, self.version)
        return self._path

    def __repr__(self) -> str:
        where = self._path or self.explicit or os.path.join(self.root_dir, self.name or "")
        return f"RunDir({where!r}, resolved={self.resolved})"
