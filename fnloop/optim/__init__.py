"""Optimizers in the optax shape, with the numerics of ``torch.optim``.

Example:
    >>> import fnloop.optim as flo
    >>> tx = flo.chain(flo.clip_by_global_norm(1.0), flo.adamw(lr=flo.warmup_cosine(1e-3, warmup_steps=10, decay_steps=100)))
"""

from fnloop.optim._learning_rate import ScaleByLearningRateState as ScaleByLearningRateState
from fnloop.optim._learning_rate import ScaleByScheduleState as ScaleByScheduleState
from fnloop.optim._learning_rate import scale_by_learning_rate as scale_by_learning_rate
from fnloop.optim._learning_rate import scale_by_schedule as scale_by_schedule
from fnloop.optim._scale import ScaleByAdamState as ScaleByAdamState
from fnloop.optim._scale import ScaleByRmsState as ScaleByRmsState
from fnloop.optim._scale import ScaleByRssState as ScaleByRssState
from fnloop.optim._scale import TraceState as TraceState
from fnloop.optim._scale import scale as scale
from fnloop.optim._scale import scale_by_adam as scale_by_adam
from fnloop.optim._scale import scale_by_rms as scale_by_rms
from fnloop.optim._scale import scale_by_rss as scale_by_rss
from fnloop.optim._scale import trace as trace
from fnloop.optim.aliases import adagrad as adagrad
from fnloop.optim.aliases import adam as adam
from fnloop.optim.aliases import adamw as adamw
from fnloop.optim.aliases import rmsprop as rmsprop
from fnloop.optim.aliases import sgd as sgd
from fnloop.optim.averaging import EmaParamsState as EmaParamsState
from fnloop.optim.averaging import averaged_params as averaged_params
from fnloop.optim.averaging import ema_params as ema_params
from fnloop.optim.dp import DPState as DPState
from fnloop.optim.dp import PerExampleGradientTransformation as PerExampleGradientTransformation
from fnloop.optim.dp import dp_aggregate as dp_aggregate
from fnloop.optim.dp import dp_sgd as dp_sgd
from fnloop.optim.dp import dp_state as dp_state
from fnloop.optim.base import EmptyState as EmptyState
from fnloop.optim.base import GradientTransformation as GradientTransformation
from fnloop.optim.base import apply_updates as apply_updates
from fnloop.optim.base import as_schedule as as_schedule
from fnloop.optim.base import chain as chain
from fnloop.optim.base import from_apply as from_apply
from fnloop.optim.base import fused_apply as fused_apply
from fnloop.optim.base import identity as identity
from fnloop.optim.base import learning_rate as learning_rate
from fnloop.optim.grad_norms import GradNormState as GradNormState
from fnloop.optim.grad_norms import grad_norms as grad_norms
from fnloop.optim.grad_norms import track_grad_norms as track_grad_norms
from fnloop.optim.grad_norms import tracked_grads as tracked_grads
from fnloop.optim.partition import MultiTransformState as MultiTransformState
from fnloop.optim.partition import multi_transform as multi_transform
from fnloop.optim.partition import set_to_zero as set_to_zero
from fnloop.optim.plateau import PlateauState as PlateauState
from fnloop.optim.plateau import plateau_lr as plateau_lr
from fnloop.optim.plateau import plateau_step as plateau_step
from fnloop.optim.plateau import reduce_on_plateau as reduce_on_plateau
from fnloop.optim.schedules import constant as constant
from fnloop.optim.schedules import exponential as exponential
from fnloop.optim.schedules import join as join
from fnloop.optim.schedules import linear as linear
from fnloop.optim.schedules import multistep as multistep
from fnloop.optim.schedules import one_cycle as one_cycle
from fnloop.optim.schedules import step_lr as step_lr
from fnloop.optim.schedules import warmup_cosine as warmup_cosine
from fnloop.optim.transforms import MaskedState as MaskedState
from fnloop.optim.transforms import add_decayed_weights as add_decayed_weights
from fnloop.optim.transforms import clip as clip
from fnloop.optim.transforms import clip_by_global_norm as clip_by_global_norm
from fnloop.optim.transforms import global_norm as global_norm
from fnloop.optim.transforms import masked as masked
from fnloop.optim.transforms import ndim_mask as ndim_mask
from fnloop.optim.wrappers import ApplyIfFiniteState as ApplyIfFiniteState
from fnloop.optim.wrappers import EmaState as EmaState
from fnloop.optim.wrappers import MultiStepsState as MultiStepsState
from fnloop.optim.wrappers import apply_if_finite as apply_if_finite
from fnloop.optim.wrappers import ema as ema
from fnloop.optim.wrappers import multi_steps as multi_steps
from fnloop.optim.wrappers import multi_steps_flush as multi_steps_flush
