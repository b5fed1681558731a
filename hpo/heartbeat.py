"""Liveness: workers beat, and a trial whose worker stopped beating is failed and retried.

RDB storages use Optuna's own trial heartbeat (its table, its stale-trial query, its
exactly-once failure) with hpo's retry as the stale-trial callback. Journal storages (a file,
Redis) have no heartbeat in Optuna, so hpo keeps one with the same semantics: each worker
writes ``hpo:worker:<id>`` on the study every interval, and a RUNNING trial whose worker's
last beat is older than the grace period is failed by whichever live process sees it first.
The journal orders the competing FAIL writes, so exactly one of them wins and re-queues.

Each worker also sweeps on its timer, not only when it starts a trial, and so does
``hpo status``: a study whose last worker died is cleaned up by the next one to look.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import warnings
from functools import partial
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from hpo import outage
from hpo.storage import refresh, study_lock

WORKER_PREFIX = "hpo:worker:"
# How long a worker's first and last beat ride out a storage outage (`hpo.outage`).
BEAT_PATIENCE_S = 60.0
RETRY_OF = "hpo:retry_of"
# Written on a trial just before hpo fails it in order to re-queue it: the reason, and whether the
# retry uses up one of the trial's retries. A failed trial so marked that has no retry lost its
# re-queue to an outage between the two writes; the next sweep re-queues it (`requeue_cut_off`).
REQUEUE = "hpo:requeue"
# Who wrote a `REQUEUE` mark: a process knows that a re-queue of its own that failed will not
# come later, and may finish it at once (`requeue_cut_off(mine=True)`).
_PROCESS = f"{socket.gethostname()}:{os.getpid()}"


def uses_optuna_heartbeat(storage: BaseStorage) -> bool:
    return isinstance(getattr(storage, "_backend", storage), RDBStorage)


class Heartbeat:
    """A daemon thread that beats for this worker (and its running trial) and sweeps stale trials."""

    def __init__(self, study: optuna.Study, worker: str, interval: float, grace: float, max_retries: int) -> None:
        self.study, self.worker = study, worker
        self.interval, self.grace, self.max_retries = interval, grace, max_retries
        self._running: list[optuna.Trial] = []
        self._ahead: list[optuna.Trial] = []  # asked and sampled, waiting for the running one to end
        self._telling: dict[int, optuna.Trial] = {}  # trained, their result still being written
        self._recorded: set[int] = set()  # trials with an Optuna heartbeat row (RDB) already
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpo-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        outage.persist(self.beat, "recording the worker", BEAT_PATIENCE_S)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.running(None)
        try:
            outage.persist(partial(self.beat, alive=False), "recording the worker's exit", BEAT_PATIENCE_S)
        except outage.StorageUnavailable:
            pass  # its beats stop: others see it gone after the grace period, its trials are told

    def running(self, trial: optuna.Trial | list[optuna.Trial] | None) -> None:
        """Marks the trial(s) this worker now runs (None or []: idle).

        A worker in population mode runs several trials at once: it passes all of them. Optuna's
        heartbeat (RDB) starts for them at once: a trial without one is never found stale. The
        journal heartbeat is the worker's, already beating; the trials carry ``hpo:worker``.
        """
        self._running = _listed(trial)
        self._beat_new()

    def ahead(self, trial: optuna.Trial | list[optuna.Trial] | None) -> None:
        """Marks the trial(s) this worker asked for ahead (`worker.asks_ahead`): RUNNING in the
        storage before they train, they must be found stale too if the worker dies meanwhile."""
        self._ahead = _listed(trial)
        self._beat_new()

    def telling(self, trial: optuna.Trial) -> None:
        """Keeps beating for a trial whose result is queued (`hpo.overlap`) until `told`: a trial
        that stopped beating before its tell landed could be failed by another worker's sweep."""
        self._telling[trial._trial_id] = trial

    def told(self, trial: optuna.Trial) -> None:
        self._telling.pop(trial._trial_id, None)

    def _trials(self) -> list[optuna.Trial]:
        held = {t._trial_id: t for t in (*self._running, *self._ahead, *list(self._telling.values()))}
        return list(held.values())

    @property
    def trial_numbers(self) -> list[int]:
        return [t.number for t in self._trials()]

    def beat(self, alive: bool = True) -> None:
        storage = self.study._storage
        numbers = self.trial_numbers
        record = {"host": socket.gethostname(), "pid": os.getpid(), "device": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "trial": numbers[0] if numbers else None, "beat": time.time(), "alive": alive}
        if len(numbers) > 1:
            record["trials"] = numbers
        storage.set_study_system_attr(self.study._study_id, WORKER_PREFIX + self.worker, record)
        self._beat_trials()

    def _beat_new(self) -> None:
        try:
            self._beat_trials(only_new=True)
        except Exception as err:
            if not outage.transient(err):
                raise
            # The storage is unreachable: the next regular beat (within an interval, well inside
            # the grace period) records them, as it does every trial held.

    def _beat_trials(self, only_new: bool = False) -> None:
        """Optuna's heartbeat rows (RDB): for every trial held at each beat, and at once for a trial
        newly held (a trial without one is never found stale). One row write is a transaction."""
        storage = self.study._storage
        if not uses_optuna_heartbeat(storage):
            return
        trials = self._trials()
        for trial in trials:
            if not (only_new and trial._trial_id in self._recorded):
                storage.record_heartbeat(trial._trial_id)
        self._recorded = {t._trial_id for t in trials}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
                sweep(self.study, self.grace, self.max_retries)
            except Exception:  # a storage hiccup must not kill the trial; the next beat retries
                pass


