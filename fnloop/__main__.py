"""``python -m fnloop ...`` runs the ``fnloop`` command line (see :mod:`fnloop.cli`)."""

from __future__ import annotations

import sys

from fnloop.cli import main

if __name__ == "__main__":
    sys.exit(main())
