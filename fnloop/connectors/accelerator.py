"""The accelerator and strategy connector of a fit: this process's place in the run, the state
on its device and in its precision, and the train step's options for both.

Example:
    >>> config = fl.Trainer(precision="64-true", enable_progress_bar=False).config
    >>> state = fl.TrainState.create(torch.nn.Linear(2, 1), flo.sgd(lr=0.1))
    >>> parallel, state, options = setup(config, state, None)
    >>> parallel.world_size, state.params["weight"].dtype, options.precision
    (1, torch.float64, '64-true')
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from fnloop.connectors.device import state_to_device
from fnloop.connectors.launch import connect
from fnloop.connectors.precision import cast_state
from fnloop.connectors.strategy import Parallel
from fnloop.errors import ConfigError

if TYPE_CHECKING:
    from fnloop.loops.config import LoopConfig
    from fnloop.options import StepOptions

__all__ = ["setup", "step_options", "prepare_state"]


def step_options(flags: StepOptions, own: StepOptions | None, parallel: Parallel) -> StepOptions:
    """The train step's options: the Trainer's ``flags`` (accumulation, clipping, non-finite
    skipping, precision; the step's ``own`` precision when the Trainer keeps the default) with the
    gradient reduction of the run's strategy."""
    precision = flags.precision
    if own is not None and precision == "32-true":
        precision = own.precision
    elif own is not None and own.precision not in ("32-true", precision):
        raise ConfigError(
            f"Trainer(precision={flags.precision!r}): the train step was built with precision={own.precision!r}; set it in one place"
        )
    return dataclasses.replace(flags, precision=precision, grad_reduce=parallel.reducer())


def prepare_state(state: Any, parallel: Parallel, precision: str, *, sync_batchnorm: bool = False) -> Any:
    """``state`` on this process's device, cast to ``precision`` (``*-true``), its BatchNorm
    layers synchronised across ranks when asked (``sync_batchnorm`` in a distributed run)."""
    state = cast_state(state_to_device(state, parallel.device), precision)
    if sync_batchnorm and parallel.distributed:
        if parallel.device.type != "cuda":
            raise ConfigError("Trainer(sync_batchnorm=True): torch's SyncBatchNorm runs on CUDA devices only; use accelerator='cuda'")
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(state.module))
        state = state.replace(module=module)
    return parallel.strategy.setup_state(state, parallel) if parallel.strategy is not None and parallel.distributed else state


def setup(config: LoopConfig, state: Any, train_step: Any) -> tuple[Parallel, Any, StepOptions]:
    """``(parallel, state, options)``: join (or start) the processes ``config`` describes
    (accelerator, devices, num_nodes, strategy), prepare the state and compute the step's options."""
    parallel = connect(config)
    options = step_options(config.step, getattr(train_step, "options", None), parallel)
    return parallel, prepare_state(state, parallel, options.precision, sync_batchnorm=config.sync_batchnorm), options
