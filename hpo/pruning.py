"""The pruner's view of the study: read once per trial, not once per reported epoch.

Optuna's median and percentile pruners read every trial of the study at each
``should_prune``. On PostgreSQL that read costs milliseconds and grows with the study, and
it runs once per epoch of every trial on every worker. The history they compare against
(finished trials' intermediate values) changes only when another trial finishes, so hpo
reads it once for a trial's first report (a worker reads it on its storage thread as the
trial starts, `prefetch`) and again only when the snapshot is older than `max_age_s`; the trials of a population worker's group share one snapshot. What a snapshot can
miss is a trial finished less than `max_age_s` before it was read, or one whose result was still
being written (`hpo.overlap`), as if that trial had finished a moment later.

For the median and percentile pruners the decision itself is Optuna's rule with the percentile
computed in plain Python (`percentile`, bit for bit NumPy's), once per step and snapshot: on a
240-trial study a decision took 280 us through Optuna (mostly `np.nanpercentile`), 46-108 us here,
at every report of every trial.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Container
from concurrent.futures import Future
from typing import Any

import optuna
from optuna.pruners._percentile import _is_first_in_interval_step
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

# Pruners whose decision reads only the finished trials through `study.get_trials`.
SNAPSHOT_SAFE = (optuna.pruners.MedianPruner, optuna.pruners.PercentilePruner)
MAX_AGE_S = 2.0


class SnapshotPruner(optuna.pruners.BasePruner):
    """`pruner`, given a snapshot of the study's trials taken per trial and at most `max_age_s` old."""

    def __init__(self, pruner: optuna.pruners.BasePruner, max_age_s: float = MAX_AGE_S) -> None:
        self.pruner, self.max_age_s = pruner, max_age_s
        self._trials: list[FrozenTrial] = []
        self._taken = -float("inf")
        # Trials that have asked before: a trial's first ask reads afresh (it then sees the trials
        # this worker finished just before it); later asks, of it or of the other trials a
        # population worker trains beside it, share the snapshot until it is too old.
        self._seen: dict[int, None] = {}
        self._completed: list[FrozenTrial] = []  # the snapshot's finished trials
        self._percentiles: dict[int, float] = {}  # per step, for the current snapshot
        self._prefetched: tuple[int, Future[tuple[float, list[FrozenTrial]]]] | None = None

    def prefetch(self, trial_id: int, read: Future[tuple[float, list[FrozenTrial]]]) -> None:
        """The snapshot for trial `trial_id`'s first report, being read elsewhere: `read` gives
        when it was read (`time.monotonic()`) and the trials. A worker reads it on its storage
        thread while the trial's first epoch trains, so the read is off the training thread (on
        PostgreSQL it was a third of that thread's time, for 50 ms trials)."""
        self._prefetched = (trial_id, read)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        now = time.monotonic()
        if trial._trial_id not in self._seen or now - self._taken > self.max_age_s:
            self._take(study, trial._trial_id)
        self._seen[trial._trial_id] = None
        if len(self._seen) > 4096:
            del self._seen[next(iter(self._seen))]
        if type(self.pruner) in SNAPSHOT_SAFE:  # exactly these: a subclass may decide otherwise
            return self._percentile_prune(study.direction, trial)
        return self.pruner.prune(_Snapshot(study, self._trials), trial)

    def _take(self, study: optuna.Study, trial_id: int) -> None:
        prefetched, self._prefetched = self._prefetched, None
        # Waits for the read; one that failed, or is too old by now (a long first epoch), is read again.
        read = prefetched[1] if prefetched is not None and prefetched[0] == trial_id and trial_id not in self._seen else None
        if read is not None and read.exception() is None and time.monotonic() - read.result()[0] <= self.max_age_s:
            self._taken, self._trials = read.result()
        else:
            self._taken, self._trials = time.monotonic(), study.get_trials(deepcopy=False)
        self._completed = [t for t in self._trials if t.state == TrialState.COMPLETE]
        self._percentiles = {}

    def _percentile_prune(self, direction: StudyDirection, trial: FrozenTrial) -> bool:
        """`PercentilePruner.prune` (Optuna 5), on the snapshot, with the percentile per step cached."""
        p, completed = self.pruner, self._completed
        if not completed or len(completed) < p._n_startup_trials:
            return False
        step = trial.last_step
        if step is None or step < p._n_warmup_steps:
            return False
        if not _is_first_in_interval_step(step, trial.intermediate_values.keys(), p._n_warmup_steps, p._interval_steps):
            return False
        values = [v for v in trial.intermediate_values.values() if not math.isnan(v)]
        if not values:
            return True
        best = max(values) if direction == StudyDirection.MAXIMIZE else min(values)
        if step not in self._percentiles:
            at_step = [t.intermediate_values[step] for t in completed if step in t.intermediate_values]
            q = 100 - p._percentile if direction == StudyDirection.MAXIMIZE else p._percentile
            self._percentiles[step] = percentile(at_step, q) if len(at_step) >= p._n_min_trials else math.nan
        threshold = self._percentiles[step]
        if math.isnan(threshold):
            return False
        return best < threshold if direction == StudyDirection.MAXIMIZE else best > threshold


def percentile(values: list[float], q: float) -> float:
    """``np.nanpercentile(values, q)`` with its default (linear) method, bit for bit: the NaNs
    dropped, the values sorted, and NumPy's interpolation between the two nearest."""
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return math.nan
    virtual = (len(data) - 1) * (q / 100)
    below = math.floor(virtual)
    a, b = data[below], data[min(below + 1, len(data) - 1)]
    gamma = virtual - below
    diff = b - a
    # NumPy's `_lerp`: from the nearer end, so that the result never leaves [a, b].
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


def read_snapshot(study: optuna.Study) -> tuple[float, list[FrozenTrial]]:
    """What `SnapshotPruner.prefetch` takes: the time of the read, and the study's trials."""
    return time.monotonic(), study.get_trials(deepcopy=False)


def with_snapshot(pruner: optuna.pruners.BasePruner) -> optuna.pruners.BasePruner:
    """Wraps the pruners that read the whole study at each step; others are returned as they are."""
    return SnapshotPruner(pruner) if isinstance(pruner, SNAPSHOT_SAFE) else pruner


class _Snapshot:
    """The study, except that `get_trials` answers from the snapshot."""

    def __init__(self, study: optuna.Study, trials: list[FrozenTrial]) -> None:
        self._study, self._trials = study, trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        trials = self._trials if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials
