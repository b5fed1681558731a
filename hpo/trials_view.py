"""A read-only stand-in for a study over a chosen list of trials.

Importance evaluators and pruners read a study only through `get_trials` and its
directions, so a bootstrap resample or "the study without this trial" needs no copy in
a storage: copying 10,000 trials into an in-memory study costs more than PED-ANOVA itself.
"""

from __future__ import annotations

from collections.abc import Container, Sequence

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


class TrialsView:
    """Answers the questions evaluators and pruners ask of a study, over `trials` only."""

    def __init__(self, trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection], study_name: str = "view") -> None:
        self._trials = list(trials)
        self.directions = list(directions)
        self.study_name = study_name

    @classmethod
    def of(cls, study: optuna.Study, trials: Sequence[FrozenTrial]) -> TrialsView:
        return cls(trials, study.directions, study.study_name)

    @property
    def direction(self) -> StudyDirection:
        if len(self.directions) > 1:
            raise RuntimeError("a multi-objective study has no single direction")
        return self.directions[0]

    def _is_multi_objective(self) -> bool:
        return len(self.directions) > 1

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        # Views are never mutated by their readers, so a deep copy would only cost time.
        return [t for t in self._trials if states is None or t.state in states]

    @property
    def trials(self) -> list[FrozenTrial]:
        return list(self._trials)
