"""A small, fast training loop for PyTorch models, usable on its own.

`trainers` knows nothing about hyperparameter search: pruning, logging and
checkpointing reach the loop through the callback protocol in `callbacks.py`.

The names below are imported when first used: `trainers.config` needs no torch, and a program
that only reads a study's settings (`hpo status`) need not pay torch's second of import.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# name -> (module, attribute)
_EXPORTS = {
    "EVENTS": ("callbacks", "EVENTS"),
    "Callback": ("callbacks", "Callback"),
    "EarlyStopping": ("callbacks", "EarlyStopping"),
    "Checkpoints": ("checkpoint", "Checkpoints"),
    "atomic_save": ("checkpoint", "atomic_save"),
    "load_checkpoint": ("checkpoint", "load"),
    "TrainerConfig": ("config", "TrainerConfig"),
    "METRICS": ("config", "METRICS"),
    "Data": ("data", "Data"),
    "as_data": ("data", "as_data"),
    "CSVLogger": ("loggers", "CSVLogger"),
    "MLflowLogger": ("loggers", "MLflowLogger"),
    "TensorBoardLogger": ("loggers", "TensorBoardLogger"),
    "NonFiniteLossError": ("loop", "NonFiniteLossError"),
    "OutOfMemoryError": ("loop", "OutOfMemoryError"),
    "State": ("loop", "State"),
    "fit": ("loop", "fit"),
    "resolve_device": ("loop", "resolve_device"),
    "Update": ("optim", "Update"),
    "build_optimizer": ("optim", "build_optimizer"),
    "build_schedule": ("schedule", "build_schedule"),
    "eval_step_for": ("steps", "eval_step_for"),
    "train_step_for": ("steps", "train_step_for"),
}

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        # A submodule (`trainers.metrics`) reads as an attribute of the package, as when this
        # file imported them all.
        if importlib.util.find_spec(f"trainers.{name}") is None:
            raise AttributeError(f"module 'trainers' has no attribute {name!r}")
        return importlib.import_module(f"trainers.{name}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f"trainers.{module}"), attribute)
    globals()[name] = value  # once: later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # what type checkers and editors see
    from trainers.callbacks import EVENTS, Callback, EarlyStopping
    from trainers.checkpoint import Checkpoints, atomic_save
    from trainers.checkpoint import load as load_checkpoint
    from trainers.config import METRICS, TrainerConfig
    from trainers.data import Data, as_data
    from trainers.loggers import CSVLogger, MLflowLogger, TensorBoardLogger
    from trainers.loop import NonFiniteLossError, OutOfMemoryError, State, fit, resolve_device
    from trainers.optim import Update, build_optimizer
    from trainers.schedule import build_schedule
    from trainers.steps import eval_step_for, train_step_for
