"""Waste and pruning reliability against a hand-built study whose numbers are known.

See tests/inspect_studies.py: five completed trials of 4 epochs at 1 s per epoch, two
pruned (at epochs 0 and 1), one failed; trial E ends best but starts worst.
"""

from __future__ import annotations

import optuna
import pytest
from inspect_studies import hand_study, hand_trials, multi_objective_study

from hpo import analysis
from hpo.trials_view import TrialsView

MEDIAN = optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0)


def test_waste_splits_compute_by_state_and_rung():
    w = analysis.waste(hand_trials(), epochs=4)
    assert w.seconds == {"COMPLETE": 20.0, "PRUNED": 3.0, "FAIL": 0.5}
    assert w.counts == {"COMPLETE": 5, "PRUNED": 2, "FAIL": 1}
    assert [(r.step, r.pruned, r.seconds, r.epochs) for r in w.rungs] == [(0, 1, 1.0, 1), (1, 1, 2.0, 2)]
    assert w.total == pytest.approx(23.5)


def test_waste_estimates_the_unpruned_cost_from_completed_seconds_per_epoch():
    w = analysis.waste(hand_trials(), epochs=4)
    assert w.seconds_per_epoch == pytest.approx(1.0)
    # The pruned trials skipped 3 + 2 epochs at 1 s each.
    assert w.without_pruning == pytest.approx(28.5)
    assert w.saved == pytest.approx(5.0)


def test_waste_defaults_the_full_length_to_the_longest_completed_trial():
    assert analysis.waste(hand_trials()).epochs == 4


def test_waste_without_completed_trials_has_no_estimate():
    pruned_only = [t for t in hand_trials() if t.state.name == "PRUNED"]
    w = analysis.waste(pruned_only, epochs=4)
    assert w.without_pruning is None and w.saved is None and w.seconds["PRUNED"] == 3.0


def test_reliability_rank_correlations_per_epoch():
    r = analysis.reliability(hand_study(), MEDIAN, metric="val_accuracy")
    by_step = {g.step: g for g in r.rungs}
    assert set(by_step) == {0, 1, 2, 3}
    # Epochs 0-2 order A>B>C>D>E, the end orders E>A>B>C>D: Spearman 0, Kendall (6-4)/10.
    assert by_step[0].spearman == pytest.approx(0.0, abs=1e-9)
    assert by_step[0].kendall == pytest.approx(0.2)
    assert by_step[3].spearman == pytest.approx(1.0)
    assert [by_step[s].pruned_here for s in range(4)] == [1, 1, 0, 0]


def test_reliability_replays_the_rule_on_the_best_trials():
    r = analysis.reliability(hand_study(), MEDIAN, metric="val_accuracy")
    assert r.n_completed == 5 and r.n_good == 2  # E and A, the best quarter rounded up
    # E (0.1 at epoch 0, median of the others 0.35) is stopped at once; A never is.
    assert [g.good_pruned for g in r.rungs] == [1, 0, 0, 0]


def test_reliability_warns_when_early_rungs_do_not_predict_the_end():
    r = analysis.reliability(hand_study(), MEDIAN, metric="val_accuracy")
    assert len(r.warnings) == 2
    assert "early rungs do not predict the end" in r.warnings[0] and "epoch 0" in r.warnings[0]
    assert "1 of the 2 best trials" in r.warnings[1]


def test_reliability_is_quiet_when_curves_keep_their_order():
    trials = [t for t in hand_trials() if t.user_attrs["hpo:name"] != "E"]
    study = TrialsView(trials, [optuna.study.StudyDirection.MAXIMIZE])
    r = analysis.reliability(study, MEDIAN, metric="val_accuracy")
    assert r.warnings == []
    assert all(g.spearman == pytest.approx(1.0) for g in r.rungs)


def test_reliability_without_a_pruner_gives_correlations_only():
    r = analysis.reliability(hand_study(), optuna.pruners.NopPruner())
    assert all(g.good_pruned is None for g in r.rungs) and "no pruner" in r.note
    assert r.rungs[0].spearman == pytest.approx(0.0, abs=1e-9)


def test_reliability_needs_enough_completed_trials():
    few = TrialsView(hand_trials()[:3], [optuna.study.StudyDirection.MAXIMIZE])
    r = analysis.reliability(few, MEDIAN)
    assert r.rungs == [] and r.warnings == [] and "at least 5" in r.note


def test_reliability_skips_multi_objective_studies():
    r = analysis.reliability(multi_objective_study(), MEDIAN)
    assert r.rungs == [] and "multi-objective" in r.note
