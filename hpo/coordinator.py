"""A study in shared storage: created once from a validated config, which it then carries.

The config is stored on the study (user attribute ``hpo:config``), so that
``hpo worker --study NAME`` on any machine needs only the storage URL. The trial budget
is global: workers check it and ask for their trial under one lock per study, so the
study ends with exactly `n_trials` trials however many workers race for the last one.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hpo import heartbeat
from hpo.config import Config, ConfigError, config_from_dict
from hpo.storage import open_storage, redact, refresh, resolve_url, study_lock

CONFIG_ATTR = "hpo:config"
SOURCE_ATTR = "hpo:source"
COUNTED = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

OnExists = Literal["refuse", "resume", "overwrite"]


class StudyError(ValueError):
    """One line for the user."""


@dataclass(frozen=True)
class Created:
    study: optuna.Study
    resumed: bool


def create(config: Config, storage: BaseStorage, *, on_exists: OnExists = "refuse", source: str = "") -> Created:
    """Creates the study and stores its config; enqueues the baseline trials.

    An existing study with the same config is resumed. One with a different config is
    refused unless `on_exists` is ``resume`` (keep its trials, store the new config) or
    ``overwrite`` (delete it first).
    """
    name = config.study.name
    existing = _find(storage, name)
    if existing is not None:
        same = _same_config(storage.get_study_user_attrs(existing).get(CONFIG_ATTR), name, config)
        if on_exists == "overwrite":
            optuna.delete_study(study_name=name, storage=storage)
        elif same or on_exists == "resume":
            if list(storage.get_study_directions(existing)) != [_direction(d) for d in config.study.directions]:
                raise StudyError(f"study {name!r} exists with other directions; use --overwrite to replace it")
            study = optuna.load_study(study_name=name, storage=storage)
            study.set_user_attr(CONFIG_ATTR, config.raw)
            return Created(study, resumed=True)
        else:
            raise StudyError(
                f"study {name!r} already exists with a different config; "
                "use --resume to continue it with this file, or --overwrite to start over"
            )
    study = optuna.create_study(storage=storage, study_name=name, directions=list(config.study.directions))
    study.set_user_attr(CONFIG_ATTR, config.raw)
    if source:
        study.set_user_attr(SOURCE_ATTR, source)
    for params in config.baseline:
        study.enqueue_trial(params, user_attrs={"hpo:baseline": True})
    return Created(study, resumed=False)


def _same_config(stored: dict[str, Any] | None, name: str, config: Config) -> bool:
    if stored is None:
        return False
    try:
        return config_from_dict(stored, name).fingerprint() == config.fingerprint()
    except ConfigError:  # stored by an hpo that checked less: not this file's, and --resume or --overwrite may replace it
        return False


def load(name: str, storage: BaseStorage, *, import_task: bool = True) -> tuple[optuna.Study, Config]:
    """The study and the config stored in it (`config_from_dict`'s `import_task`)."""
    study_id = _find(storage, name)
    if study_id is None:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        hint = f" (studies here: {', '.join(sorted(known))})" if known else " (no studies in this storage)"
        raise StudyError(f"no study named {name!r}{hint}")
    raw = storage.get_study_user_attrs(study_id).get(CONFIG_ATTR)
    if raw is None:
        raise StudyError(f"study {name!r} was not created by hpo (no stored config); create it with hpo create")
    try:
        config = config_from_dict(raw, f"study {name!r}", import_task=import_task)
    except ConfigError as err:
        raise StudyError(f"the config stored in study {name!r} is not valid here: {err.problems[0]}") from None
    return optuna.load_study(study_name=name, storage=storage), config


def open_study(url: str | None, name: str | None, *, import_task: bool = True) -> tuple[optuna.Study, Config]:
    """Opens the storage and the study in it (the only one when `name` is None), with liveness on.
    `import_task` False: for commands that only read the study, which need not have the task's code.

    On RDB storages the heartbeat settings come from the study's config, so the storage is
    opened again with them once the config is read.
    """
    storage = open_storage(url, existing=True)
    if name is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        if len(names) != 1:
            listed = f": {', '.join(sorted(names))}" if names else ""
            raise StudyError(f"{redact(resolve_url(url))} holds {len(names)} studies{listed}; name one with --study")
        name = names[0]
    study, config = load(name, storage, import_task=import_task)
    if heartbeat.uses_optuna_heartbeat(storage):
        s = config.study
        storage = open_storage(url, heartbeat=(s.heartbeat_interval, s.grace_period, heartbeat.optuna_stale_callback(s.max_retries)))
        study = optuna.load_study(study_name=name, storage=storage)
    return study, config


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that use up budget: started or finished, except failed ones that were re-queued
    (their retry counts instead)."""
    retried = heartbeat.retried_numbers(trials)
    return [t for t in trials if _counts(t, retried)]


def _counts(trial: FrozenTrial, retried: set[int]) -> bool:
    return trial.state in COUNTED and not (trial.state == TrialState.FAIL and trial.number in retried)


def budget_left(config: Config, trials: list[FrozenTrial], now: datetime.datetime | None = None) -> bool:
    """Whether a new trial may start: trials left, and the study's timeout not passed."""
    if config.study.n_trials is not None and len(counted(trials)) >= config.study.n_trials:
        return False
    return not timed_out(config, trials, now)


def timed_out(config: Config, trials: list[FrozenTrial], now: datetime.datetime | None = None) -> bool:
    """Whether the study's timeout has passed since its first trial started."""
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    if config.study.timeout is None or not starts:
        return False
    return ((now or datetime.datetime.now()) - min(starts)).total_seconds() >= config.study.timeout


def others_may_requeue(config: Config, trials: list[FrozenTrial], worker: str, now: datetime.datetime | None = None) -> bool:
    """With the budget spent, whether trials of other workers than `worker` still run: one whose
    worker died is failed and re-queued after the grace period, and a worker that waits for that
    runs it, so that a study whose last worker lives on loses nothing. Past the study's timeout
    nothing starts, retries neither."""
    return not timed_out(config, trials, now) and any(
        t.state == TrialState.RUNNING and t.user_attrs.get("hpo:worker") != worker for t in trials)


def fresh_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials, with every write so far (no read served from an earlier one)."""
    refresh(study._storage)
    return study.get_trials(deepcopy=False)


def ask(study: optuna.Study, config: Config, n: int = 1,
        user_attrs: dict[str, Any] | None = None) -> tuple[list[optuna.Trial], list[FrozenTrial]]:
    """Up to `n` new trials, as many as the budget has room for, and the trials read before.

    Reading the study and asking happen under the study's lock (`storage.study_lock`), so
    workers racing for the last trials never create one past the budget. `user_attrs` go on
    each trial as it is made (one storage write for the row and all of them).
    """
    storage = study._storage
    with study_lock(storage, study.study_name):
        refresh(storage)
        trials = study.get_trials(deepcopy=False)
        if not budget_left(config, trials):
            return [], trials
        if config.study.n_trials is not None:
            n = min(n, config.study.n_trials - len(counted(trials)))
        # Only the trial's row is made under the lock; `study.ask` would also read the queue and
        # the new trial, and every other worker waits for the lock meanwhile.
        waiting = [t._trial_id for t in trials if t.state == TrialState.WAITING]
        ids = [_start(storage, study._study_id, waiting, user_attrs or {}) for _ in range(n)]
    # As `study.ask` does: the sampler's per-trial cache of the study must not outlive a trial.
    study._thread_local.cached_all_trials = None
    return [optuna.Trial(study, trial_id) for trial_id in ids], trials


def _start(storage: BaseStorage, study_id: int, waiting: list[int], user_attrs: dict[str, Any]) -> int:
    """A queued trial (baseline, retry) set RUNNING, else a new one; under the study's lock."""
    while waiting:
        trial_id = waiting.pop(0)
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                for key, value in user_attrs.items():
                    storage.set_trial_user_attr(trial_id, key, value)
                return trial_id
        except UpdateFinishedTrialError:
            pass  # finished meanwhile by whoever else holds it (a sweeper failing it)
    if not user_attrs:
        return storage.create_new_trial(study_id)
    template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.datetime.now(),
                           datetime_complete=None, params={}, distributions={}, user_attrs=user_attrs,
                           system_attrs={}, intermediate_values={}, trial_id=-1)
    return storage.create_new_trial(study_id, template_trial=template)


def _find(storage: BaseStorage, name: str) -> int | None:
    """The study's id, or None. By name: listing all studies reads every trial on RDB storages."""
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def _direction(name: str) -> optuna.study.StudyDirection:
    return optuna.study.StudyDirection.MAXIMIZE if name == "maximize" else optuna.study.StudyDirection.MINIMIZE
