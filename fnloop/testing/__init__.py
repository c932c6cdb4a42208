"""Tools to test training code written with fnloop.

``fnloop.testing`` holds assertions that compare pytrees by key path, check that a step is
pure, and check that an interrupted and resumed run ends bitwise where an uninterrupted one does; ``fnloop.testing.strategies`` holds hypothesis strategies (tensors, pytrees, batches,
train states) and is imported on its own, as it needs ``hypothesis``.

Example:
    >>> import torch, fnloop as fl, fnloop.optim as flo
    >>> from fnloop.testing import assert_pure, assert_trees_close
    >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
    >>> step = fl.train_step(lambda model, batch: model(batch).square().mean())
    >>> new_state, _ = assert_pure(step, state, torch.ones(4, 2))
    >>> assert_trees_close(new_state.params, fl.tree_map(lambda p: p.clone(), new_state.params))
"""

from fnloop.testing.asserts import assert_pure as assert_pure
from fnloop.testing.asserts import assert_trees_close as assert_trees_close
from fnloop.testing.asserts import assert_trees_equal as assert_trees_equal
from fnloop.testing.resume import assert_resume_equivalent as assert_resume_equivalent

__all__ = ["assert_pure", "assert_trees_close", "assert_trees_equal", "assert_resume_equivalent"]
