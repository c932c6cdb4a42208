"""Pure metric accumulators: ``init`` / ``update`` / ``merge`` / ``compute`` over tensor states.

A metric is a small frozen object with pure methods; its accumulator state is a NamedTuple
of tensors (a pytree), so it can be merged across processes, checkpointed or carried inside
a compiled function. ``init``, ``update`` and ``merge`` never read a value back to the host
(no ``.item()``, ``float()``, ``bool()``): ``compute`` returns tensors and the caller converts
them at the logging boundary.

Precision: values are accumulated in ``float64`` on the value's device (``float32`` on
devices without ``float64`` support, such as MPS). Values of any shape are accumulated
elementwise across updates; ``compute`` returns a tensor of the value's shape.

:class:`Accumulator` maps metric names to accumulator states, the way the driver reduces the
``metrics`` dict a step returns over an epoch or a logging window.

Example:
    >>> import torch
    >>> from fnloop.metrics import Accumulator
    >>> acc = Accumulator()
    >>> accs = acc.init()
    >>> accs = acc.update(accs, {"loss": torch.tensor(1.0)}, batch_size=3)
    >>> accs = acc.update(accs, {"loss": torch.tensor(3.0)}, batch_size=1)
    >>> acc.compute(accs)["loss"]
    tensor(1.5000, dtype=torch.float64)
"""

from fnloop.metrics.accumulator import DEFAULT_REDUCTIONS as DEFAULT_REDUCTIONS
from fnloop.metrics.accumulator import Accumulator as Accumulator
from fnloop.metrics.metric import Accuracy as Accuracy
from fnloop.metrics.metric import AccuracyState as AccuracyState
from fnloop.metrics.metric import ExtremumState as ExtremumState
from fnloop.metrics.metric import Max as Max
from fnloop.metrics.metric import Mean as Mean
from fnloop.metrics.metric import MeanState as MeanState
from fnloop.metrics.metric import Metric as Metric
from fnloop.metrics.metric import Min as Min
from fnloop.metrics.metric import Sum as Sum
from fnloop.metrics.metric import SumState as SumState
