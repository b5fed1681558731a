"""Learning-rate schedules from a plain spec: ``{"name": "cosine", "warmup_steps": 100, ...}``.

Each schedule is stepped where its definition lives: ``cosine``, ``warmup``, ``step`` and
``one-cycle`` after every optimizer step, ``plateau`` after every validation (it needs the
monitored metric). ``step``, ``cosine`` and ``warmup`` are closed-form factors of the base
learning rate (one `LambdaLR`), so a linear warm-up composes with them exactly and a resumed
run recomputes the same value from the step count alone.

Specs, with their options and defaults:

- ``step``: ``step_size`` (epochs, 1), ``gamma`` (0.1), ``warmup_steps`` (0)
- ``cosine``: ``min_lr`` (0.0), ``warmup_steps`` (0); anneals to `min_lr` at the last step
- ``warmup``: ``warmup_steps``; linear from ``lr / warmup_steps`` to ``lr``, then constant
- ``one-cycle``: ``max_lr`` (the optimizer's lr), ``pct_start`` (0.3), ``div_factor`` (25),
  ``final_div_factor`` (1e4), ``anneal_strategy`` (cos)
- ``plateau``: ``factor`` (0.1), ``patience`` (10), ``threshold`` (1e-4), ``min_lr`` (0),
  ``monitor`` (the trainer's monitor), ``mode`` (the trainer's mode)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

OPTIONS: dict[str, set[str]] = {
    "step": {"step_size", "gamma", "warmup_steps"},
    "cosine": {"min_lr", "warmup_steps"},
    "warmup": {"warmup_steps"},
    "one-cycle": {"max_lr", "pct_start", "div_factor", "final_div_factor", "anneal_strategy"},
    "plateau": {"factor", "patience", "threshold", "min_lr", "monitor", "mode"},
}


@dataclass
class Schedule:
    """A torch scheduler and when the loop steps it: after each optimizer ``step`` or each ``epoch``."""

    scheduler: LRScheduler | ReduceLROnPlateau
    interval: str
    monitor: str | None = None


def as_spec(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    return {"name": spec} if isinstance(spec, str) else dict(spec)


def check_spec(spec: Any) -> None:
    """Raises ValueError (starting with ``scheduler``) for an unknown name or option."""
    if not isinstance(spec, (str, Mapping)):
        raise ValueError(f"scheduler must be a name or a mapping but got {spec!r}.")
    spec = as_spec(spec)
    name = spec.pop("name", None)
    if name not in OPTIONS:
        raise ValueError(f"scheduler name must be one of {', '.join(OPTIONS)} but got {name!r}.")
    unknown = sorted(set(spec) - OPTIONS[name])
    if unknown:
        raise ValueError(f"scheduler {name} has no option {', '.join(unknown)} (it takes {', '.join(sorted(OPTIONS[name]))}).")


def merge(config_spec: Any, trial_spec: Any) -> dict[str, Any] | None:
    """The trial's scheduler hyperparameters over the config's; a new name replaces the options."""
    if trial_spec is None:
        return as_spec(config_spec) if config_spec is not None else None
    trial = as_spec(trial_spec)
    base = as_spec(config_spec) if config_spec is not None else {}
    if "name" in trial and trial["name"] != base.get("name"):
        base = {}
    return {**base, **trial}


def build_schedule(
    optimizer: torch.optim.Optimizer,
    spec: Mapping[str, Any],
    *,
    total_steps: int,
    steps_per_epoch: int,
    monitor: str,
    mode: str,
) -> Schedule:
    """Builds the scheduler for `spec`; `total_steps` counts optimizer steps over the whole run."""
    check_spec(spec)
    options = dict(spec)
    name = options.pop("name")
    if name == "plateau":
        monitor = options.pop("monitor", monitor)
        options["mode"] = options.get("mode", mode)
        return Schedule(ReduceLROnPlateau(optimizer, **options), "epoch", monitor)
    if name == "one-cycle":
        options.setdefault("max_lr", [group["lr"] for group in optimizer.param_groups])
        return Schedule(OneCycleLR(optimizer, total_steps=max(total_steps, 2), **options), "step")
    warmup = int(options.get("warmup_steps", 0))
    if name == "warmup" and warmup < 1:
        raise ValueError(f"scheduler warmup needs warmup_steps >= 1 but got {warmup}.")
    if name == "step":
        step_size, gamma = int(options.get("step_size", 1)), float(options.get("gamma", 0.1))

        def decay(step: int) -> float:
            return gamma ** (step // (step_size * steps_per_epoch))
    elif name == "cosine":
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        floor = float(options.get("min_lr", 0.0)) / base_lrs[0]
        span = max(total_steps - warmup, 1)

        def decay(step: int) -> float:
            progress = min(max(step - warmup, 0) / span, 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:

        def decay(step: int) -> float:
            return 1.0

    def factor(step: int) -> float:
        ramp = (step + 1) / warmup if step < warmup else 1.0
        return ramp * decay(step)

    return Schedule(LambdaLR(optimizer, factor), "step")
