"""Optimizer from a plain spec, and one optimizer update (accumulation, scaling, clipping, schedule).

The update is kept apart from the forward step so that other loops (a stacked model of many
trials, data parallel) can reuse it with their own step and their own metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from trainers.schedule import Schedule

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], spec: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """Builds a torch optimizer; `beta1`/`beta2` become Adam's ``betas`` so each can be tuned alone.

    Keys other than ``name`` are passed to the optimizer, which rejects the ones it does not take.
    """
    kwargs = dict(spec)
    name = str(kwargs.pop("name", "adam")).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (expected one of {', '.join(OPTIMIZERS)})")
    if "beta1" in kwargs or "beta2" in kwargs:
        kwargs["betas"] = (kwargs.pop("beta1", 0.9), kwargs.pop("beta2", 0.999))
    try:
        return OPTIMIZERS[name](parameters, **kwargs)
    except TypeError as err:
        raise ValueError(f"optimizer {name}: {err}") from None


class Update:
    """Backward of a micro-batch, and every `accumulate`-th call an optimizer step.

    Args:
        scaler: fp16's gradient scaler; a step whose gradients hold inf/NaN is skipped by it.
        clip_val, clip_algorithm: clip by total ``norm`` or by ``value``; ``None`` does not clip.
        schedule: stepped after each optimizer step when its interval is ``step``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        accumulate: int = 1,
        scaler: torch.amp.GradScaler | None = None,
        clip_val: float | None = None,
        clip_algorithm: str = "norm",
        schedule: Schedule | None = None,
    ) -> None:
        self.optimizer, self.accumulate, self.scaler = optimizer, accumulate, scaler
        self.clip_val, self.clip_algorithm = clip_val, clip_algorithm
        self.per_step = schedule.scheduler if schedule is not None and schedule.interval == "step" else None
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def backward(self, loss: torch.Tensor) -> None:
        # Dividing by the window makes the summed gradients those of the mean loss over it.
        loss = loss / self.accumulate if self.accumulate > 1 else loss
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        if self.clip_val is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            if self.clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(self.parameters, self.clip_val, foreach=True)
            else:
                torch.nn.utils.clip_grad_value_(self.parameters, self.clip_val, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._zero_grad()
        if self.per_step is not None:
            self.per_step.step()

    def _zero_grad(self) -> None:
        """`optimizer.zero_grad(set_to_none=True)`, which is this loop, without the wrapper torch
        puts around it (dynamo's guard and a profiler hook: 17 us a step, 2.5 % of a digits MLP
        epoch). A callback may have added a param group since: its parameters are taken too."""
        if sum(len(group["params"]) for group in self.optimizer.param_groups) != len(self.parameters):
            self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        for p in self.parameters:
            p.grad = None
