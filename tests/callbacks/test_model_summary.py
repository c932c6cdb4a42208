"""ModelSummary: counts and sizes per top-level module against torch's own counts, printed when
fit starts unless ``enable_model_summary=False``."""

from __future__ import annotations

import io

import pytest
import torch

import fnloop as fl
from fnloop.callbacks.model_summary import format_summary, summarize

import loop_scenarios as sc  # noqa: E402  (tests/conftest.py puts it on sys.path)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8))
        self.head = torch.nn.Linear(8, 2)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.frozen(self.head(self.encoder(x))) * self.scale


def _reference(module, name):
    sub = module.get_submodule(name)
    params = list(sub.parameters())
    size = sum(t.numel() * t.element_size() for t in [*params, *sub.buffers()])
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), size


@pytest.mark.parametrize("name", ["encoder", "head", "frozen"])
def test_rows_match_torch_counts(name):
    module = Net()
    rows = {r.name: r for r in summarize(fl.TrainState.create(module, fl.optim.sgd(lr=0.1)))}
    assert tuple(rows[name][2:]) == _reference(module, name)
    assert rows[""].params == 1 and rows[""].kind == "Net"  # the root's own parameter
    assert sum(r.params for r in rows.values()) == sum(p.numel() for p in module.parameters())


def test_deeper_rows_and_the_table_totals():
    rows = summarize(fl.TrainState.create(Net(), fl.optim.sgd(lr=0.1)), max_depth=2)
    assert [r.name for r in rows] == ["", "encoder", "encoder.0", "encoder.1", "head", "frozen"]
    table = format_summary(summarize(fl.TrainState.create(Net(), fl.optim.sgd(lr=0.1))))
    total = sum(p.numel() for p in Net().parameters())
    assert f"{total:<10,}Total params" in table and f"{6:<10,}Non-trainable params" in table


@pytest.mark.parametrize("enabled", [True, False])
def test_printed_at_fit_start_when_enabled(enabled, capsys):
    trainer = fl.Trainer(max_epochs=1, enable_progress_bar=False, logger=False, enable_model_summary=enabled)
    trainer.fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(1))
    out = capsys.readouterr().out
    assert ("Total params" in out) is enabled


def test_a_summary_callback_with_its_own_stream():
    stream = io.StringIO()
    trainer = sc.quiet_trainer(max_epochs=1, callbacks=[fl.ModelSummary(stream=stream)])
    trainer.fit(sc.linear_state(), fl.train_step(sc.mse), sc.batches(1))
    assert "4         Total params" in stream.getvalue()
