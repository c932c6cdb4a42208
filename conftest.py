"""Names every docstring example may use without importing them: ``torch``, ``fl``, ``flo``."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    import torch

    import fnloop
    import fnloop.optim

    doctest_namespace.update(torch=torch, fl=fnloop, flo=fnloop.optim)
