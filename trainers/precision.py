"""Mixed precision: the autocast context and, for fp16, the gradient scaler."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def autocast_for(precision: str | int, device: torch.device) -> Callable[[], Any]:
    """A factory of the forward pass's context; raises when `device` cannot run `precision`."""
    precision = str(precision)
    if precision == "32":
        return contextlib.nullcontext
    dtype = DTYPES[precision]
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"precision {precision} is supported on cpu and cuda, not on {device.type}")
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(f"precision bf16-mixed needs a GPU with bfloat16 support; {name} has none (use fp16-mixed)")
    return lambda: torch.autocast(device.type, dtype=dtype)


def scaler_for(precision: str | int, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device.type) if str(precision) == "fp16-mixed" else None
