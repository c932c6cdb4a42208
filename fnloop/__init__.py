"""fnloop: a functional, immutable-state training engine for PyTorch."""

from fnloop import connectors as connectors
from fnloop import metrics as metrics
from fnloop import rng as rng
from fnloop import execution as execution
from fnloop import step as step
from fnloop import testing as testing
from fnloop import registry as registry
from fnloop.callbacks import Callback as Callback
from fnloop.callbacks import EarlyStopping as EarlyStopping
from fnloop.callbacks import LearningRateMonitor as LearningRateMonitor
from fnloop.callbacks import ProgressBar as ProgressBar
from fnloop.callbacks import Timer as Timer
from fnloop.callbacks import request_stop as request_stop
from fnloop.checkpoint import CheckpointManager as CheckpointManager
from fnloop.checkpoint import ModelCheckpoint as ModelCheckpoint
from fnloop.checkpoint import restore as restore
from fnloop.checkpoint import restore_params as restore_params
from fnloop.checkpoint import restore_weights as restore_weights
from fnloop.checkpoint import save as save
from fnloop.connectors.device import to_device as to_device
from fnloop.connectors.strategy import DDPStrategy as DDPStrategy
from fnloop.loggers import ConsoleLogger as ConsoleLogger
from fnloop.loggers import CSVLogger as CSVLogger
from fnloop.loggers import JSONLLogger as JSONLLogger
from fnloop.loggers import TensorBoardLogger as TensorBoardLogger
from fnloop.bind import bind as bind
from fnloop.errors import CheckpointError as CheckpointError
from fnloop.errors import ConfigError as ConfigError
from fnloop.errors import FnloopError as FnloopError
from fnloop.errors import StepError as StepError
from fnloop.errors import TreeMismatchError as TreeMismatchError
from fnloop.state import LoopState as LoopState
from fnloop.state import Status as Status
from fnloop.state import TrainState as TrainState
from fnloop.execution import compile as compile  # noqa: A004
from fnloop.eval_steps import eval_step as eval_step
from fnloop.eval_steps import predict_step as predict_step
from fnloop.step import train_step as train_step
from fnloop.trainer import Trainer as Trainer
from fnloop.tree import check_same_structure as check_same_structure
from fnloop.tree import dataclass as dataclass
from fnloop.tree import field as field
from fnloop.tree import keystr as keystr
from fnloop.tree import tree_flatten as tree_flatten
from fnloop.tree import tree_flatten_with_path as tree_flatten_with_path
from fnloop.tree import tree_leaves as tree_leaves
from fnloop.tree import tree_map as tree_map
from fnloop.tree import tree_map_with_path as tree_map_with_path
from fnloop.tree import tree_paths as tree_paths
from fnloop.tree import tree_structure as tree_structure
from fnloop.tree import tree_unflatten as tree_unflatten

__version__ = "0.1.0"
