"""One trial: params from the space, model and data from the task's factories, the shared
loop with a pruning callback, and the metric(s) back."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import optuna
import torch

import trainers
import trainers.writer
from hpo import outage, overlap
from hpo import space as space_mod
from hpo import task as task_mod
from hpo.config import Config


@dataclass
class Task:
    """The user's factories, imported once per worker."""

    model_fn: Callable[..., torch.nn.Module]
    data_fn: Callable[..., Any]
    train_step: Callable | None
    eval_step: Callable | None
    model_takes_data: bool
    data_takes_params: bool
    cached_data: trainers.Data | None = None

    def data(self, params: dict[str, Any]) -> trainers.Data:
        if not self.data_takes_params:
            # A data factory that ignores the params gives the same data every trial: build once.
            if self.cached_data is None:
                self.cached_data = trainers.as_data(self.data_fn())
            return self.cached_data
        return trainers.as_data(self.data_fn(params))

    def model(self, params: dict[str, Any], data: trainers.Data) -> torch.nn.Module:
        model = self.model_fn(params, data) if self.model_takes_data else self.model_fn(params)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
        return model


def prepare(config: Config) -> Task:
    t = config.task
    model_fn = task_mod.load_callable(t.model)
    # Once-per-process costs would otherwise land on the first trial and skew its timing (the
    # report's timeline and waste figures): torch's first optimizer imports torch._dynamo
    # (about a second), and data that does not depend on the params is built once anyway.
    import torch._dynamo  # noqa: F401
    task = Task(
        model_fn=model_fn,
        data_fn=task_mod.load_callable(t.data),
        train_step=task_mod.load_callable(t.train_step) if t.train_step else None,
        eval_step=task_mod.load_callable(t.eval_step) if t.eval_step else None,
        model_takes_data=task_mod.binds(model_fn, 2) is True,  # as `config` checked: (params, data), else (params)
        data_takes_params=task_mod.takes_params(task_mod.load_callable(t.data)),
    )
    if not task.data_takes_params:
        with contextlib.suppress(Exception):  # a failing factory fails the first trial, recorded there
            task.data({})
    if config.trainer.checkpoint_dir:
        # The checkpoint writer process imports torch (about a second) while the worker starts.
        trainers.writer.start()
    return task


class PruningCallback:
    """Reports the study's metric after each validation; raises `optuna.TrialPruned` when told to.

    The report's storage write goes through `write`: at once, or on the worker's storage thread
    (`hpo.overlap`) while training goes on. The pruner decides from the trial's values held here.
    """

    def __init__(self, trial: optuna.Trial, metric: str, patience: float = outage.DEFAULT_PATIENCE,
                 write: overlap.Write = overlap.at_once) -> None:
        self.trial, self.metric, self.patience, self.write = trial, metric, patience, write

    def on_fit_start(self, state: trainers.State) -> None:
        # A retry resumed from its predecessor's checkpoint carries the epochs already trained:
        # report them once on this trial so its curve is whole and the pruner sees every step.
        if state.resumed:
            for epoch, metrics in enumerate(state.history):
                self._report(metrics[self.metric], epoch)
            overlap.persisted(self.write, partial(self.trial.set_user_attr, "hpo:resumed_at_epoch", len(state.history)),
                              "reporting", self.patience)

    def on_validation_end(self, state: trainers.State) -> None:
        self._report(state.metrics[self.metric], state.epoch)
        if outage.persist(self.trial.should_prune, "asking the pruner", self.patience):
            raise optuna.TrialPruned(f"pruned at epoch {state.epoch} ({self.metric}={state.metrics[self.metric]:.6g})")

    def _report(self, value: float, step: int) -> None:
        """`trial.report`, with the storage write handed to `write`."""
        reported = self.trial._cached_frozen_trial.intermediate_values
        if step in reported:  # as Optuna: the first value of a step stays
            return
        reported[step] = float(value)
        overlap.persisted(self.write, partial(self.trial.storage.set_trial_intermediate_value, self.trial._trial_id, step,
                                              float(value)), "reporting an epoch", self.patience)


def threads_for(config: Config, threads: int | None = None) -> int:
    """Torch CPU threads for a trial: the command line's, else the study file's, else 1.

    One, as Ray Tune gives each trial one CPU: cores serve more trials (``--jobs``) better than
    more threads per small model, and threads that outnumber the free cores spin idle. The shipped
    digits study on 2 cores: 8.5 s with 2 threads, 9.2 s with 1; beside one busy process 132 s with
    2 threads, 9.3 s with 1.
    """
    return threads or config.trainer.threads or 1


def trial_seed(config: Config, number: int) -> int | None:
    """Seeds weight init and data order: distinct per trial, reproducible per study."""
    base = config.trainer.seed if config.trainer.seed is not None else config.study.seed
    return None if base is None else base + number


def trial_dirs(config: Config, number: int) -> dict[str, str]:
    """Trial `number`'s own ``checkpoint_dir`` and ``log_dir``, for those the trainer has: a shared
    one would make trials resume each other."""
    t = config.trainer
    return {key: os.path.join(root, config.study.name, f"trial-{number}")
            for key, root in (("checkpoint_dir", t.checkpoint_dir), ("log_dir", t.log_dir)) if root}


def seed_torch(seed: int) -> None:
    """`torch.manual_seed`, without its cost where no accelerator is: it records a stack trace for
    each lazy CUDA, XPU and MTIA seeding, which never happens there (0.1-0.3 ms a trial)."""
    accelerator = getattr(torch, "accelerator", None)  # CUDA, MPS, XPU, MTIA and plug-in devices
    if accelerator is None or accelerator.is_available():
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)


def run_trial(trial: optuna.Trial, config: Config, task: Task, *, threads: int | None = None,
              callbacks: tuple[Any, ...] = (), write: overlap.Write = overlap.at_once) -> list[float]:
    """Trains one trial; returns the objective values. Raises `optuna.TrialPruned` when pruned.

    The trial's storage writes go through `write` (see `PruningCallback`)."""
    params = space_mod.suggest(trial, config.space)
    seed = trial_seed(config, trial.number)
    if seed is not None:
        seed_torch(seed)
    # As the trial was when asked for: a retry's settings come with it (no storage read).
    attrs = trial._cached_frozen_trial.user_attrs
    # A retry after running out of memory carries a smaller batch size; a retry uses its original's
    # directories, so it resumes from the last checkpoint written there.
    batch_size = attrs.get("hpo:batch_size", config.trainer.batch_size)
    dirs = trial_dirs(config, attrs.get("hpo:resume_from", trial.number))
    trainer_config = dataclasses.replace(config.trainer, seed=seed, threads=threads_for(config, threads),
                                         batch_size=batch_size, **dirs)
    data = task.data(params)
    model = task.model(params, data)
    patience = config.study.storage_patience
    pruning = [PruningCallback(trial, config.study.metrics[0], patience, write)] if len(config.study.metrics) == 1 else []
    state = trainers.fit(
        model,
        data,
        trainer_config,
        [*callbacks, *pruning],
        hparams=params,
        kind=config.task.kind,
        train_step=task.train_step,
        eval_step=task.eval_step,
    )
    overlap.persisted(write, partial(trial.set_user_attr, "hpo:metrics", dict(state.metrics)), "recording metrics", patience)
    missing = [m for m in config.study.metrics if m not in state.metrics]
    if missing:
        raise KeyError(f"the loop did not report {', '.join(missing)} (it reported {', '.join(state.metrics)})")
    return [state.metrics[m] for m in config.study.metrics]
