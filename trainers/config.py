"""The trainer's settings: one flat dataclass, so a YAML section maps onto it 1:1."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

PRECISIONS = ("32", "bf16-mixed", "fp16-mixed")
LOGGERS = ("csv", "tensorboard", "mlflow")

# The metric names each kind reports by default, as the loop names them (train_* and val_*);
# the top-k name follows TrainerConfig.top_k (5 by default). Here, beside the config, so that
# reading them needs no torch.
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("train_loss", "val_loss", "val_accuracy", "val_top5_accuracy", "val_f1"),
    "regression": ("train_loss", "val_loss", "val_mse", "val_mae"),
}


@dataclass(frozen=True)
class TrainerConfig:
    """Settings of one training run.

    Args:
        epochs: passes over the training data.
        batch_size: training (micro-)batch size; one optimizer step sees
            ``batch_size * accumulate_grad_batches`` samples.
        eval_batch_size: validation batch size; validation needs no gradients, so it can be large.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        seed: seeds weight init (when the caller builds the model after `seed_everything`)
            and the shuffling order; ``None`` leaves the RNG alone.
        optimizer: default optimizer name when the hyperparameters do not name one.
        lr: default learning rate when the hyperparameters do not give one.
        weight_decay: default weight decay when the hyperparameters do not give one.
        label_smoothing: classification's training loss is cross-entropy against targets smoothed
            by this much (a trial's ``label_smoothing`` hyperparameter overrides it); the
            validation loss stays plain cross-entropy, so trials with different smoothing compare.
        threads: torch CPU threads for this run; ``None`` keeps torch's choice.
        shuffle: reshuffle the training set every epoch.
        precision: ``32``, ``bf16-mixed`` or ``fp16-mixed`` (autocast; fp16 adds a gradient scaler).
        accumulate_grad_batches: micro-batches whose gradients are summed before one optimizer step.
        gradient_clip_val: clip gradients to this norm (or value); ``None`` disables clipping.
        gradient_clip_algorithm: ``norm`` (total L2 norm) or ``value`` (each element).
        scheduler: learning-rate schedule, a name or ``{name: ..., options}``; see `trainers.schedule`.
            The hyperparameters' ``scheduler`` entry overrides it key by key.
        monitor: metric that picks the best checkpoint, drives early stopping and the plateau schedule.
        mode: ``min``, ``max`` or ``auto`` (max for accuracy, top-k and F1, min otherwise).
        early_stopping_patience: epochs without improvement of `monitor` before stopping; ``None`` never stops.
        early_stopping_min_delta: smallest change of `monitor` that counts as an improvement.
        checkpoint_dir: where ``last.pt`` and ``best.pt`` go (one directory per trial); ``None`` saves nothing.
        save_last: write ``last.pt`` after every `checkpoint_every` epochs, and after the last one.
        checkpoint_every: epochs between writes of ``last.pt``; a resume redoes at most this many minus
            one. Each write costs about 2 ms of interpreter time for a small model (pickling on a
            background thread that shares the GIL), which shows only when epochs take milliseconds.
        save_best: write ``best.pt`` whenever `monitor` improves.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        log_dir: where the loggers write (one directory per trial); ``None`` logs nothing.
        loggers: any of ``csv``, ``tensorboard``, ``mlflow`` (the last two are optional installs).
        top_k: k of the ``val_top{k}_accuracy`` metric of classification.
        nan_check_every: optimizer steps between checks for a non-finite loss (each costs one host sync);
            ``0`` checks only at the end of each epoch.
        compile: wrap the model with `torch.compile` (recompiles for every new architecture).
        channels_last: channels-last memory format for the model and 4-d inputs (faster conv nets on GPU).
        data_on_device: keep tensor data on the device; ``None`` does so when it fits in half the free memory.
        num_workers: DataLoader workers when tensor data does not stay on the device.
    """

    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 1024
    device: str = "auto"
    seed: int | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    threads: int | None = None
    shuffle: bool = True
    precision: str | int = "32"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    scheduler: str | dict[str, Any] | None = None
    monitor: str = "val_loss"
    mode: str = "auto"
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    checkpoint_dir: str | None = None
    save_last: bool = True
    checkpoint_every: int = 1
    save_best: bool = True
    resume: bool = True
    log_dir: str | None = None
    loggers: list[str] = field(default_factory=lambda: ["csv"])
    top_k: int = 5
    nan_check_every: int = 100
    compile: bool = False
    channels_last: bool = False
    data_on_device: bool | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "accumulate_grad_batches", "top_k", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer but got {value!r}.")
        for name in ("nan_check_every", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer but got {value!r}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive but got {self.lr!r}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay cannot be negative but got {self.weight_decay!r}.")
        check_label_smoothing(self.label_smoothing)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1 but got {self.threads!r}.")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N but got {self.device!r}.")
        if str(self.precision) not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} but got {self.precision!r}.")
        check_clip_value(self.gradient_clip_val)
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be norm or value but got {self.gradient_clip_algorithm!r}.")
        if self.mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be auto, min or max but got {self.mode!r}.")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience cannot be negative but got {self.early_stopping_patience!r}.")
        if self.early_stopping_min_delta < 0:
            raise ValueError(f"early_stopping_min_delta cannot be negative but got {self.early_stopping_min_delta!r}.")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise ValueError(f"loggers must be among {', '.join(LOGGERS)} but got {unknown!r}.")
        if self.scheduler is not None:
            from trainers.schedule import check_spec

            check_spec(self.scheduler)

    @property
    def direction(self) -> str:
        """``min`` or ``max`` for `monitor`, resolving ``auto`` from the metric's name."""
        return resolve_mode(self.monitor, self.mode)


def check_clip_value(value: object) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"gradient_clip_val must be positive but got {value!r}.")
    return value


def check_label_smoothing(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"label_smoothing must be at least 0 and below 1 but got {value!r}.")
    return float(value)


def resolve_mode(metric: str, mode: str = "auto") -> str:
    if mode != "auto":
        return mode
    return "max" if any(word in metric for word in ("accuracy", "f1", "top")) else "min"
