"""Stream predictions to safetensors files as ``Trainer.predict`` produces them, so that
``predict(..., return_predictions=False)`` keeps nothing in memory (Lightning's
``BasePredictionWriter`` with ``write_interval="batch"`` or ``"epoch"``).

Files, in ``output_dir``:

* ``write_interval="batch"``: ``predictions_<dataloader_idx>_<batch_idx>.safetensors``, one per
  batch, written when the batch is done;
* ``"epoch"``: ``predictions_<dataloader_idx>.safetensors`` per loader, written at the end
  (the batches of a loader are kept until then, as Lightning's epoch writer does).

The outputs of a batch may be a tensor or a pytree of tensors; each leaf is stored under its
key path (``"0"``, ``"logits"``, ``"out.probs"``); in epoch files the key is prefixed by the
batch index (``"3/logits"``). :func:`read_predictions` reads them back in order.

Example:
    >>> import tempfile, torch, fnloop as fl, fnloop.optim as flo
    >>> out = tempfile.mkdtemp()
    >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
    >>> trainer = fl.Trainer(callbacks=[PredictionWriter(out)], enable_progress_bar=False, logger=False)
    >>> trainer.predict(state, fl.predict_step(lambda m, b: m(b)), [torch.ones(3, 2)] * 2, return_predictions=False)
    >>> [t.shape for t in read_predictions(out)]
    [torch.Size([3, 1]), torch.Size([3, 1])]
"""

from __future__ import annotations

import os
import re
from typing import Any

import optree
import torch
from safetensors.torch import load_file, save_file

from fnloop.callbacks.base import Callback
from fnloop.errors import ConfigError
from fnloop.loggers.rank import is_global_zero

__all__ = ["PredictionWriter", "read_predictions"]

_SEP = "."


def _flat(outputs: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        keyed = {"output": outputs}
    else:
        paths, leaves, _ = optree.tree_flatten_with_path(outputs, namespace="fnloop")
        keyed = {_SEP.join(map(str, path)): leaf for path, leaf in zip(paths, leaves)}
    out = {}
    for key, leaf in keyed.items():
        if not isinstance(leaf, torch.Tensor):
            raise ConfigError(
                f"PredictionWriter: the predict step returned a {type(leaf).__name__} at {key!r}; only tensors can be written"
            )
        out[f"{prefix}/{key}" if prefix else key] = leaf.detach().to("cpu").contiguous()
    return out


class PredictionWriter(Callback):
    """Write predictions to ``output_dir`` per batch or per loader (see the module docstring).

    Args:
        output_dir: a local folder (created when missing).
        write_interval: ``"batch"`` or ``"epoch"``.

    Example:
        >>> PredictionWriter("preds", write_interval="epoch").write_interval
        'epoch'
    """

    def __init__(self, output_dir: str | os.PathLike[str], write_interval: str = "batch") -> None:
        if write_interval not in ("batch", "epoch"):
            raise ConfigError(f"PredictionWriter(write_interval={write_interval!r}): accepted values are 'batch' and 'epoch'")
        self.output_dir = os.fspath(output_dir)
        self.write_interval = write_interval
        self._kept: dict[int, dict[str, torch.Tensor]] = {}

    def _write(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        save_file(tensors, os.path.join(self.output_dir, name))

    def on_predict_epoch_start(self, state: Any) -> Any:
        self._kept = {}

    def on_predict_batch_end(self, state: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> Any:
        if not is_global_zero():
            return
        if self.write_interval == "batch":
            self._write(_flat(outputs), f"predictions_{dataloader_idx}_{batch_idx}.safetensors")
        else:
            self._kept.setdefault(dataloader_idx, {}).update(_flat(outputs, str(batch_idx)))

    def on_predict_epoch_end(self, state: Any) -> Any:
        for idx, tensors in self._kept.items():
            self._write(tensors, f"predictions_{idx}.safetensors")
        self._kept = {}


def read_predictions(output_dir: str | os.PathLike[str], dataloader_idx: int = 0) -> list[Any]:
    """The predictions of one loader, in batch order: a tensor per batch when the step returned
    a tensor, else a ``{key path: tensor}`` dict per batch.

    Example:
        >>> import tempfile
        >>> read_predictions(tempfile.mkdtemp())
        []
    """
    folder = os.fspath(output_dir)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    per_batch = sorted(
        (int(m.group(1)), n) for n in names if (m := re.fullmatch(rf"predictions_{dataloader_idx}_(\d+)\.safetensors", n))
    )
    batches: list[dict[str, torch.Tensor]] = [load_file(os.path.join(folder, n)) for _, n in per_batch]
    epoch_file = os.path.join(folder, f"predictions_{dataloader_idx}.safetensors")
    if os.path.exists(epoch_file):
        grouped: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in load_file(epoch_file).items():
            b, _, rest = key.partition("/")
            grouped.setdefault(int(b), {})[rest] = t
        batches = [grouped[b] for b in sorted(grouped)]
    return [d["output"] if list(d) == ["output"] else d for d in batches]
