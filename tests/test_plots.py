"""Every plot kind on small studies: traces, axis titles, pruned markers, conditional params,
multi-objective, no completed trial, and files that open offline."""

from __future__ import annotations

import json
import re
import shutil

import optuna
import pytest
from inspect_studies import hand_study, hand_trials, hpo, multi_objective_study, stored_hand_study, write_yaml

from hpo import importance, plots

SINGLE_KINDS = [k for k in plots.KINDS if k != "pareto"]


@pytest.fixture(scope="module")
def study() -> optuna.Study:
    return hand_study(conditional=True)


@pytest.mark.parametrize("kind", SINGLE_KINDS)
def test_each_kind_writes_an_offline_html_page(kind, study, tmp_path):
    out = tmp_path / f"{kind}.html"
    plots.write(plots.figure(kind, study, metrics=["val_accuracy"]), str(out))
    page = out.read_text()
    assert "<html" in page and "Plotly.newPlot" in page
    assert len(page) > 1_000_000, "plotly.js must be inlined for the page to open offline"
    assert re.search(r"<script[^>]*\bsrc=", page) is None, "no script may load from elsewhere"


@pytest.mark.parametrize("kind", SINGLE_KINDS)
def test_each_kind_has_traces_and_a_titled_layout(kind, study):
    fig = json.loads(plots.figure(kind, study, metrics=["val_accuracy"]).to_json())
    assert fig["data"], f"{kind} has no traces"
    assert "hand" in fig["layout"]["title"]["text"]


def test_intermediate_marks_each_pruned_trial_where_it_stopped(study):
    fig = plots.figure("intermediate", study, metrics=["val_accuracy"])
    curves = [t for t in fig.data if t.mode == "lines"]
    assert len(curves) == 7  # every trial with a learning curve (the failed one has none)
    marks = [t for t in fig.data if t.mode == "markers"]
    assert len(marks) == 1 and marks[0].marker.symbol == "x"
    assert list(marks[0].x) == [0, 1] and list(marks[0].y) == [0.05, 0.25]
    assert fig.layout.xaxis.title.text == "epoch" and fig.layout.yaxis.title.text == "val_accuracy"


def test_timeline_shows_trials_per_worker_by_state(study):
    fig = plots.figure("timeline", study)
    assert {t.name for t in fig.data} == {"complete", "pruned", "fail"}
    assert {y for t in fig.data for y in t.y} == {"w1", "w2"}
    assert sum(len(t.y) for t in fig.data) == 8
    assert fig.layout.yaxis.title.text == "worker"


def test_importance_default_ped_anova_includes_conditional_params_and_says_so(study):
    fig = plots.figure("importance", study)
    bars = fig.data
    assert len(bars) == 1 and bars[0].orientation == "h"
    assert {"optimizer.beta1", "optimizer.momentum", "lr"} <= set(bars[0].y)
    assert len(bars[0].error_x.array) == len(bars[0].y)
    assert "PED-ANOVA" in fig.layout.title.text and "bootstrap" in fig.layout.title.text
    assert "optimizer.beta1 (2/5)" in fig.layout.meta["note"]


@pytest.mark.parametrize("evaluator", ["fanova", "mdi"])
def test_importance_other_evaluators_leave_conditional_params_out_and_say_so(study, evaluator):
    fig = plots.figure("importance", study, evaluator=evaluator)
    assert "optimizer.beta1" not in set(fig.data[0].y)
    assert "left out" in fig.layout.meta["note"]
    assert importance.LABELS[evaluator] in fig.layout.title.text


def test_importance_spread_is_reported_over_resamples(study):
    imp = importance.compute(study, "ped-anova", repeats=6)
    assert imp.repeats == 6 and imp.per_resample == 5
    assert all(imp.std[0][p] >= 0 for p in imp.params)
    assert any(imp.std[0][p] > 0 for p in imp.params), "resamples of 5 trials cannot all agree"
    assert sum(imp.mean[0].values()) == pytest.approx(1.0, abs=1e-6)


def test_importance_caps_trials_per_resample_and_says_which_method():
    study = multi_objective_study(n=30)
    imp = importance.compute(study, "ped-anova", repeats=2, max_trials=10)
    assert imp.per_resample == 10 and "subsampled from 30" in imp.method


def test_slice_names_conditional_params(study):
    fig = plots.figure("slice", study)
    assert "optimizer.momentum (3/5)" in fig.layout.meta["note"]


def test_multi_objective_importance_has_one_trace_per_objective():
    fig = plots.figure("importance", multi_objective_study(), metrics=["acc", "latency"])
    assert [t.name for t in fig.data] == ["acc", "latency"]


@pytest.mark.parametrize("kind", plots.KINDS)
def test_multi_objective_every_kind_draws(kind):
    fig = plots.figure(kind, multi_objective_study(), metrics=["acc", "latency"]) if kind != "intermediate" else None
    if fig is None:
        with pytest.raises(plots.PlotError, match="no intermediate values"):
            plots.figure(kind, multi_objective_study())
    else:
        assert fig.data


def test_pareto_needs_several_objectives(study):
    with pytest.raises(plots.PlotError, match="several objectives"):
        plots.figure("pareto", study)


def test_no_completed_trial_is_a_clear_message_not_a_crash():
    study = optuna.create_study(direction="maximize", study_name="early")
    study.add_trials([t for t in hand_trials() if t.state.name != "COMPLETE"])
    with pytest.raises(plots.PlotError, match="no completed trial yet.*2 pruned, 1 fail"):
        plots.figure("importance", study)
    assert plots.figure("intermediate", study).data  # learning curves of pruned trials still draw


def test_cli_plot_writes_the_file_named(tmp_path):
    journal = stored_hand_study(tmp_path)
    proc = hpo("plot", "intermediate", "--storage", journal, "--out", str(tmp_path / "curves.html"))
    assert proc.returncode == 0, proc.stderr
    assert "Plotly.newPlot" in (tmp_path / "curves.html").read_text()


def test_cli_plot_without_completed_trials_is_one_line_and_exit_2(tmp_path):
    from hpo import coordinator
    from hpo.config import load_config
    from hpo.storage import open_storage

    journal = str(tmp_path / "early.journal")
    config = load_config(str(write_yaml(tmp_path, "early")))
    coordinator.create(config, open_storage(journal)).study.add_trials([t for t in hand_trials() if t.state.name == "PRUNED"])
    proc = hpo("plot", "importance", "--storage", journal, "--out", str(tmp_path / "i.html"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["hpo: error: study 'early' has no completed trial yet, so there is no "
                                                "importance plot to draw (2 pruned)"]
    assert not (tmp_path / "i.html").exists()


def test_unknown_output_type_is_refused(study, tmp_path):
    with pytest.raises(plots.PlotError, match="unknown file type .gif"):
        plots.write(plots.figure("history", study), str(tmp_path / "x.gif"))


def _has_kaleido_and_chromium() -> bool:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome"))


@pytest.mark.skipif(not _has_kaleido_and_chromium(), reason="PNG export needs kaleido and a Chromium (apt-get install chromium)")
def test_png_export_writes_an_image(study, tmp_path):
    out = tmp_path / "importance.png"
    plots.write(plots.figure("intermediate", study), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
