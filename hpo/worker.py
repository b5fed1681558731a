"""One worker's life: ask a trial, run it, tell the result, until the study's budget is spent.

Each worker seeds its own sampler (study seed + worker index): workers that share a
seed propose the same parameters and waste half their trials.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

import trainers
from hpo import coordinator, heartbeat, objective, pruning, samplers
from hpo.config import Config
from hpo.outage import persist


class Interrupted(BaseException):
    """Stops the trial in the worker's main thread: SIGTERM (a scheduler's pre-emption) or SIGINT."""

    def __init__(self, signal_name: str = "SIGTERM") -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class Signals:
    """SIGINT and SIGTERM, noted when they come and acted on at the next safe point: between
    batches (as a trainers callback) or between storage calls. An exception raised inside a
    storage call can leave it half done (a journal file's lock held, a write cut short). A second
    Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.name: str | None = None

    def install(self) -> dict | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        return {sig: signal.signal(sig, self._note) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _note(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.name == "SIGINT":
            raise KeyboardInterrupt
        self.name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"

    def on_batch_end(self, state: trainers.State) -> None:
        if self.name is not None:
            raise Interrupted(self.name)

    on_epoch_start = on_batch_end


def restore_signals(previous: dict | None) -> None:
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler)


@dataclass
class Summary:
    worker: str
    states: dict[str, int] = field(default_factory=dict)
    interrupted: str | None = None  # the signal that stopped the worker, if any


def identity(index: int | None) -> str:
    suffix = f"/{index}" if index is not None else ""
    return f"{socket.gethostname()}:{os.getpid()}{suffix}"


def sampler_seed(base: int | None, index: int | None, worker: str) -> int | None:
    """Distinct per worker; reproducible when workers are numbered (``--worker-index``)."""
    if base is None:
        return None
    offset = index if index is not None else zlib.crc32(worker.encode()) % 1_000_003
    return (base + offset) % 2**32


def trial_attrs(worker: str, sampler_seed: int | None) -> dict[str, object]:
    """What each trial records of the worker that ran it, written with the trial's creation. (The
    trial's own torch seed is the study's seed + its number: `objective.trial_seed`.)"""
    return {"hpo:worker": worker, "hpo:seeds": {"sampler": sampler_seed}}


def run_worker(
    study_name: str,
    storage_url: str | None,
    *,
    index: int | None = None,
    threads: int | None = None,
    on_trial: Callable[[FrozenTrial, Config], None] | None = None,
) -> Summary:
    """Runs trials of the study until its budget is spent or the worker is interrupted."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, config = coordinator.open_study(storage_url, study_name)
    s = config.study
    worker = identity(index)
    seed = sampler_seed(s.seed, index, worker)
    study.sampler = samplers.build_sampler(s.sampler, s.sampler_options, seed, config.space)
    study.pruner = pruning.with_snapshot(samplers.build_pruner(s.pruner, s.pruner_options, s.pruner_wrapped))
    task = objective.prepare(config)
    summary = Summary(worker)
    previous = _raise_on_sigterm()
    try:
        with heartbeat.Heartbeat(study, worker, s.heartbeat_interval, s.grace_period, s.max_retries) as beat:
            heartbeat.sweep(study, s.grace_period, s.max_retries)
            _loop(study, config, task, threads, seed, beat, summary, on_trial)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return summary


def _loop(study, config, task, threads, seed, beat: heartbeat.Heartbeat, summary: Summary, on_trial) -> None:
    """Ask, check the global budget, run, tell; until the budget is spent or a signal comes.

    Every storage call rides out an outage (`outage.persist`); the trial runs on meanwhile.
    """
    storage = study._storage
    patience = config.study.storage_patience
    if config.study.vectorize is not None:
        from hpo import population  # population mode: several trials at once, one stacked model

        population.run(study, config, task, threads, seed, beat, summary, on_trial)
        return
    signals = Signals()
    previous = signals.install()
    try:
        while signals.name is None:
            asked, _ = persist(partial(coordinator.ask, study, config, user_attrs=trial_attrs(summary.worker, seed)),
                               "asking for a trial", patience)
            if not asked:
                break
            trial = asked[0]
            beat.running(trial)
            state = _run_one(study, trial, config, task, threads, summary, signals)
            beat.running(None)
            summary.states[state.name] = summary.states.get(state.name, 0) + 1
            if on_trial is not None:
                on_trial(persist(partial(storage.get_trial, trial._trial_id), "reading a trial", patience), config)
            if summary.interrupted:
                break
        # A signal that came while no trial trained (asking, telling): the worker just stops.
        summary.interrupted = summary.interrupted or signals.name
    finally:
        restore_signals(previous)


def _run_one(study: optuna.Study, trial: optuna.Trial, config, task, threads, summary: Summary,
             signals: Signals | None = None) -> TrialState:
    patience = config.study.storage_patience
    values = None
    attrs: dict[str, str] = {}
    try:
        # A signal that comes during the last epoch's report lets the finished trial be told; the
        # worker stops after it.
        values = objective.run_trial(trial, config, task, threads=threads, callbacks=(signals,) if signals else ())
        state = TrialState.COMPLETE
    except optuna.TrialPruned as pruned:
        attrs["hpo:pruned"] = str(pruned)
        state = TrialState.PRUNED
    except (KeyboardInterrupt, Interrupted) as stop:
        summary.interrupted = "SIGINT" if isinstance(stop, KeyboardInterrupt) else stop.signal_name
        persist(lambda: hand_back(study, trial, summary.interrupted), "handing back a trial", patience)
        return TrialState.FAIL
    except trainers.OutOfMemoryError as err:
        attrs["hpo:fail_reason"] = f"OutOfMemoryError: {err}"[:1000]
        state = TrialState.FAIL
        persist(lambda: _retry_smaller(study, trial, config, attrs["hpo:fail_reason"]), "re-queueing a trial", patience)
    except Exception as err:
        attrs["hpo:fail_reason"] = f"{type(err).__name__}: {err}"[:1000]
        attrs["hpo:traceback"] = traceback.format_exc()[-4000:]
        state = TrialState.FAIL
    return finish(study, trial, state, values, attrs, patience)


def finish(study: optuna.Study, trial: optuna.Trial, state: TrialState, values: list[float] | None,
           attrs: dict[str, object], patience: float) -> TrialState:
    """Records `attrs` on the trial and tells its result; returns the state it ended in."""
    for key, value in attrs.items():
        persist(partial(trial.set_user_attr, key, value), "recording a trial", patience)
    try:
        # The result waits here, in memory, while the storage is unreachable.
        persist(lambda: study.tell(trial, values) if state == TrialState.COMPLETE else study.tell(trial, state=state),
                "telling a trial's result", patience)
    except UpdateFinishedTrialError:
        # Either this worker was declared dead (no beat within the grace period) and its trial
        # failed and re-queued by another, whose retry counts; or a tell whose reply was lost to
        # an outage had already gone through.
        finished = persist(lambda: study._storage.get_trial(trial._trial_id), "reading a trial", patience)
        return finished.state
    return state


def _retry_smaller(study: optuna.Study, trial: optuna.Trial, config, reason: str) -> None:
    """Out of memory: re-queue the trial with half the batch size, if the study file allows."""
    frozen = study._storage.get_trial(trial._trial_id)
    batch = frozen.user_attrs.get("hpo:batch_size", config.trainer.batch_size)
    halvings = frozen.user_attrs.get("hpo:oom_halvings", 0)
    if halvings < config.study.oom_retries and batch > 1:
        heartbeat.retry(study, frozen, reason, max_retries=sys.maxsize,
                        extra={"hpo:batch_size": batch // 2, "hpo:oom_halvings": halvings + 1})


def hand_back(study: optuna.Study, trial: optuna.Trial, signal_name: str) -> None:
    """An interrupted trial is failed with its reason and re-queued with the same params."""
    reason = f"interrupted by {signal_name}; re-queued with the same params"
    trial.set_user_attr("hpo:fail_reason", reason)
    study.tell(trial, state=TrialState.FAIL)
    # A pre-emption is not the trial's fault: it does not use up one of its retries.
    heartbeat.retry(study, study._storage.get_trial(trial._trial_id), reason, max_retries=sys.maxsize)


def _raise_on_sigterm():
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Interrupted("SIGTERM")

    return signal.signal(signal.SIGTERM, handler)
