"""Hyperparameter importance with its spread, at a bounded cost.

One number per parameter hides how much of it is noise: with 40 trials, two parameters at
0.21 and 0.18 are usually indistinguishable. So importance is evaluated on `repeats`
bootstrap resamples of the completed trials and reported as mean ± standard deviation.
Each resample holds at most `max_trials` trials (drawn with replacement), which caps the
cost on large studies: fANOVA grows superlinearly with trials, PED-ANOVA barely at all
(see scripts/bench_importance.py and the README for measured times).
"""

from __future__ import annotations

import math
import random
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.trials_view import TrialsView

if TYPE_CHECKING:
    from optuna.importance import BaseImportanceEvaluator

# optuna.importance is imported when an evaluator is made: it imports scikit-learn (a second),
# which every CLI command would otherwise pay at start-up.
EVALUATORS: dict[str, Callable[[int], BaseImportanceEvaluator]] = {
    "ped-anova": lambda seed: _evaluators().PedAnovaImportanceEvaluator(),
    "fanova": lambda seed: _evaluators().FanovaImportanceEvaluator(seed=seed),
    "mdi": lambda seed: _evaluators().MeanDecreaseImpurityImportanceEvaluator(seed=seed),
}


def _evaluators():
    import optuna.importance

    return optuna.importance
LABELS = {"ped-anova": "PED-ANOVA", "fanova": "fANOVA", "mdi": "mean decrease impurity"}
# Trials per resample beyond which a study is subsampled. PED-ANOVA stays in milliseconds
# at 10,000 trials; fANOVA takes tens of seconds at 1,000, so it is capped much lower.
MAX_TRIALS = {"ped-anova": 10_000, "fanova": 200, "mdi": 1_000}
# Evaluators other than PED-ANOVA only assess parameters present in every completed trial.
HANDLES_CONDITIONAL = {"ped-anova"}


class ImportanceError(ValueError):
    """One line for the user."""


@dataclass
class Importance:
    evaluator: str
    objectives: list[str]
    params: list[str]  # most important first (by the first objective's mean)
    mean: list[dict[str, float]]  # per objective: param -> mean importance over resamples
    std: list[dict[str, float]]
    n_completed: int
    per_resample: int
    repeats: int
    conditional: dict[str, int] = field(default_factory=dict)  # param -> completed trials that have it
    excluded: list[str] = field(default_factory=list)  # conditional params the evaluator cannot assess

    @property
    def method(self) -> str:
        """One line saying how the numbers were obtained, shown on every importance plot."""
        how = f"{LABELS[self.evaluator]}, mean ± sd over {self.repeats} bootstrap resamples"
        if self.per_resample < self.n_completed:
            return f"{how} of {self.per_resample} trials subsampled from {self.n_completed} completed (cost cap)"
        return f"{how} of {self.n_completed} completed trials"

    @property
    def conditional_note(self) -> str:
        if not self.conditional:
            return ""
        present = ", ".join(f"{p} ({n}/{self.n_completed})" for p, n in sorted(self.conditional.items()))
        if self.excluded:
            return f"conditional parameters left out by {LABELS[self.evaluator]}: {present}; --evaluator ped-anova assesses them"
        return f"conditional parameters, assessed on the trials that have them: {present}"


def compute(
    study: optuna.Study,
    evaluator: str = "ped-anova",
    *,
    objectives: Sequence[str] | None = None,
    repeats: int = 10,
    max_trials: int | None = None,
    seed: int = 0,
) -> Importance:
    """Importances of the study's parameters, per objective, with their bootstrap spread.

    Example:
        >>> imp = compute(study, "ped-anova", repeats=10)
        >>> imp.mean[0]["lr"], imp.std[0]["lr"]
    """
    if evaluator not in EVALUATORS:
        raise ImportanceError(f"unknown importance evaluator {evaluator!r} (expected one of {', '.join(EVALUATORS)})")
    if repeats < 1:
        raise ImportanceError(f"repeats must be at least 1 but got {repeats}")
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(completed) < 2:
        raise ImportanceError(f"importance needs at least 2 completed trials; study {study.study_name!r} has {len(completed)}")
    n_objectives = len(study.directions)
    names = list(objectives) if objectives and len(objectives) == n_objectives else [f"objective {i}" for i in range(n_objectives)]
    conditional = _conditional(completed)
    excluded = sorted(conditional) if evaluator not in HANDLES_CONDITIONAL else []
    cap = max_trials or MAX_TRIALS[evaluator]
    per_resample = min(len(completed), cap)

    rng = random.Random(seed)
    samples: list[list[dict[str, float]]] = [[] for _ in range(n_objectives)]
    for r in range(repeats):
        resample = [completed[rng.randrange(len(completed))] for _ in range(per_resample)]
        view = TrialsView.of(study, resample)
        for i in range(n_objectives):
            scores = _evaluate(view, EVALUATORS[evaluator](seed + r), i, n_objectives)
            if scores is not None:
                samples[i].append(scores)
    if not any(samples):
        raise ImportanceError(f"{LABELS[evaluator]} could not rank the parameters of study {study.study_name!r} (too few distinct trials)")

    params = sorted({p for per_objective in samples for s in per_objective for p in s})
    mean, std = [], []
    for per_objective in samples:
        # A parameter missing from a resample (too few trials had it) scored 0 there.
        columns = {p: [s.get(p, 0.0) for s in per_objective] for p in params}
        mean.append({p: statistics.fmean(v) if v else math.nan for p, v in columns.items()})
        std.append({p: statistics.pstdev(v) if len(v) > 1 else 0.0 for p, v in columns.items()})
    params.sort(key=lambda p: -_or_zero(mean[0].get(p)))
    return Importance(evaluator, names, params, mean, std, len(completed), per_resample, repeats, conditional, excluded)


def _evaluate(view: TrialsView, evaluator: BaseImportanceEvaluator, index: int, n_objectives: int) -> dict[str, float] | None:
    target = (lambda t: t.values[index]) if n_objectives > 1 else None
    try:
        with warnings.catch_warnings():
            # "Some regimes have less than 2 trials": the bootstrap spread shows that inaccuracy.
            warnings.simplefilter("ignore", UserWarning)
            return dict(optuna.importance.get_param_importances(view, evaluator=evaluator, target=target))  # type: ignore[arg-type]
    except (ValueError, RuntimeError, ZeroDivisionError):
        # A resample can be degenerate (one distinct trial, a constant objective): skip it.
        return None


def _conditional(completed: Sequence[FrozenTrial]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in completed:
        for p in t.params:
            counts[p] = counts.get(p, 0) + 1
    return {p: n for p, n in counts.items() if n < len(completed)}


def _or_zero(x: float | None) -> float:
    return 0.0 if x is None or math.isnan(x) else x
