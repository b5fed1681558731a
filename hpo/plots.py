"""Study plots as self-contained HTML (plotly.js inlined, works offline) or static images.

Most kinds are Optuna's own figures with hpo's labels; three are hpo's own because Optuna's
do not show what a user asks here: importance (with its bootstrap spread and the method
used), intermediate values (pruned trials marked at the epoch they stopped) and the
timeline (trials per worker rather than per trial).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Iterator, Sequence

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState

from hpo import importance as importance_mod

EVALUATORS = importance_mod.EVALUATORS
KINDS = ("importance", "history", "intermediate", "parallel", "slice", "contour", "edf", "timeline", "pareto")
IMAGE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp")
# A contour is a matrix of n x n panels: beyond 4 parameters it is unreadable and slow.
CONTOUR_MAX_PARAMS = 4
STATE_COLORS = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#2ca02c", "WAITING": "#7f7f7f"}


class PlotError(ValueError):
    """One line for the user."""


def figure(
    kind: str,
    study: optuna.Study,
    *,
    evaluator: str = "ped-anova",
    metrics: Sequence[str] | None = None,
    importance: importance_mod.Importance | None = None,
) -> go.Figure:
    """The plotly figure of one kind for the study.

    Args:
        kind: one of `KINDS`.
        metrics: the objective names (the study file's metrics), used on axes.
        importance: an importance already computed (the report reuses it); else computed here.
    """
    import optuna.visualization as vis  # 0.4 s; only the commands that draw need it

    if kind not in KINDS:
        raise PlotError(f"unknown plot kind {kind!r} (expected one of {', '.join(KINDS)})")
    trials = study.get_trials(deepcopy=False)
    names = list(metrics) if metrics and len(metrics) == len(study.directions) else [f"objective {i}" for i in range(len(study.directions))]
    if kind == "timeline":
        return _timeline(study, trials)
    if kind == "intermediate":
        return _intermediate(study, trials, names[0])
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if not completed:
        raise PlotError(f"study {study.study_name!r} has no completed trial yet, so there is no {kind} plot to draw "
                        f"({_state_summary(trials)})")
    if kind == "importance":
        return importance_figure(importance or _importance(study, evaluator, names), study.study_name)
    if kind == "pareto":
        if len(study.directions) < 2:
            raise PlotError(f"a Pareto front needs several objectives; study {study.study_name!r} has one")
        return _titled(vis.plot_pareto_front(study, target_names=names), f"Pareto front of {study.study_name}")
    target = (lambda t: t.values[0]) if len(names) > 1 else None
    suffix = f" ({names[0]})" if len(names) > 1 else ""
    # Only plots with a parameter axis show a conditional parameter partially.
    note = _conditional_note(completed) if kind in ("slice", "parallel", "contour") else ""
    with warnings.catch_warnings():
        # Optuna warns for each pair of branch parameters that never co-occur; the note says it once.
        warnings.simplefilter("ignore")
        if kind == "history":
            fig = vis.plot_optimization_history(study, target=target, target_name=names[0])
        elif kind == "edf":
            fig = vis.plot_edf(study, target=target, target_name=names[0])
        elif kind == "slice":
            fig = vis.plot_slice(study, target=target, target_name=names[0])
        elif kind == "parallel":
            fig = vis.plot_parallel_coordinate(study, target=target, target_name=names[0])
        else:
            params = _contour_params(study, completed, importance)
            fig = vis.plot_contour(study, params=params, target=target, target_name=names[0])
            if len(params) < len({p for t in completed for p in t.params}):
                note = f"the {len(params)} most important parameters (PED-ANOVA). " + note
    title = {"history": "Optimization history", "edf": "Empirical distribution of the objective", "slice": "Slice",
             "parallel": "Parallel coordinates", "contour": "Contour"}[kind]
    fig = _titled(fig, f"{title} of {study.study_name}{suffix}")
    return _noted(fig, note) if note else fig


def importance_figure(imp: importance_mod.Importance, study_name: str) -> go.Figure:
    """Horizontal bars, one trace per objective, error bars = sd over the resamples."""
    fig = go.Figure()
    params = list(reversed(imp.params))  # plotly draws the first category at the bottom
    for i, objective in enumerate(imp.objectives):
        fig.add_trace(go.Bar(
            name=objective,
            y=params,
            x=[imp.mean[i].get(p, 0.0) for p in params],
            error_x={"type": "data", "array": [imp.std[i].get(p, 0.0) for p in params], "visible": True},
            orientation="h",
            hovertemplate="%{y}: %{x:.3f} ± %{error_x.array:.3f}<extra>" + objective + "</extra>",
        ))
    fig.update_layout(barmode="group", xaxis_title="importance (share of the total; bars: ± 1 sd)", yaxis_title="parameter",
                      showlegend=len(imp.objectives) > 1, height=max(320, 60 + 34 * len(params) * len(imp.objectives)))
    fig = _titled(fig, f"Hyperparameter importance of {study_name}<br><sup>{imp.method}</sup>")
    return _noted(fig, imp.conditional_note) if imp.conditional_note else fig


@contextlib.contextmanager
def writable(out: str) -> Iterator[None]:
    """Makes `out`'s folder, as `hpo report` does; a place that cannot be written is one line."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        yield
    except OSError as err:
        where = f" ({err.filename})" if err.filename and err.filename != out else ""
        raise PlotError(f"cannot write {out}: {err.strerror or err}{where}") from None


def write(fig: go.Figure, out: str) -> None:
    """Writes ``.html`` with plotly.js inlined; an image suffix goes through kaleido."""
    suffix = os.path.splitext(out)[1].lower()
    if suffix != ".html" and suffix not in IMAGE_SUFFIXES:
        raise PlotError(f"cannot write {out}: unknown file type {suffix or '(none)'} (expected .html, .png, .svg or .pdf)")
    if suffix == ".html":
        with writable(out):
            fig.write_html(out, include_plotlyjs=True, full_html=True, config={"responsive": True})
        return
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise PlotError("image export needs kaleido: pip install 'hpo[png]' (and a Chromium: apt-get install chromium)") from None
    try:
        with writable(out):
            fig.write_image(out, width=1000, height=max(500, int(fig.layout.height or 0)))
    except PlotError:
        raise
    except Exception as err:  # kaleido's errors are long; the first line says what is missing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PlotError(f"image export failed ({first[:200]}); kaleido needs a Chromium: apt-get install chromium, or write .html") from None


def _importance(study: optuna.Study, evaluator: str, names: list[str]) -> importance_mod.Importance:
    try:
        return importance_mod.compute(study, evaluator, objectives=names)
    except importance_mod.ImportanceError as err:
        raise PlotError(str(err)) from None


def _intermediate(study: optuna.Study, trials: Sequence[FrozenTrial], metric: str) -> go.Figure:
    """One line per trial; each pruned trial ends in an x at the epoch it was stopped."""
    with_values = [t for t in trials if t.intermediate_values]
    if not with_values:
        raise PlotError(f"study {study.study_name!r} has no intermediate values yet ({_state_summary(trials)})")
    fig = go.Figure()
    for t in with_values:
        steps = sorted(t.intermediate_values)
        pruned = t.state == TrialState.PRUNED
        fig.add_trace(go.Scatter(
            x=steps, y=[t.intermediate_values[s] for s in steps], mode="lines", name=f"trial {t.number}",
            line={"color": STATE_COLORS.get(t.state.name, "#7f7f7f"), "width": 1 if pruned else 1.6},
            opacity=0.55 if pruned else 0.9, showlegend=False, legendgroup=t.state.name,
            hovertemplate=f"trial {t.number} ({t.state.name.lower()})<br>epoch %{{x}}: %{{y:.4g}}<extra></extra>",
        ))
    stopped = [t for t in with_values if t.state == TrialState.PRUNED]
    fig.add_trace(go.Scatter(
        x=[t.last_step for t in stopped], y=[t.intermediate_values[t.last_step] for t in stopped], mode="markers",
        name=f"pruned ({len(stopped)})", marker={"symbol": "x", "size": 9, "color": STATE_COLORS["PRUNED"]},
        text=[f"trial {t.number}" for t in stopped], hovertemplate="%{text} pruned at epoch %{x}: %{y:.4g}<extra></extra>",
    ))
    fig.update_layout(xaxis_title="epoch", yaxis_title=metric, legend={"orientation": "h"})
    n_complete = sum(t.state == TrialState.COMPLETE for t in with_values)
    return _titled(fig, f"Learning curves of {study.study_name}<br><sup>{n_complete} completed (blue), "
                        f"{len(stopped)} pruned (orange, x where stopped)</sup>")


def _timeline(study: optuna.Study, trials: Sequence[FrozenTrial]) -> go.Figure:
    """Trials per worker over time, one trace per state."""
    started = [t for t in trials if t.datetime_start is not None]
    if not started:
        raise PlotError(f"study {study.study_name!r} has no started trial yet ({_state_summary(trials)})")
    now = datetime.datetime.now()
    fig = go.Figure()
    for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING"):
        group = [t for t in started if t.state.name == state]
        if not group:
            continue
        ends = [t.datetime_complete or now for t in group]
        fig.add_trace(go.Bar(
            name=state.lower(), orientation="h", marker_color=STATE_COLORS[state],
            y=[t.user_attrs.get("hpo:worker", "unknown worker") for t in group],
            base=[t.datetime_start.isoformat() for t in group],
            x=[(end - t.datetime_start).total_seconds() * 1000 for t, end in zip(group, ends)],
            text=[f"#{t.number}" for t in group], textposition="inside",
            hovertemplate="trial %{text}<br>%{base} for %{customdata:.1f}s<extra>" + state.lower() + "</extra>",
            customdata=[(end - t.datetime_start).total_seconds() for t, end in zip(group, ends)],
        ))
    n_workers = len({t.user_attrs.get("hpo:worker", "unknown worker") for t in started})
    fig.update_layout(barmode="overlay", xaxis={"type": "date", "title": "time"}, yaxis_title="worker",
                      height=max(300, 120 + 40 * n_workers))
    return _titled(fig, f"Timeline of {study.study_name}: trials per worker")


def _contour_params(study: optuna.Study, completed: Sequence[FrozenTrial], imp: importance_mod.Importance | None) -> list[str]:
    params = sorted({p for t in completed for p in t.params})
    if len(params) <= CONTOUR_MAX_PARAMS:
        return params
    if imp is None:
        try:
            imp = importance_mod.compute(study, "ped-anova", repeats=1)
        except importance_mod.ImportanceError:
            return params[:CONTOUR_MAX_PARAMS]
    ranked = [p for p in imp.params if p in params] + [p for p in params if p not in imp.params]
    return ranked[:CONTOUR_MAX_PARAMS]


def _conditional_note(completed: Sequence[FrozenTrial]) -> str:
    counts: dict[str, int] = {}
    for t in completed:
        for p in t.params:
            counts[p] = counts.get(p, 0) + 1
    partial = sorted(p for p, n in counts.items() if n < len(completed))
    if not partial:
        return ""
    return "Conditional parameters, shown only for the trials that have them: " + ", ".join(
        f"{p} ({counts[p]}/{len(completed)})" for p in partial)


def _state_summary(trials: Sequence[FrozenTrial]) -> str:
    if not trials:
        return "no trials"
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _titled(fig: go.Figure, title: str) -> go.Figure:
    fig.update_layout(title={"text": title}, margin={"t": 90})
    return fig


def _noted(fig: go.Figure, note: str) -> go.Figure:
    """A line under the plot area; also kept in layout.meta so tests and the report can read it."""
    # Pinned in pixels below the plot area so it never collides with the x-axis title.
    fig.add_annotation(text=note, xref="paper", yref="paper", x=0, y=0, yshift=-70, showarrow=False, align="left",
                       xanchor="left", yanchor="top", font={"size": 11})
    fig.update_layout(margin={"b": 110}, meta={"note": note})
    return fig
