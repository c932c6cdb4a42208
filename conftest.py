"""Names every docstring example may use without importing them: ``torch``, ``fl``, ``flo``;
and a temporary working directory for the whole session, since a Trainer's default logger
writes to ``./runs`` (as Lightning's writes to ``./lightning_logs``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _session_cwd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        yield
    finally:
        os.chdir(previous)


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    import torch

    import fnloop
    import fnloop.optim

    doctest_namespace.update(torch=torch, fl=fnloop, flo=fnloop.optim)
