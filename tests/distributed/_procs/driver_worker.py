"""One rank of a 2-rank DDP run of the driver's other stages: the subject of
tests/distributed/test_driver_ddp.py.

Usage: ``python driver_worker.py OUT_DIR`` with the torchrun rank variables set. It fits a small
model with two validation loaders (the model summary on, the default loggers writing under
``OUT_DIR/root``), validates on two loaders, predicts through a ``PredictionWriter`` into
``OUT_DIR/preds`` and writes ``OUT_DIR/driver-<rank>.pt``: the fit's logged validation metrics,
the validate metrics and the predictions this rank got back.
"""

from __future__ import annotations

import os
import sys

import torch

import fnloop as fl
import fnloop.optim as flo

N = 32
BATCH = 4


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def data(seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).cos())


def loss_fn(m, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(m(x), y)


def metric_fn(m, batch):
    x, y = batch
    err = (m(x) - y).abs()
    return {"loss": err.square().mean(), "err_max": err.max()}


def predict_fn(m, batch):
    return m(batch[0])


class Logged(fl.Callback):
    """The metrics of every validation run during fit."""

    def __init__(self) -> None:
        self.runs: list[dict[str, float]] = []

    def on_validation_end(self, state, metrics):
        self.runs.append(dict(metrics))


def loader(seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data(seed), batch_size=BATCH)


def main(out: str) -> int:
    rank = int(os.environ["RANK"])
    logged = Logged()
    trainer = fl.Trainer(
        max_steps=4, strategy="ddp", devices=2, accelerator="cpu", enable_progress_bar=False, num_sanity_val_steps=0,
        default_root_dir=os.path.join(out, "root"), callbacks=[logged, fl.PredictionWriter(os.path.join(out, "preds"))],
    )
    state = fl.TrainState.create(model(), flo.sgd(lr=0.1), seed=0)
    val = {"a": loader(1), "b": loader(2)}
    state = trainer.fit(state, fl.train_step(loss_fn), loader(0), val_step=fl.eval_step(metric_fn), val_data=val)
    metrics = trainer.validate(state, fl.eval_step(metric_fn), val, verbose=False)
    preds = trainer.predict(state, fl.predict_step(predict_fn), loader(3))
    params = {k: v.detach() for k, v in state.params.items()}
    record = {"fit": logged.runs, "validate": metrics, "preds": preds, "params": params}
    torch.save(record, os.path.join(out, f"driver-{rank}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
