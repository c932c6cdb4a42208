"""The digits task for the ``fnloop`` command line: the model, loss and predict functions and the
data module that ``examples/digits.yaml`` names by import path.

    fnloop fit --config examples/digits.yaml                 # from the repository root
    python examples/digits_task.py [--quick]                 # the same (``--quick``: 8 epochs)
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset


class MLP(torch.nn.Module):
    """``in_features -> hidden -> hidden -> num_classes`` with ReLU, dropout after the first layer.

    Example:
        >>> MLP()(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(in_features, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def loss_fn(model, batch):
    """Cross-entropy and accuracy; used for training and evaluation."""
    x, y = batch
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def predict_fn(model, batch):
    """The predicted class of each image."""
    return model(batch[0]).argmax(-1)


class DigitsData:
    """scikit-learn's bundled digits (8x8 images, 10 classes) split 70/15/15, scaled to [0, 1].

    Example:
        >>> data = DigitsData(batch_size=32)
        >>> data.setup("fit")
        >>> len(data.train_data().dataset), len(data.val_data().dataset)
        (1257, 270)
    """

    def __init__(self, batch_size: int = 32, eval_batch_size: int = 256, split_seed: int = 0) -> None:
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.split_seed = split_seed
        self._splits: tuple[TensorDataset, TensorDataset, TensorDataset] | None = None

    def setup(self, stage: str) -> None:
        if self._splits is not None:
            return
        from sklearn.datasets import load_digits  # imported here: a config error is reported without it
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y, dtype=torch.int64)
        seed = self.split_seed
        x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
        x_val, x_test, y_val, y_test = train_test_split(
            x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest
        )
        self._splits = TensorDataset(x_train, y_train), TensorDataset(x_val, y_val), TensorDataset(x_test, y_test)

    def _split(self, i: int) -> TensorDataset:
        if self._splits is None:
            self.setup("fit")
        return self._splits[i]

    def train_data(self) -> DataLoader:
        return DataLoader(self._split(0), batch_size=self.batch_size, shuffle=True)

    def val_data(self) -> DataLoader:
        return DataLoader(self._split(1), batch_size=self.eval_batch_size)

    def test_data(self) -> DataLoader:
        return DataLoader(self._split(2), batch_size=self.eval_batch_size)

    def predict_data(self) -> DataLoader:
        return self.test_data()


if __name__ == "__main__":
    from fnloop.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    quick = ["--trainer.max_epochs", "8"] if "--quick" in sys.argv[1:] else []
    sys.exit(main(["fit", "--config", "examples/digits.yaml", *quick]))
