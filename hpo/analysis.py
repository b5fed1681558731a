"""Waste and pruning reliability: what pruning cost and saved, and whether it can be trusted.

Both read only finished trials and their timestamps (or ``hpo:seconds`` where set; intermediate
values are the study metric per epoch, step = epoch index from 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import optuna
from optuna.pruners import BasePruner, NopPruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo.trials_view import TrialsView

# Below this rank correlation between a rung's metric and the final one, pruning there is
# close to guessing; 0.5 is where half the ordering is still shuffled.
MIN_RANK_CORRELATION = 0.5
# Warn when the rule would stop at least this share of the finally-good trials.
MAX_GOOD_PRUNED_SHARE = 0.25
# Correlations on fewer trials than this are noise.
MIN_TRIALS_FOR_CORRELATION = 5
# The finally-good trials are the best quarter of the completed ones, at most this many
# (each is replayed against the pruner at every step, so the cost grows with it).
MAX_GOOD_TRIALS = 50


def trial_seconds(trial: FrozenTrial) -> float:
    """Compute time of a trial: hpo's own measure, else the storage's timestamps."""
    seconds = trial.user_attrs.get("hpo:seconds")
    if isinstance(seconds, (int, float)):
        return float(seconds)
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return 0.0


def epochs_run(trial: FrozenTrial) -> int:
    return 0 if trial.last_step is None else trial.last_step + 1


@dataclass
class RungWaste:
    step: int  # epoch index at which these trials were pruned
    pruned: int
    seconds: float
    epochs: int


@dataclass
class Waste:
    seconds: dict[str, float]  # compute seconds by final state: COMPLETE, PRUNED, FAIL
    counts: dict[str, int]
    rungs: list[RungWaste]
    epochs: int | None  # a full trial's length
    seconds_per_epoch: float | None  # from the completed trials
    without_pruning: float | None  # estimated compute had no trial been pruned

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    @property
    def saved(self) -> float | None:
        return None if self.without_pruning is None else self.without_pruning - self.total


def waste(trials: Sequence[FrozenTrial], epochs: int | None = None) -> Waste:
    """Compute time by state and by pruning rung, and the cost of the same study unpruned.

    A pruned trial would have run `epochs` epochs (default: the longest completed trial);
    its missing epochs are priced at the completed trials' mean seconds per epoch.
    """
    states = ("COMPLETE", "PRUNED", "FAIL")
    finished = [t for t in trials if t.state.name in states]
    seconds = {s: sum(trial_seconds(t) for t in finished if t.state.name == s) for s in states}
    counts = {s: sum(1 for t in finished if t.state.name == s) for s in states}
    pruned = [t for t in finished if t.state == TrialState.PRUNED]
    rungs = []
    for step in sorted({t.last_step for t in pruned if t.last_step is not None}):
        at = [t for t in pruned if t.last_step == step]
        rungs.append(RungWaste(step, len(at), sum(trial_seconds(t) for t in at), sum(epochs_run(t) for t in at)))
    completed = [t for t in finished if t.state == TrialState.COMPLETE and epochs_run(t) > 0]
    if epochs is None and completed:
        epochs = max(epochs_run(t) for t in completed)
    per_epoch = without = None
    if completed:
        per_epoch = sum(trial_seconds(t) for t in completed) / sum(epochs_run(t) for t in completed)
        missing = sum(max(0, (epochs or 0) - epochs_run(t)) for t in pruned)
        without = sum(seconds.values()) + missing * per_epoch
    return Waste(seconds, counts, rungs, epochs, per_epoch, without)


@dataclass
class Rung:
    step: int
    n: int  # completed trials with a value at this step
    spearman: float | None
    kendall: float | None
    pruned_here: int  # trials actually pruned at this step
    good_pruned: int | None  # finally-good trials the current rule would first stop here (None: not replayed)


@dataclass
class Reliability:
    rungs: list[Rung]
    n_completed: int
    n_good: int
    note: str = ""  # why something could not be judged
    warnings: list[str] = field(default_factory=list)


def reliability(
    study: optuna.Study | TrialsView,
    pruner: BasePruner | None = None,
    *,
    metric: str = "metric",
) -> Reliability:
    """Does each epoch's metric rank trials as their final value does, and would the pruner
    have stopped trials that ended among the best?

    For every epoch with enough completed trials: Spearman and Kendall rank correlations
    between the metric then and the final objective. The pruner (the study's current rule)
    is replayed on each of the best quarter of completed trials, cut at each epoch, against
    the study's other trials as they are now; the first epoch at which it says "prune" counts.
    """
    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE and t.intermediate_values]
    if len(study.directions) > 1:
        return Reliability([], len(completed), 0, note="multi-objective studies are not pruned")
    if len(completed) < MIN_TRIALS_FOR_CORRELATION:
        return Reliability([], len(completed), 0,
                           note=f"{len(completed)} completed trials with learning curves; at least {MIN_TRIALS_FOR_CORRELATION} are needed to judge pruning")
    maximize = study.directions[0] == StudyDirection.MAXIMIZE
    ranked = sorted(completed, key=lambda t: t.value, reverse=maximize)
    good = ranked[: min(MAX_GOOD_TRIALS, max(1, math.ceil(len(ranked) / 4)))]
    first_stop, note = _replay(study, trials, good, pruner)
    pruned_at: dict[int, int] = {}
    for t in trials:
        if t.state == TrialState.PRUNED and t.last_step is not None:
            pruned_at[t.last_step] = pruned_at.get(t.last_step, 0) + 1

    from scipy import stats  # 0.6 s to import: only this analysis needs it, not `hpo status`

    rungs = []
    for step in sorted({s for t in completed for s in t.intermediate_values} | set(pruned_at)):
        have = [t for t in completed if step in t.intermediate_values and math.isfinite(t.intermediate_values[step])]
        rho = tau = None
        if len(have) >= MIN_TRIALS_FOR_CORRELATION:
            rho = _finite(stats.spearmanr([t.intermediate_values[step] for t in have], [t.value for t in have]).statistic)
            tau = _finite(stats.kendalltau([t.intermediate_values[step] for t in have], [t.value for t in have]).statistic)
        good_pruned = None if first_stop is None else sum(1 for s in first_stop.values() if s == step)
        rungs.append(Rung(step, len(have), rho, tau, pruned_at.get(step, 0), good_pruned))
    result = Reliability(rungs, len(completed), len(good), note=note)
    result.warnings = _warnings(result, metric)
    return result


def _replay(study, trials: Sequence[FrozenTrial], good: Sequence[FrozenTrial], pruner: BasePruner | None) -> tuple[dict[int, int | None] | None, str]:
    """For each good trial, the first epoch at which `pruner` would stop it (None: never)."""
    if pruner is None:
        return None, "no pruner given; rank correlations only"
    if isinstance(pruner, NopPruner):
        return None, "the study has no pruner; rank correlations only"
    finished = [t for t in trials if t.state.is_finished()]
    first_stop: dict[int, int | None] = {}
    try:
        for g in good:
            others = [t for t in finished if t.number != g.number]
            first_stop[g.number] = None
            for step in sorted(g.intermediate_values):
                cut = _cut(g, step)
                if pruner.prune(TrialsView(others + [cut], study.directions, study.study_name), cut):
                    first_stop[g.number] = step
                    break
    except Exception as err:  # pruners that keep state in the storage (Hyperband) cannot be replayed on a view
        return None, f"the {type(pruner).__name__} cannot be replayed offline ({type(err).__name__}); rank correlations only"
    return first_stop, ""


def _cut(trial: FrozenTrial, step: int) -> FrozenTrial:
    """The trial as it was while running, right after reporting `step`."""
    return FrozenTrial(
        number=trial.number, state=TrialState.RUNNING, value=None, datetime_start=trial.datetime_start,
        datetime_complete=None, params=trial.params, distributions=trial.distributions, user_attrs=trial.user_attrs,
        system_attrs={}, intermediate_values={s: v for s, v in trial.intermediate_values.items() if s <= step},
        trial_id=trial._trial_id,
    )


def _warnings(result: Reliability, metric: str) -> list[str]:
    """At most two lines: weak rank correlation where trials were pruned; good trials the rule stops."""
    cut = [r for r in result.rungs if r.pruned_here]  # a weak correlation where nothing was stopped costs nothing
    weak = [r for r in cut if r.spearman is not None and r.spearman < MIN_RANK_CORRELATION]
    lost = [r for r in result.rungs if r.good_pruned]
    out = []
    if weak:
        where = ", ".join(f"{r.spearman:.2f} at epoch {r.step} ({r.pruned_here} pruned there)" for r in weak)
        out.append(f"early rungs do not predict the end: {metric} ranks trials against their final value with Spearman {where}; "
                   f"want >= {MIN_RANK_CORRELATION}")
    n_lost = sum(r.good_pruned or 0 for r in lost)
    if result.n_good and n_lost / result.n_good >= MAX_GOOD_PRUNED_SHARE:
        where = ", ".join(f"{r.good_pruned} at epoch {r.step}" for r in lost)
        out.append(f"the pruning rule would stop {n_lost} of the {result.n_good} best trials ({where}); "
                   "consider more warmup epochs or a gentler pruner")
    return out


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def of_study(study: optuna.Study, config) -> tuple[Waste, Reliability]:
    """Both analyses for an hpo study, with the pruner and epoch count from its stored config."""
    from hpo import samplers

    s = config.study
    pruner = samplers.build_pruner(s.pruner, s.pruner_options, s.pruner_wrapped)
    trials = study.get_trials(deepcopy=False)
    return waste(trials, config.trainer.epochs), reliability(study, pruner, metric=s.metrics[0])
