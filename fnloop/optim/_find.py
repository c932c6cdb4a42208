"""Find a transform's state inside a (chained, wrapped) optimizer state."""

from __future__ import annotations

from typing import Any


def find_state(opt_state: Any, kind: type) -> Any:
    """The first node of type ``kind`` in ``opt_state`` (depth first), or None.

    Example:
        >>> import torch, fnloop.optim as flo
        >>> find_state(flo.dp_sgd(0.1, 1.0, 1.0).init({"w": torch.ones(1)}), flo.DPState).count
        tensor(0)
    """
    if isinstance(opt_state, kind):
        return opt_state
    children = opt_state.values() if isinstance(opt_state, dict) else opt_state if isinstance(opt_state, (list, tuple)) else ()
    for child in children:
        found = find_state(child, kind)
        if found is not None:
            return found
    return None
