"""The pruner's snapshot of the study: same decisions as Optuna's pruner, one read per trial."""

from __future__ import annotations

import optuna
from optuna.storages import InMemoryStorage

from hpo import pruning


class CountingStorage(InMemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get_all_trials(self, *args, **kwargs):
        self.reads += 1
        return super().get_all_trials(*args, **kwargs)


def _history(study: optuna.Study, n: int = 8, steps: int = 5) -> None:
    for i in range(n):
        trial = study.ask()
        for step in range(steps):
            trial.report(float(i + step), step)
        study.tell(trial, float(i + steps))


def test_snapshot_pruner_decides_as_optuna_with_one_read_per_trial() -> None:
    storage = CountingStorage()
    bare = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    study = optuna.create_study(storage=storage, pruner=pruning.with_snapshot(bare))
    _history(study)

    decisions = []
    for value in (1.0, 5.0, 9.0):
        trial = study.ask()
        reads = storage.reads
        for step in range(5):
            trial.report(value + step, step)
            frozen = storage.get_trial(trial._trial_id)
            decisions.append((study.pruner.prune(study, frozen), bare.prune(study, frozen)))
        assert storage.reads - reads == 1 + 5  # the snapshot once, the bare pruner at each step
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert [ours for ours, _ in decisions] == [theirs for _, theirs in decisions]
    assert any(ours for ours, _ in decisions) and not all(ours for ours, _ in decisions)


def test_snapshot_is_read_again_when_older_than_max_age() -> None:
    storage = CountingStorage()
    study = optuna.create_study(storage=storage)
    _history(study, n=3)
    pruner = pruning.SnapshotPruner(optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0), max_age_s=0.0)
    trial = study.ask()
    trial.report(1.0, 0)
    before = storage.reads
    for _ in range(3):
        pruner.prune(study, storage.get_trial(trial._trial_id))
    assert storage.reads - before == 3


def test_only_pruners_that_read_the_whole_study_are_wrapped() -> None:
    assert isinstance(pruning.with_snapshot(optuna.pruners.PercentilePruner(25.0)), pruning.SnapshotPruner)
    hyperband = optuna.pruners.HyperbandPruner()
    assert pruning.with_snapshot(hyperband) is hyperband


def test_trials_trained_side_by_side_share_one_snapshot() -> None:
    storage = CountingStorage()
    study = optuna.create_study(storage=storage)
    _history(study)
    pruner = pruning.SnapshotPruner(optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0))
    group = [study.ask() for _ in range(4)]
    before = storage.reads
    for step in range(3):
        for trial in group:
            trial.report(float(step), step)
            pruner.prune(study, storage.get_trial(trial._trial_id))
    # A read at each trial's first report, none after: 4 reads for 12 decisions.
    assert storage.reads - before == 4


def test_percentile_is_numpys_bit_for_bit() -> None:
    import math
    import random

    import numpy as np

    rng = random.Random(0)
    for n in [1, 2, 3, 4, 5, 7, 10, 31, 100, 301]:
        for _ in range(20):
            values = [rng.choice([rng.gauss(0, 1), rng.uniform(-1e6, 1e6), 0.5, float(rng.randint(0, 3))]) for _ in range(n)]
            if rng.random() < 0.3:
                values[rng.randrange(n)] = math.nan
            for q in (0.0, 10.0, 25.0, 33.3, 50.0, 66.7, 75.0, 90.0, 100.0):
                ours, theirs = pruning.percentile(values, q), float(np.nanpercentile(np.array(values, dtype=float), q))
                assert ours == theirs or (math.isnan(ours) and math.isnan(theirs)), (values, q)


def test_percentile_pruners_decide_as_optuna_on_random_studies() -> None:
    import random

    rng = random.Random(1)
    pruners = [optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
               optuna.pruners.PercentilePruner(25.0, n_startup_trials=2, n_warmup_steps=0, interval_steps=2, n_min_trials=3),
               optuna.pruners.PercentilePruner(80.0, n_startup_trials=0, n_warmup_steps=2)]
    decisions = pruned = 0
    for direction in ("minimize", "maximize"):
        for bare in pruners:
            study = optuna.create_study(direction=direction)
            for _ in range(30):  # finished trials of varying lengths (some pruned early)
                trial = study.ask()
                steps = rng.randint(1, 6)
                for step in range(steps):
                    trial.report(rng.choice([rng.gauss(step, 1.0), float("nan")]) if rng.random() < 0.05 else rng.gauss(step, 1.0), step)
                study.tell(trial, rng.gauss(0, 1)) if steps > 2 else study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            ours = pruning.SnapshotPruner(bare)
            for _ in range(10):
                trial = study.ask()
                offset = rng.uniform(-3, 3)  # some trials clearly better than the history, some worse
                for step in range(6):
                    trial.report(rng.gauss(step, 1.0) + offset, step)
                    frozen = study._storage.get_trial(trial._trial_id)
                    decision = ours.prune(study, frozen)
                    assert decision == bare.prune(study, frozen)
                    decisions += 1
                    pruned += decision
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert decisions == 2 * 3 * 10 * 6 and 40 < pruned < decisions - 40  # both kinds, many of each


def test_a_prefetched_snapshot_serves_the_trials_first_report_unless_stale_or_failed() -> None:
    import time
    from concurrent.futures import Future

    storage = CountingStorage()
    pruner = pruning.with_snapshot(optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    study = optuna.create_study(storage=storage, pruner=pruner)
    _history(study)  # at step 0 the finished trials reported 0..7: median 3.5, so 2.0 stays

    def ready(value=None, error=None) -> Future:
        future: Future = Future()
        future.set_exception(error) if error else future.set_result(value)
        return future

    # Read while the first epoch trained (here: a snapshot whose trials all reported 0 at step 0,
    # so 2.0 is pruned): the first report uses it and reads nothing.
    zero = optuna.trial.create_trial(value=0.0, intermediate_values={0: 0.0})
    trial = study.ask()
    pruner.prefetch(trial._trial_id, ready((time.monotonic(), [zero, zero])))
    reads = storage.reads
    trial.report(2.0, 0)
    assert trial.should_prune() and storage.reads == reads
    # Failed, older than max_age_s, or another trial's: the study is read again, and decides.
    for prefetched in (ready(error=RuntimeError("storage down")), ready((time.monotonic() - 100, [zero, zero])), None):
        trial = study.ask()
        pruner.prefetch(trial._trial_id - (prefetched is None), prefetched or ready((time.monotonic(), [zero, zero])))
        reads = storage.reads
        trial.report(2.0, 0)
        assert not trial.should_prune() and storage.reads == reads + 1