def workers(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The workers that ever beat on this study, by identity."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return {key[len(WORKER_PREFIX):]: value for key, value in attrs.items() if key.startswith(WORKER_PREFIX)}


def sweep(study: optuna.Study, grace: float, max_retries: int, now: float | None = None) -> list[int]:
    """Fails the RUNNING trials that no live worker holds and re-queues them; returns their numbers.

    A trial is lost when its worker stopped beating for `grace` seconds (Optuna's own heartbeat on
    RDB storages), or when its worker beats on but has not listed it among the trials it holds for
    `grace` seconds since it started: an orphan, e.g. a trial created by an ask whose reply an
    outage lost, which the worker then asked again. The worker's own clock dates both. It also
    re-queues the trials whose re-queue an outage cut off (`requeue_cut_off`).
    """
    storage = study._storage
    failed: list[int] = []
    rdb = uses_optuna_heartbeat(storage)
    if rdb:
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():  # "experimental since v2.9": a warning at every sweep
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        failed = sorted(before - after)
    now = time.time() if now is None else now
    beats = workers(study)
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state != TrialState.RUNNING:
            continue
        worker = trial.user_attrs.get("hpo:worker")
        reason = _lost(trial, worker, beats.get(worker) if worker else None, grace, now, rdb)
        if reason is None:
            continue
        if fail_and_requeue(study, trial, reason, max_retries):
            failed.append(trial.number)
    requeue_cut_off(study, trials, grace, max_retries, now)
    return failed


def fail_and_requeue(study: optuna.Study, trial: FrozenTrial | optuna.Trial, reason: str, max_retries: int,
                     charged: bool = True) -> bool:
    """Fails a RUNNING trial and re-queues its params (`retry`); False when it had ended, or another
    process failed it first (the FAIL write decides: exactly one wins, and re-queues). `charged`:
    the retry uses up one of `max_retries` (a pre-emption does not).

    The re-queue is marked on the trial before it fails (`REQUEUE`): an outage that cuts this
    short after the fail leaves a trial that the next sweep re-queues, not one lost for good.
    """
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, REQUEUE, {"reason": reason, "charged": charged, "by": _PROCESS})
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False  # another process failed it first (or it just finished): not ours to retry
    retry(study, storage.get_trial(trial._trial_id), reason, _limit(charged, max_retries))
    return True


def _limit(charged: bool, max_retries: int) -> int:
    # A retry that is not charged (a pre-emption) is always made.
    return max_retries if charged else sys.maxsize


def requeue_cut_off(study: optuna.Study, trials: list[FrozenTrial] | None, settle: float, max_retries: int,
                    now: float | None = None, mine: bool = False) -> list[int]:
    """Re-queues the trials whose re-queue an outage cut off (`fail_and_requeue`): failed, marked,
    with retries left, no retry, and failed more than `settle` seconds ago (the process that failed
    one re-queues it within milliseconds, or never). Read again and re-queued under the study's
    lock, so that two sweepers never both re-queue one; returns their numbers. `mine`: only those
    this process marked, at once (its own re-queue that failed will not come later), with
    `trials` None (read fresh)."""
    now = time.time() if now is None else now
    if trials is not None and not _cut_off(trials, settle, max_retries, now, mine):
        return []  # the usual case: no lock taken
    storage = study._storage
    with study_lock(storage, study.study_name):
        refresh(storage)
        todo = _cut_off(study.get_trials(deepcopy=False), settle, max_retries, now, mine)
        for trial in todo:
            mark = trial.user_attrs[REQUEUE]
            retry(study, trial, mark["reason"], _limit(mark.get("charged", True), max_retries))
    return [t.number for t in todo]


