"""Shared scenarios of the kernel tests: small models, losses, seeded batches.

Test files import it as ``import kernel_scenarios as sc`` (``tests/conftest.py`` puts this
folder on ``sys.path``).

Models are built with seeded weights inside ``torch.random.fork_rng``: building one never
moves the caller's global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import fnloop as fl

N_FEATURES = 6
N_CLASSES = 3
HIDDEN = 16
Batch = tuple[torch.Tensor, torch.Tensor]


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_mlp(seed: int = 0) -> torch.nn.Module:
    """``6-16-3`` MLP with a tanh: no randomness, no buffers."""
    def build() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(N_FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, N_CLASSES)
        )

    return _seeded(seed, build)


class DropoutBNMLP(torch.nn.Module):
    """``fc1 -> bn (BatchNorm1d) -> relu -> drop (Dropout) -> fc2``: randomness and buffers."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.fc1 = torch.nn.Linear(N_FEATURES, HIDDEN)
        self.bn = torch.nn.BatchNorm1d(HIDDEN)
        self.drop = torch.nn.Dropout(p)
        self.fc2 = torch.nn.Linear(HIDDEN, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def make_dropout_bn_mlp(seed: int = 0, p: float = 0.5) -> torch.nn.Module:
    """A :class:`DropoutBNMLP` with seeded weights."""
    return _seeded(seed, lambda: DropoutBNMLP(p))


class TiedMLP(torch.nn.Module):
    """``enc`` and ``dec`` share one weight Parameter (``dec.weight is enc.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(N_FEATURES, N_FEATURES)
        self.dec = torch.nn.Linear(N_FEATURES, N_FEATURES)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.enc(x)))


def make_tied(seed: int = 0) -> torch.nn.Module:
    """A :class:`TiedMLP` with seeded weights."""
    return _seeded(seed, TiedMLP)


def loss_fn(model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy with the accuracy as an aux metric."""
    x, y = batch
    logits = model(x)
    acc = (logits.argmax(-1) == y).to(torch.float32).mean()
    return F.cross_entropy(logits, y), {"acc": acc}


def plain_loss(model: Any, batch: Batch) -> torch.Tensor:
    """Cross-entropy alone."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def tied_loss(model: Any, batch: Batch) -> torch.Tensor:
    """Reconstruction loss of :class:`TiedMLP` (``batch = (x, _)``)."""
    x, _ = batch
    return F.mse_loss(model(x), x)


def eval_fn(model: Any, batch: Batch) -> dict[str, torch.Tensor]:
    """Loss and accuracy as a dict of scalars."""
    loss, aux = loss_fn(model, batch)
    return {"loss": loss, **aux}


def predict_fn(model: Any, batch: Batch) -> torch.Tensor:
    """The logits."""
    return model(batch[0])


def make_batch(size: int = 8, seed: int = 0) -> Batch:
    """A seeded classification batch ``(x float32 [size, 6], y int64 [size])``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, N_FEATURES, generator=g), torch.randint(0, N_CLASSES, (size,), generator=g)


def make_batches(n: int, size: int = 8, seed: int = 0) -> list[Batch]:
    """``n`` seeded batches."""
    return [make_batch(size, seed * 1000 + i) for i in range(n)]


def module_like(make: Callable[[], torch.nn.Module], state: fl.TrainState) -> torch.nn.Module:
    """``make()`` holding ``state``'s params and buffers: a plain module to run as a reference."""
    out = _seeded(0, make)
    out.load_state_dict({**state.params, **state.buffers})
    return out


def stack(states: list[Any]) -> Any:
    """Stack the tensor leaves of states that share their static fields (for ``vmap``)."""
    return fl.tree_map(lambda *xs: torch.stack(xs) if isinstance(xs[0], torch.Tensor) else xs[0], *states)


def in_dims(stacked: Any) -> Any:
    """``vmap`` dims of a stacked state: 0 for tensors, None for Python leaves."""
    return fl.tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, stacked)


def unstack(stacked: Any, i: int) -> Any:
    """Slice ``i`` of a stacked tree."""
    return fl.tree_map(lambda x: x[i] if isinstance(x, torch.Tensor) else x, stacked)
