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
import time
import traceback
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.study._tell import _tell_with_warning
from optuna.trial import FrozenTrial, TrialState

import trainers
from hpo import coordinator, heartbeat, objective, overlap, pruning, samplers
from hpo import space as space_mod
from hpo.config import Config
from hpo.outage import persist
from hpo.redis_journal import RedisJournalBackend


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


# How often, at most, a worker whose budget is spent looks again while other workers' trials run.
WAIT_POLL_S = 2.0
WAIT = "wait"  # `_ask_sampled` without waiting: the budget is spent, other workers' trials run


@dataclass
class Summary:
    worker: str
    states: dict[str, int] = field(default_factory=dict)
    interrupted: str | None = None  # the signal that stopped the worker, if any
    first_failed: int | None = None  # the number of the first of its trials that failed

    def count(self, number: int, state: TrialState) -> None:
        self.states[state.name] = self.states.get(state.name, 0) + 1
        if state == TrialState.FAIL and self.first_failed is None:
            self.first_failed = number

    def all_failed(self) -> bool:
        """Whether it ran trials and every one failed: nothing to show for the worker."""
        return self.first_failed is not None and not ({"COMPLETE", "PRUNED"} & self.states.keys())


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
    on_start: Callable[[], None] | None = None,
) -> Summary:
    """Runs trials of the study until its budget is spent or the worker is interrupted;
    `on_start()` is called once the study is open and its task imported (before the data is built)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, config = coordinator.open_study(storage_url, study_name)
    check_device(config)
    s = config.study
    worker = identity(index)
    seed = sampler_seed(s.seed, index, worker)
    study.sampler = samplers.build_sampler(s.sampler, s.sampler_options, seed, config.space)
    study.pruner = pruning.with_snapshot(samplers.build_pruner(s.pruner, s.pruner_options, s.pruner_wrapped))
    if on_start is not None:
        on_start()
    task = objective.prepare(config)
    summary = Summary(worker)
    previous = _raise_on_sigterm()
    try:
        with heartbeat.Heartbeat(study, worker, s.heartbeat_interval, s.grace_period, s.max_retries) as beat:
            persist(partial(heartbeat.sweep, study, s.grace_period, s.max_retries), "sweeping stale trials", s.storage_patience)
            _loop(study, config, task, threads, seed, beat, summary, on_trial)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return summary


def check_device(config: Config) -> None:
    """Raises `StudyError` where this machine lacks the study's `trainer.device`: every trial
    would fail on it, so it is said once, before any is asked for."""
    try:
        trainers.resolve_device(config.trainer.device)
    except RuntimeError as err:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        # `hpo worker --gpus` pins each worker to one GPU, which it then sees as cuda:0.
        hint = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible}: its devices are numbered from 0; say device: cuda)"
        raise coordinator.StudyError(f"study {config.study.name}: trainer.device: {err}{hint}") from None


def asks_ahead(config: Config, storage: optuna.storages.BaseStorage) -> bool:
    """Whether the worker asks for and samples its next trial while the current one trains.

    That takes the sampler's and the storage's time per trial off the worker's critical path: on
    Redis and on databases, where several workers make the order of trials depend on timing
    anyway. On a journal file (``hpo run``) it is off unless the study file asks, so a seeded
    study with one worker proposes the same trials every run.
    """
    if config.study.ask_ahead is not None:
        return config.study.ask_ahead
    return heartbeat.uses_optuna_heartbeat(storage) or isinstance(getattr(storage, "_backend", None), RedisJournalBackend)


def _loop(study, config, task, threads, seed, beat: heartbeat.Heartbeat, summary: Summary, on_trial) -> None:
    """Ask, check the global budget, run, tell; until the budget is spent or a signal comes.

    Every storage call rides out an outage (`outage.persist`). Reports and results are written
    behind the training (`hpo.overlap`); asking ahead (`asks_ahead`), the next trial waits RUNNING
    (and beating) for the current one to end, and a worker that stops hands it back.
    """
    storage = study._storage
    patience = config.study.storage_patience
    if config.study.vectorize is not None:
        from hpo import population  # population mode: several trials at once, one stacked model

        population.run(study, config, task, threads, seed, beat, summary, on_trial)
        return
    signals = Signals()
    ask = partial(_ask_sampled, study, config, trial_attrs(summary.worker, seed), beat, patience, lambda: signals.name is not None)
    # Reports and results are written from this thread while training goes on (`hpo.overlap`).
    behind = overlap.StorageThread()
    ahead = asks_ahead(config, storage)
    pending: Future | None = None
    previous = signals.install()
    try:
        while signals.name is None:
            behind.check()  # a write that failed for good stops the worker here, between trials
            trial = pending.result() if pending is not None else None
            if signals.name is not None:
                break  # the trial asked ahead, if any, is handed back below
            pending = None
            if trial is None or trial is WAIT:
                # First, or the budget looked spent when asked ahead: ask again once the writes
                # before are in (a trial re-queued meanwhile, e.g. after running out of memory,
                # counts again), so that the sampler sees every result told so far and one
                # seeded worker proposes the same trials every run.
                behind.drain()
                trial = ask()
            if trial is None:
                break
            beat.running(trial)  # before it leaves `ahead`: a beat that listed it nowhere would orphan it
            beat.ahead(None)
            if isinstance(study.pruner, pruning.SnapshotPruner):  # read while the first epoch trains
                study.pruner.prefetch(trial._trial_id, behind.submit(partial(pruning.read_snapshot, study)))
            if ahead:
                pending = behind.submit(partial(ask, wait=False))
            tell = _train(study, trial, config, task, threads, summary, signals, behind.write)
            beat.telling(trial)
            behind.write(partial(_told, tell, trial, summary, on_trial, config, beat))
            if summary.interrupted:
                break
        # A signal that came while no trial trained (asking, telling): the worker just stops.
        summary.interrupted = summary.interrupted or signals.name
    finally:
        # Signals stay noted (not raised) until the trial asked ahead is handed back whole.
        try:
            _hand_back_ahead(study, pending, summary.interrupted or signals.name or "an error in the worker", patience)
        finally:
            try:
                behind.close()
            finally:
                beat.ahead(None)
                beat.running(None)
                restore_signals(previous)


def _ask_sampled(study, config, user_attrs: dict, beat: heartbeat.Heartbeat, patience: float,
                 stopped: Callable[[], bool], wait: bool = True) -> optuna.Trial | None | str:
    """A new trial with its params sampled; None when the budget is spent, or when `stopped()`.

    With the budget spent while other workers' trials run, it waits for them (or, unless `wait`,
    returns `WAIT` at once: the storage thread must not wait, the tell of the trial that trains
    now is queued behind it, and other workers may wait for that one). One whose worker
    died is re-queued within the grace period and a heartbeat interval (the sweeps of live
    workers, this one's included), and this worker then runs it. It waits that long at most: a
    trial still running after it has a live worker. While it waits it reads the study without
    the study's lock, so that many waiting workers do not queue on it.
    """
    s = config.study
    give_up = time.monotonic() + s.grace_period + 2 * s.heartbeat_interval
    trials = None
    # Most trials that still run end within a trial's time: look soon, then less and less often.
    poll = 0.05
    while True:
        if trials is None or coordinator.budget_left(config, trials):
            asked, trials = persist(partial(coordinator.ask, study, config, user_attrs=user_attrs), "asking for a trial", patience)
            if asked:
                break
            # The budget looks spent: a trial this worker's lost reply made must not take a place.
            # Asked again after the re-queue, whatever it returned: a retry that it made before
            # an outage cut its reply is there to be run.
            if heartbeat.orphans(trials, beat.worker, beat.trial_numbers):
                persist(partial(heartbeat.requeue_orphans, study, trials, beat.worker, beat.trial_numbers, s.max_retries),
                        "re-queueing a trial", patience)
                trials = None
                continue
        if stopped() or time.monotonic() > give_up or not coordinator.others_may_requeue(config, trials, beat.worker):
            return None
        if not wait:
            return WAIT
        time.sleep(poll)
        poll = min(poll * 2, WAIT_POLL_S, s.heartbeat_interval)
        trials = persist(partial(coordinator.fresh_trials, study), "reading the study", patience)
    trial = asked[0]
    beat.ahead(trial)
    persist(partial(space_mod.suggest, trial, config.space), "sampling a trial", patience)
    return trial


def _told(tell: Callable[[], TrialState], trial: optuna.Trial, summary: Summary, on_trial, config: Config,
          beat: heartbeat.Heartbeat) -> None:
    try:
        state = tell()
    finally:
        beat.told(trial)
    summary.count(trial.number, state)
    if on_trial is not None:
        on_trial(persist(partial(trial.storage.get_trial, trial._trial_id), "reading a trial", config.study.storage_patience), config)


def _hand_back_ahead(study, pending: Future | None, why: str, patience: float) -> None:
    """The trial asked ahead that will not train here goes back to the queue with its params."""
    if pending is None:
        return
    try:
        trial = pending.result()
    except Exception:
        return  # the ask failed: no trial, or one that the sweeper fails once the beats stop
    if isinstance(trial, optuna.Trial):
        try:
            persist(lambda: hand_back(study, trial, why), "handing back a trial", patience)
        except UpdateFinishedTrialError:
            pass  # failed meanwhile by a sweep, which re-queued it


def _run_one(study: optuna.Study, trial: optuna.Trial, config, task, threads, summary: Summary,
             signals: Signals | None = None) -> TrialState:
    """Trains the trial and tells its result; returns the state it ended in."""
    return _train(study, trial, config, task, threads, summary, signals, overlap.at_once)()


def _train(study: optuna.Study, trial: optuna.Trial, config, task, threads, summary: Summary,
           signals: Signals | None, write: overlap.Write) -> Callable[[], TrialState]:
    """Trains the trial, its storage writes going through `write`; returns the call that records
    how it ended and gives its final state."""
    patience = config.study.storage_patience
    values = None
    attrs: dict[str, str] = {}
    try:
        # A signal that comes during the last epoch's report lets the finished trial be told; the
        # worker stops after it.
        values = objective.run_trial(trial, config, task, threads=threads, callbacks=(signals,) if signals else (), write=write)
        state = TrialState.COMPLETE
    except optuna.TrialPruned as pruned:
        attrs["hpo:pruned"] = str(pruned)
        state = TrialState.PRUNED
    except (KeyboardInterrupt, Interrupted) as stop:
        summary.interrupted = "SIGINT" if isinstance(stop, KeyboardInterrupt) else stop.signal_name

        def handed_back(why: str = summary.interrupted) -> TrialState:
            persist(lambda: hand_back(study, trial, why), "handing back a trial", patience)
            return TrialState.FAIL

        return handed_back
    except trainers.OutOfMemoryError as err:
        attrs["hpo:fail_reason"] = f"OutOfMemoryError: {err}"[:1000]
        state = TrialState.FAIL
        overlap.persisted(write, partial(_retry_smaller, study, trial, config, attrs["hpo:fail_reason"]), "re-queueing a trial", patience)
    except Exception as err:
        attrs["hpo:fail_reason"] = f"{type(err).__name__}: {err}"[:1000]
        attrs["hpo:traceback"] = traceback.format_exc()[-4000:]
        state = TrialState.FAIL
    return partial(finish, study, trial, state, values, attrs, patience)


def finish(study: optuna.Study, trial: optuna.Trial, state: TrialState, values: list[float] | None,
           attrs: dict[str, object], patience: float) -> TrialState:
    """Records `attrs` on the trial and tells its result; returns the state it ended in."""
    for key, value in attrs.items():
        persist(partial(trial.set_user_attr, key, value), "recording a trial", patience)
    try:
        # The result waits here, in memory, while the storage is unreachable. `study.tell` without
        # its last step, a read of the told trial that nothing here uses (a query per trial on a
        # database); its result is the state the trial ended in (a NaN value fails it).
        told = persist(lambda: _tell_with_warning(study, trial, values) if state == TrialState.COMPLETE
                       else _tell_with_warning(study, trial, state=state), "telling a trial's result", patience)
        state = told[0]
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
    try:
        trial.set_user_attr("hpo:fail_reason", reason)
        # A pre-emption is not the trial's fault: it does not use up one of its retries.
        handed = heartbeat.fail_and_requeue(study, trial, reason, 0, charged=False)
    except UpdateFinishedTrialError:
        handed = False
    if not handed:
        # It had finished, or this call's first attempt failed it before an outage cut it off
        # (`persist` calls again): that re-queue is finished here.
        heartbeat.requeue_cut_off(study, None, 0, 0, mine=True)
        raise UpdateFinishedTrialError(f"trial {trial.number} had already finished; not handed back")


def _raise_on_sigterm():
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Interrupted("SIGTERM")

    return signal.signal(signal.SIGTERM, handler)