def _cut_off(trials: list[FrozenTrial], settle: float, max_retries: int, now: float, mine: bool) -> list[FrozenTrial]:
    retried = retried_numbers(trials)
    return [t for t in trials if t.state == TrialState.FAIL and REQUEUE in t.user_attrs and t.number not in retried
            and (not mine or t.user_attrs[REQUEUE].get("by") == _PROCESS)
            and len(t.user_attrs.get("hpo:attempts", [])) < _limit(t.user_attrs[REQUEUE].get("charged", True), max_retries)
            and t.datetime_complete is not None and now - t.datetime_complete.timestamp() > settle]


def orphans(trials: list[FrozenTrial], worker: str, held: list[int]) -> list[FrozenTrial]:
    """The RUNNING trials in `trials` that carry `worker`'s name but that it does not hold."""
    return [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("hpo:worker") == worker
            and t.number not in held]


def requeue_orphans(study: optuna.Study, trials: list[FrozenTrial], worker: str, held: list[int],
                    max_retries: int) -> list[int]:
    """Fails and re-queues this worker's orphans in `trials`: RUNNING trials that carry its name but
    that it does not hold (`held`), i.e. made by an ask whose reply a storage outage lost before
    the worker asked again; returns their numbers. The worker knows that at once, where the others'
    sweeps wait for the grace period (`sweep`); it does so before it stops for a spent budget, so
    that the study still ends with its number of trials."""
    found = orphans(trials, worker, held)
    requeued = [t.number for t in found if fail_and_requeue(study, t, f"worker {worker} lost the reply that created it", max_retries)]
    if len(requeued) < len(found):  # failed meanwhile: by another, or by this call's attempt an outage cut off
        requeued += requeue_cut_off(study, None, 0, max_retries, mine=True)
    return requeued


def _lost(trial: FrozenTrial, worker: str | None, record: dict[str, Any] | None, grace: float, now: float,
          rdb: bool) -> str | None:
    """Why a RUNNING trial is lost, or None while its worker holds it."""
    started = trial.datetime_start.timestamp() if trial.datetime_start else None
    if not rdb:  # on RDB storages Optuna's heartbeat finds the trials of dead workers
        last = record["beat"] if record else (started if started is not None else now)
        if now - last > grace:
            return f"worker {worker} stopped beating {now - last:.0f}s ago"
    if record is None or started is None:
        return None
    held = record.get("trials") or ([record["trial"]] if record.get("trial") is not None else [])
    if trial.number not in held and record["beat"] - started > grace:
        return f"worker {worker} no longer holds it (its beats of the last {record['beat'] - started:.0f}s do not list it)"
    return None


def retry(study: optuna.Study, failed: FrozenTrial, reason: str, max_retries: int, extra: dict[str, Any] | None = None) -> None:
    """Re-queues a failed trial's params as a new trial linked to it, up to `max_retries` times.

    `extra` user attributes go on the retry (e.g. a smaller batch size after running out of memory).
    """
    history = [*failed.user_attrs.get("hpo:attempts", []), {"trial": failed.number, "reason": reason}]
    if len(history) > max_retries:
        return  # failed for good; the history stays on the trial's predecessors and in the status
    study.enqueue_trial(
        failed.params,
        user_attrs={
            RETRY_OF: failed.number,
            "hpo:resume_from": failed.user_attrs.get("hpo:resume_from", failed.number),
            "hpo:attempts": history,
            **(extra or {}),
        },
        skip_if_exists=False,
    )


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were re-queued (their retry carries a link back to them)."""
    return {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}


def optuna_stale_callback(max_retries: int):
    """Optuna's RDB heartbeat calls this once per stale trial it failed."""

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        retry(study, trial, "worker stopped beating (Optuna heartbeat)", max_retries)

    return callback


def _listed(trial: optuna.Trial | list[optuna.Trial] | None) -> list[optuna.Trial]:
    """None, one trial or several, as a list."""
    return [] if trial is None else list(trial) if isinstance(trial, (list, tuple)) else [trial]
