"""Default training and validation steps for classification and regression.

A train step maps (model, batch) to a scalar loss. An eval step maps (model, batch)
to per-batch *sums* of per-sample quantities (see `trainers.metrics`); the loop divides
by the sample count, so each reported metric is an exact mean over the validation set,
computed on the device without a host sync per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from trainers.config import METRICS  # noqa: F401  (here too: the steps report these)
from trainers.metrics import classification_sums, regression_sums

TrainStep = Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
EvalStep = Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], dict[str, torch.Tensor]]


def classification_train_step(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], *, label_smoothing: float = 0.0
) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)


def classification_eval_step(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], *, top_k: int = 5
) -> dict[str, torch.Tensor]:
    x, y = batch
    return classification_sums(model(x), y, top_k)


def regression_train_step(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x).reshape(y.shape), y)


def regression_eval_step(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...]
) -> dict[str, torch.Tensor]:
    x, y = batch
    return regression_sums(model(x), y)


_STEPS: dict[str, tuple[TrainStep, EvalStep]] = {
    "classification": (classification_train_step, classification_eval_step),
    "regression": (regression_train_step, regression_eval_step),
}



def train_step_for(kind: str, *, label_smoothing: float = 0.0) -> TrainStep:
    if kind == "classification" and label_smoothing:
        return partial(classification_train_step, label_smoothing=label_smoothing)
    return _STEPS[kind][0]


def eval_step_for(kind: str, *, top_k: int = 5) -> EvalStep:
    if kind == "classification":
        return partial(classification_eval_step, top_k=top_k)
    return _STEPS[kind][1]
