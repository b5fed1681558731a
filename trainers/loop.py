"""The training loop: read `fit` straight down.

One host sync per epoch (the loss and metric sums are read once, after validation), plus
one every `nan_check_every` optimizer steps; everything else stays on the device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainers import metrics as metrics_mod
from trainers.callbacks import Dispatch, EarlyStopping
from trainers.checkpoint import Checkpoints
from trainers.config import TrainerConfig, check_clip_value, check_label_smoothing
from trainers.data import Data, Split, batches, n_batches, place
from trainers.loggers import build_loggers
from trainers.optim import Update, build_optimizer
from trainers.precision import autocast_for, scaler_for
from trainers.schedule import Schedule, build_schedule, merge
from trainers.steps import EvalStep, TrainStep, eval_step_for, train_step_for


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class OutOfMemoryError(torch.OutOfMemoryError):
    """The device ran out of memory; the message says where and with which settings."""


@dataclass
class State:
    """What callbacks see. `metrics` holds the latest epoch's values as plain floats."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainerConfig
    device: torch.device
    epoch: int = 0
    global_step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    should_stop: bool = False
    stop_reason: str | None = None
    schedule: Schedule | None = None
    scaler: torch.amp.GradScaler | None = None
    generator: torch.Generator | None = None
    callbacks: list[Any] = field(default_factory=list)
    best: float | None = None
    best_epoch: int = -1
    batch: tuple[torch.Tensor, ...] = ()
    batch_index: int = 0
    loss: torch.Tensor | None = None
    resumed: bool = False

    def stop(self, reason: str) -> None:
        """Ends training after the current epoch."""
        self.should_stop, self.stop_reason = True, reason

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was asked for, but CUDA is not available here")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            seen = {0: "no CUDA device", 1: "1 CUDA device (cuda:0)"}.get(count, f"{count} CUDA devices (cuda:0 to cuda:{count - 1})")
            raise RuntimeError(f"device {name!r} was asked for, but this process sees {seen}")
    return device


def fit(
    model: torch.nn.Module,
    data: Data,
    config: TrainerConfig,
    callbacks: Iterable[Any] = (),
    *,
    hparams: Mapping[str, Any] | None = None,
    kind: str = "classification",
    train_step: TrainStep | None = None,
    eval_step: EvalStep | None = None,
) -> State:
    """Trains `model` on `data` and returns the final state.

    Args:
        hparams: optimizer and schedule hyperparameters: ``optimizer`` (a name, or a dict with
            ``name`` and the optimizer's own arguments), ``lr``, ``weight_decay``, ``scheduler``
            (a name or a dict, merged over `config.scheduler`), ``label_smoothing`` and
            ``gradient_clip_val``; `config` gives defaults.
        kind: ``classification`` or ``regression``, selecting the default steps and metrics.
        train_step, eval_step: replace the defaults (see `trainers.steps`).
    """
    state, data, update, checkpoints = setup(model, data, config, list(callbacks), hparams or {})
    emit = Dispatch(state.callbacks)
    train_step = train_step or train_step_for(kind, label_smoothing=label_smoothing(config, hparams or {}))
    eval_step = eval_step or eval_step_for(kind, top_k=config.top_k)
    forward_model = torch.compile(state.model) if config.compile else state.model
    autocast = autocast_for(config.precision, state.device)
    steps_per_epoch = n_batches(data.train, config.batch_size)
    try:
        emit("on_fit_start", state)
        for epoch in range(state.epoch, config.epochs):
            if state.should_stop:
                break
            state.epoch = epoch
            emit("on_epoch_start", state)
            forward_model.train()
            loss_sum = torch.zeros((), device=state.device)
            for i, batch in enumerate(batches(data.train, config.batch_size, shuffle=config.shuffle,
                                              generator=state.generator, device=state.device,
                                              channels_last=config.channels_last)):
                state.batch, state.batch_index = batch, i
                emit("on_batch_start", state)
                with autocast():
                    loss = train_step(forward_model, batch)
                update.backward(loss)
                if (i + 1) % config.accumulate_grad_batches == 0 or i + 1 == steps_per_epoch:
                    update.step()
                    state.global_step += 1
                    if config.nan_check_every and state.global_step % config.nan_check_every == 0:
                        check_finite(loss_sum + loss.detach(), state)
                loss_sum += loss.detach()
                state.loss = loss
                emit("on_batch_end", state)
            emit("on_validation_start", state)
            train_loss = loss_sum / max(steps_per_epoch, 1)
            state.metrics = evaluate(forward_model, data.val, eval_step, config, state.device, autocast, train_loss)
            if not math.isfinite(state.metrics["train_loss"]):
                raise NonFiniteLossError(f"training loss is {state.metrics['train_loss']} at epoch {epoch}")
            state.history.append(state.metrics)
            emit("on_validation_end", state)
            if state.schedule is not None and state.schedule.interval == "epoch":
                state.schedule.scheduler.step(state.metrics[state.schedule.monitor])
            emit("on_epoch_end", state)
            if checkpoints is not None:
                checkpoints.save(state)
        if checkpoints is not None:
            checkpoints.wait()
        emit("on_fit_end", state)
    except torch.OutOfMemoryError as error:
        oom = OutOfMemoryError(
            f"out of memory on {state.device} at epoch {state.epoch}, optimizer step {state.global_step} "
            f"(batch_size {config.batch_size}, precision {config.precision}): {str(error).splitlines()[0]}"
        )
        if state.device.type == "cuda":
            torch.cuda.empty_cache()
        emit("on_exception", state, oom)
        raise oom from error
    except BaseException as error:
        emit("on_exception", state, error)
        raise
    finally:
        if checkpoints is not None:
            with contextlib.suppress(BaseException):  # the error in flight, if any, wins
                checkpoints.wait()
    return state


