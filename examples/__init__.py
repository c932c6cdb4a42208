"""Examples, importable as ``examples.digits_task`` from the repository root (a regular package, so
that a top-level ``examples`` package installed by another distribution does not shadow it)."""
