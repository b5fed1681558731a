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
# torch's fused kernels and the device types they run on. torch.optim defaults to them nowhere (on
# the CPU it takes a Python loop per tensor), yet they are the fastest on every size measured here:
# an Adam step of the digits MLP (26k parameters, one thread) took 85 us fused, 216 us foreach and
# 244 us by default; SGD 38 against 82; even a single parameter's Adam step is faster fused.
FUSED_DEVICES = {"adam": ("cpu", "cuda"), "adamw": ("cpu", "cuda"), "sgd": ("cpu", "cuda"), "adagrad": ("cpu",)}
# Options by which a spec picks the implementation itself: then it is left to the spec.
IMPLEMENTATION = ("fused", "foreach", "differentiable", "capturable")


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], spec: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """Builds a torch optimizer; `beta1`/`beta2` become Adam's ``betas`` so each can be tuned alone.

    Keys other than ``name`` are passed to the optimizer, which rejects the ones it does not take.
    Adam, AdamW, SGD and Adagrad use torch's fused kernel where every parameter is a floating-point
    tensor on a device it runs on, unless the spec chooses (``fused``, ``foreach``, ...).
    """
    kwargs = dict(spec)
    name = str(kwargs.pop("name", "adam")).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (expected one of {', '.join(OPTIMIZERS)})")
    if "beta1" in kwargs or "beta2" in kwargs:
        kwargs["betas"] = (kwargs.pop("beta1", 0.9), kwargs.pop("beta2", 0.999))
    parameters = list(parameters)
    if not any(key in kwargs for key in IMPLEMENTATION) and _fusable(name, parameters):
        kwargs["fused"] = True
    try:
        return OPTIMIZERS[name](parameters, **kwargs)
    except TypeError as err:
        raise ValueError(f"optimizer {name}: {err}") from None


def _fusable(name: str, parameters: list) -> bool:
    """Whether torch's fused kernel for `name` takes all of `parameters` (tensors or param groups).
    torch checks only at the first step, too late to choose another implementation."""
    tensors = [p for item in parameters for p in (item["params"] if isinstance(item, Mapping) else [item])]
    return name in FUSED_DEVICES and all(p.is_floating_point() and p.device.type in FUSED_DEVICES[name] for p in tensors)


def kernel_flags(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's implementation choice, to keep across `load_state_dict` (see `restore_kernels`)."""
    return [{key: group[key] for key in ("fused", "foreach", "capturable") if key in group} for group in optimizer.param_groups]


def restore_kernels(optimizer: torch.optim.Optimizer, flags: list[dict[str, Any]]) -> None:
    """Puts back the implementation that this run chose after `load_state_dict`, which takes the
    saved run's: a checkpoint written on a GPU may resume on a CPU and the other way round, where
    the saved choice may not run (fused Adagrad exists for the CPU only). The step counters then
    move where this implementation keeps them: by the parameter for fused, on the CPU otherwise."""
    for group, chosen in zip(optimizer.param_groups, flags):
        group.update(chosen)
        on_device = group.get("fused") or group.get("capturable")
        # torch.optim's own choice of the counter's dtype (float64 only for unfused steps under a float64 default).
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 and not group.get("fused") else torch.float32
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = step.to(p.device if on_device else "cpu", dtype)


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
