"""Saving in the background: copy the tensors off the live state, then write on one worker thread.

Example:
    >>> import torch
    >>> from fnloop.checkpoint._background import BackgroundWriter
    >>> writer = BackgroundWriter()
    >>> live = {"w": torch.zeros(2)}
    >>> copy = writer.snapshot(live)
    >>> _ = live["w"].add_(1)
    >>> writer.submit(print, copy["w"]); writer.close()
    tensor([0., 0.])
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from fnloop.tree import tree_flatten_with_path

__all__ = ["BackgroundWriter"]


class BackgroundWriter:
    """One worker thread that runs one job at a time; a job's error is raised by the next call.

    ``snapshot`` copies the tensor leaves of a tree to contiguous CPU tensors, reusing the
    buffers of the previous snapshot where path, shape and dtype match (a copy into memory
    already mapped is several times faster than a fresh allocation). Call it only when no
    job is running (``submit`` and ``wait`` ensure that), since the running job reads them.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[Any] | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    def snapshot(self, tree: Any) -> Any:
        """``tree`` with every tensor leaf copied to a CPU buffer the caller does not hold.

        Example:
            >>> import torch
            >>> BackgroundWriter().snapshot({"w": torch.ones(2).t()})["w"].is_contiguous()
            True
        """
        self.wait()
        paths, leaves, spec = tree_flatten_with_path(tree)
        buffers: dict[str, torch.Tensor] = {}
        out = []
        with torch.no_grad():
            for path, leaf in zip(paths, leaves):
                if isinstance(leaf, torch.Tensor):
                    buf = self._buffers.get(path)
                    if buf is not None and buf.shape == leaf.shape and buf.dtype == leaf.dtype:
                        buf.copy_(leaf)
                    else:
                        buf = leaf.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                    buffers[path] = buf
                    leaf = buf
                out.append(leaf)
        self._buffers = buffers
        return spec.unflatten(out)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the worker thread after the previous job (whose error is raised here).

        Example:
            >>> w = BackgroundWriter(); w.submit(print, "written"); w.wait()
            written
        """
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fnloop-checkpoint")
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Block until the running job ends; raise its error if it failed (once).

        Example:
            >>> BackgroundWriter().wait()
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the running job (raising its error), stop the thread, free the buffers.

        Example:
            >>> BackgroundWriter().close()
        """
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._buffers = {}
