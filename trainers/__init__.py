"""A small, fast training loop for PyTorch models, usable on its own.

`trainers` knows nothing about hyperparameter search: pruning, logging and
checkpointing reach the loop through the callback protocol in `callbacks.py`.
"""

from trainers.callbacks import EVENTS, Callback, EarlyStopping
from trainers.checkpoint import Checkpoints, atomic_save
from trainers.checkpoint import load as load_checkpoint
from trainers.config import TrainerConfig
from trainers.data import Data, as_data
from trainers.loggers import CSVLogger, MLflowLogger, TensorBoardLogger
from trainers.loop import NonFiniteLossError, OutOfMemoryError, State, fit, resolve_device
from trainers.optim import Update, build_optimizer
from trainers.schedule import build_schedule
from trainers.steps import METRICS, eval_step_for, train_step_for

__all__ = [
    "EVENTS",
    "METRICS",
    "CSVLogger",
    "Callback",
    "Checkpoints",
    "Data",
    "EarlyStopping",
    "MLflowLogger",
    "NonFiniteLossError",
    "OutOfMemoryError",
    "State",
    "TensorBoardLogger",
    "TrainerConfig",
    "Update",
    "as_data",
    "atomic_save",
    "build_optimizer",
    "build_schedule",
    "eval_step_for",
    "fit",
    "load_checkpoint",
    "resolve_device",
    "train_step_for",
]
