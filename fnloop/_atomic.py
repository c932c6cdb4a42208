"""Replacing a small local text file atomically: readers see the old or the new file, never a mix.

Example:
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> with replacing(p) as f:
    ...     _ = f.write("hello")
    >>> with open(p) as f:
    ...     f.read()
    'hello'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

__all__ = ["replacing"]


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], *, newline: str | None = None) -> Iterator[IO[str]]:
    """Write a temporary sibling of ``path`` inside the block, then rename it over ``path``;
    on an exception the temporary file is removed and ``path`` is left as it was."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline=newline, encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
