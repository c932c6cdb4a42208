"""Callbacks: hooks that receive the state and may return a new one."""

from fnloop.callbacks.base import Callback as Callback
from fnloop.callbacks.base import callback_state as callback_state
from fnloop.callbacks.base import request_stop as request_stop
from fnloop.callbacks.base import with_callback_state as with_callback_state
from fnloop.callbacks.early_stopping import EarlyStopping as EarlyStopping
from fnloop.callbacks.misc import LearningRateMonitor as LearningRateMonitor
from fnloop.callbacks.misc import Timer as Timer
from fnloop.callbacks.misc import parse_duration as parse_duration
from fnloop.callbacks.privacy import PrivacyMonitor as PrivacyMonitor
from fnloop.callbacks.model_summary import ModelSummary as ModelSummary
from fnloop.callbacks.plateau import ReduceLROnPlateau as ReduceLROnPlateau
from fnloop.callbacks.prediction_writer import PredictionWriter as PredictionWriter
from fnloop.callbacks.prediction_writer import read_predictions as read_predictions
from fnloop.callbacks.progress import ProgressBar as ProgressBar
from fnloop.callbacks.swa import StochasticWeightAveraging as StochasticWeightAveraging