def setup(
    model: torch.nn.Module, data: Data, config: TrainerConfig, callbacks: list[Any], hparams: Mapping[str, Any]
) -> tuple[State, Data, Update, Checkpoints | None]:
    """Device, data placement, optimizer, schedule, scaler, built-in callbacks, and resume."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    autocast_for(config.precision, device)  # fails here, before any work, if the device cannot
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    model = model.to(device, memory_format=torch.channels_last) if config.channels_last else model.to(device)
    data = place(data, device, on_device=config.data_on_device, batch_size=config.batch_size,
                 eval_batch_size=config.eval_batch_size, shuffle=config.shuffle, generator=generator,
                 num_workers=config.num_workers, channels_last=config.channels_last)
    # Sparse gradients (an embedding with sparse=True) are the one thing the fused kernels refuse.
    sparse = any(getattr(module, "sparse", False) is True for module in model.modules())
    optimizer = build_optimizer(model.parameters(), optimizer_spec(config, hparams), fuse=not sparse)
    windows = -(-n_batches(data.train, config.batch_size) // config.accumulate_grad_batches)
    spec = merge(config.scheduler, hparams.get("scheduler"))
    schedule = None
    if spec is not None:
        schedule = build_schedule(optimizer, spec, total_steps=windows * config.epochs,
                                  steps_per_epoch=windows, monitor=config.monitor, mode=config.direction)
    scaler = scaler_for(config.precision, device)
    state = State(model=model, optimizer=optimizer, config=config, device=device, schedule=schedule,
                  scaler=scaler, generator=generator, callbacks=[*built_in_callbacks(config, config.log_dir), *callbacks])
    update = Update(optimizer, accumulate=config.accumulate_grad_batches, scaler=scaler,
                          clip_val=clip_value(config, hparams), clip_algorithm=config.gradient_clip_algorithm,
                          schedule=schedule)
    checkpoints = None
    if config.checkpoint_dir is not None:
        checkpoints = Checkpoints(Path(config.checkpoint_dir), monitor=config.monitor, mode=config.direction,
                                  save_last=config.save_last, save_best=config.save_best,
                                  every=config.checkpoint_every, epochs=config.epochs)
        state.resumed = config.resume and checkpoints.resume(state)
    return state, data, update, checkpoints


def check_finite(value: torch.Tensor, state: State) -> float:
    """Reads `value` (one host sync) and raises `NonFiniteLossError` when it is NaN or inf."""
    number = value.item()
    if not math.isfinite(number):
        raise NonFiniteLossError(
            f"training loss is {number} at epoch {state.epoch} (detected by optimizer step {state.global_step})"
        )
    return number


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, split: Split, eval_step: EvalStep, config: TrainerConfig, device: torch.device,
    autocast: Callable[[], Any] = contextlib.nullcontext, train_loss: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean of each eval-step quantity over the split, prefixed ``val_``, and `train_loss`: one host sync."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in batches(split, config.eval_batch_size, shuffle=False, generator=None, device=device,
                         channels_last=config.channels_last):
        with autocast():
            metrics_mod.accumulate(sums, eval_step(model, batch))
        count += len(batch[0])
    return metrics_mod.finalize(sums, count, {} if train_loss is None else {"train_loss": train_loss})


def built_in_callbacks(config: TrainerConfig, log_dir: str | None) -> list[Any]:
    """The config's loggers (into `log_dir`) and early stopping. They go before the caller's
    callbacks, so the epoch is logged and early stopping decided even when a later one raises."""
    built_in: list[Any] = build_loggers(config.loggers, log_dir) if log_dir else []
    if config.early_stopping_patience is not None:
        built_in.append(EarlyStopping(config.monitor, config.early_stopping_patience,
                                      config.early_stopping_min_delta, config.direction))
    return built_in


def clip_value(config: TrainerConfig, hparams: Mapping[str, Any]) -> float | None:
    """The trial's ``gradient_clip_val`` hyperparameter, else the config's (None: no clipping)."""
    return check_clip_value(hparams.get("gradient_clip_val", config.gradient_clip_val))


def label_smoothing(config: TrainerConfig, hparams: Mapping[str, Any]) -> float:
    """The trial's ``label_smoothing`` hyperparameter, else the config's."""
    return check_label_smoothing(hparams.get("label_smoothing", config.label_smoothing))


def optimizer_spec(config: TrainerConfig, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Merges the trial's optimizer hyperparameters over the config's defaults."""
    chosen = hparams.get("optimizer", config.optimizer)
    spec: dict[str, Any] = dict(chosen) if isinstance(chosen, Mapping) else {"name": chosen}
    spec.setdefault("name", config.optimizer)
    spec.setdefault("lr", hparams.get("lr", config.lr))
    spec.setdefault("weight_decay", hparams.get("weight_decay", config.weight_decay))
    return spec
