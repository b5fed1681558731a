"""Optimizer from a plain spec, and one optimizer update (accumulation, scaling, clipping, schedule).

The update is kept apart from the forward step so that other loops (a stacked model of many
trials, data parallel) can reuse it with their own step and their own metrics.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
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
# Adagrad's only on the CPU: the one device where every torch this package accepts has it.
FUSED_DEVICES = {"adam": ("cpu", "cuda"), "adamw": ("cpu", "cuda"), "sgd": ("cpu", "cuda"), "adagrad": ("cpu",)}
# Options by which a spec or a param group picks the implementation itself: then it is left to them.
IMPLEMENTATION = ("fused", "foreach", "differentiable", "capturable")


def options(name: str) -> set[str]:
    """The keys a spec for optimizer `name` may hold besides ``name``: its class's keyword
    arguments, and ``beta1``/``beta2`` where it takes ``betas``."""
    taken = set(inspect.signature(OPTIMIZERS[name]).parameters) - {"self", "params"}
    return taken | {"beta1", "beta2"} if "betas" in taken else taken


def build_optimizer(
    parameters: Iterable[Any], spec: Mapping[str, Any], *, fuse: bool = True
) -> torch.optim.Optimizer:
    """Builds a torch optimizer; `beta1`/`beta2` become Adam's ``betas`` so each can be tuned alone.

    Keys other than ``name`` are passed to the optimizer, which rejects the ones it does not take.
    `parameters` as torch takes them: tensors, (name, tensor) pairs or param groups. With `fuse`,
    Adam, AdamW, SGD and Adagrad use torch's fused kernel where every parameter is a floating-point
    tensor on a device it runs on, unless the spec or a param group chooses (``fused``,
    ``foreach``, ...); `fit` turns it off for models with sparse gradients, which it does not take.
    """
    kwargs = dict(spec)
    name = str(kwargs.pop("name", "adam")).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (expected one of {', '.join(OPTIMIZERS)})")
    if "beta1" in kwargs or "beta2" in kwargs:
        kwargs["betas"] = (kwargs.pop("beta1", 0.9), kwargs.pop("beta2", 0.999))
    parameters = list(parameters)
    if fuse and _fusable(name, parameters, kwargs):
        try:
            return OPTIMIZERS[name](parameters, fused=True, **kwargs)
        except (TypeError, RuntimeError):
            pass  # a torch without this kernel: its default below, which also names a wrong option
    try:
        return OPTIMIZERS[name](parameters, **kwargs)
    except TypeError as err:
        raise ValueError(f"optimizer {name}: {err}") from None


def _fusable(name: str, parameters: list, spec: Mapping[str, Any]) -> bool:
    """Whether torch's fused kernel for `name` takes all of `parameters` and nothing chose another
    implementation. torch checks the parameters only at the first step, too late to fall back."""
    groups = [item for item in parameters if isinstance(item, Mapping)]
    if name not in FUSED_DEVICES or any(key in chosen for chosen in (spec, *groups) for key in IMPLEMENTATION):
        return False
    return all(p.is_floating_point() and p.device.type in FUSED_DEVICES[name] for p in _tensors(parameters))


def _tensors(parameters: list) -> Iterator[torch.Tensor]:
    for item in parameters:
        inner = item["params"] if isinstance(item, Mapping) else [item]
        for p in [inner] if isinstance(inner, torch.Tensor) else inner:
            yield p[1] if isinstance(p, tuple) else p  # named_parameters() gives (name, tensor)


def as_implemented_by(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's saved `state_dict` with the implementation that `optimizer` (this run's) chose,
    for its `load_state_dict`, which would take the saved run's: a checkpoint written on a GPU may
    resume on a CPU and the other way round, where the saved choice may not run. torch then puts
    the step counters where this implementation keeps them."""
    current = optimizer.param_groups
    groups = [{**group, **{key: current[i][key] for key in IMPLEMENTATION if key in current[i]}} if i < len(current) else group
              for i, group in enumerate(saved["param_groups"])]
    return {**saved, "param_groups": groups}


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
