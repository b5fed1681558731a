"""One self-contained HTML page about a study: summary, config, best trial, top trials,
waste and pruning reliability, and every plot. plotly.js is inlined once, so the page
opens offline; the layout is a single fluid column, so it reads on a phone.
"""

from __future__ import annotations

import datetime
import html
import os
from collections.abc import Sequence

import optuna
import plotly.offline
import yaml
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo import analysis, plots
from hpo import importance as importance_mod
from hpo.report import STATES, best_trials, params_of, status_counts

TOP_K = 10
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:0 12px 40px;color:#222;line-height:1.45}
h1{font-size:1.5em;margin:.8em 0 .2em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.muted{color:#666;font-size:.9em} .warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em .8em;margin:.5em 0}
.scroll{overflow-x:auto} table{border-collapse:collapse;font-size:.9em;margin:.4em 0} td,th{border-bottom:1px solid #eee;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f6f6f6} td.l,th.l{text-align:left;white-space:normal} pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
.plot{width:100%;margin:1em 0} .kv td{white-space:normal} .kv td:first-child{text-align:left;color:#555}
"""


def build(study: optuna.Study, config, *, storage_label: str = "", evaluator: str = "ped-anova", top_k: int = TOP_K) -> str:
    """The report page as one HTML string."""
    s = config.study
    trials = study.get_trials(deepcopy=False)
    waste, reliability = analysis.of_study(study, config)
    imp = None
    try:
        imp = importance_mod.compute(study, evaluator, objectives=s.metrics)
    except importance_mod.ImportanceError:
        pass  # the importance section says why, from plots.figure's own message
    parts = [
        f"<h1>Study {_e(study.study_name)}</h1>",
        f"<p class=muted>{_e(' / '.join(f'{d} {m}' for d, m in zip(s.directions, s.metrics)))} · {s.sampler} sampler · "
        f"{s.pruner} pruner · storage {_e(storage_label)} · report written {datetime.datetime.now():%Y-%m-%d %H:%M}</p>",
    ]
    parts += [f"<div class=warn>⚠ {_e(w)}</div>" for w in reliability.warnings]
    parts += _summary(study, trials, config, waste)
    parts += _top(study, trials, s.metrics, top_k)
    parts += _waste_section(waste)
    parts += _reliability_section(reliability, s.metrics[0])
    parts.append("<h2>Plots</h2>")
    for kind in plots.KINDS:
        if kind == "pareto" and len(study.directions) < 2:
            continue
        try:
            fig = plots.figure(kind, study, evaluator=evaluator, metrics=s.metrics, importance=imp)
        except plots.PlotError as err:
            parts.append(f"<p class=muted>{_e(kind)}: {_e(str(err))}</p>")
            continue
        fig.update_layout(autosize=True, width=None)
        parts.append("<div class=plot>" + fig.to_html(full_html=False, include_plotlyjs=False, default_width="100%",
                                                      config={"responsive": True, "displaylogo": False}) + "</div>")
    parts.append("<h2>Config</h2><p class=muted>as stored in the study (user attribute hpo:config)</p>")
    parts.append(f"<pre>{_e(yaml.safe_dump(config.raw, sort_keys=False))}</pre>")
    return _page(f"hpo report: {study.study_name}", "\n".join(parts))


def write(page: str, out: str, study_name: str) -> str:
    """Writes to `out` (a .html file, or a folder that gets ``<study>.html``); returns the path."""
    suffix = os.path.splitext(out)[1].lower()
    # r.txt is a typo, not a folder to make; a folder may still have a dot (runs/v1.2).
    if suffix[1:].isalpha() and suffix not in (".html", ".htm") and not os.path.isdir(out):
        raise plots.PlotError(f"cannot write {out}: unknown file type {suffix} (expected an .html file, or a folder)")
    path = out if suffix in (".html", ".htm") else os.path.join(out, f"{study_name}.html")
    with plots.writable(path), open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style>"
        f"<script type=\"text/javascript\">{plotly.offline.get_plotlyjs()}</script></head>\n<body>\n{body}\n</body></html>\n"
    )


def _summary(study, trials: Sequence[FrozenTrial], config, waste: analysis.Waste) -> list[str]:
    metrics, n_trials = config.study.metrics, config.study.n_trials
    counts = status_counts(trials)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    rows = [("trials", f"{len(trials)} of {n_trials or '∞'} budgeted")]
    rows += [(state.lower(), str(counts[state])) for state in STATES]
    rows += [("wall time", _dur(wall)), ("compute time (sum over trials)", _dur(waste.total))]
    out = ["<h2>Summary</h2><div class=scroll><table class=kv>"]
    out += [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows]
    out.append("</table></div>")
    best = best_trials(study)
    if not best:
        out.append("<p><b>No completed trial yet.</b> Plots that need finished trials are left out below.</p>")
    for t in best:
        values = ", ".join(f"{m} = {v:.6g}" for m, v in zip(metrics, t.values))
        params = params_of(t, config)
        out.append(f"<h2>Best trial #{t.number}</h2><p>{_e(values)} · {_dur(analysis.trial_seconds(t))} · "
                   f"worker {_e(str(t.user_attrs.get('hpo:worker', '?')))}</p>")
        out.append(f"<pre>{_e(yaml.safe_dump(params, sort_keys=False))}</pre>")
    return out


def _top(study, trials: Sequence[FrozenTrial], metrics: Sequence[str], k: int) -> list[str]:
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if not completed:
        return []
    reverse = study.directions[0] == StudyDirection.MAXIMIZE
    top = sorted(completed, key=lambda t: t.values[0], reverse=reverse)[:k]
    params = sorted({p for t in top for p in t.params})
    head = "".join(f"<th>{_e(m)}</th>" for m in metrics) + "<th>seconds</th>" + "".join(f"<th class=l>{_e(p)}</th>" for p in params)
    out = [f"<h2>Top {len(top)} trials</h2><div class=scroll><table><tr><th>#</th>{head}</tr>"]
    for t in top:
        cells = "".join(f"<td>{v:.4f}</td>" for v in t.values) + f"<td>{analysis.trial_seconds(t):.1f}</td>"
        cells += "".join(f"<td class=l>{_e(_fmt(t.params.get(p, '')))}</td>" for p in params)
        out.append(f"<tr><td>{t.number}</td>{cells}</tr>")
    out.append("</table></div>")
    return out


def _waste_section(w: analysis.Waste) -> list[str]:
    out = ["<h2>Waste: where the compute went</h2><div class=scroll><table><tr><th class=l>trials</th><th>count</th><th>seconds</th><th>share</th></tr>"]
    for state, label in (("COMPLETE", "completed"), ("PRUNED", "pruned"), ("FAIL", "failed")):
        share = w.seconds[state] / w.total if w.total else 0.0
        out.append(f"<tr><td class=l>{label}</td><td>{w.counts[state]}</td><td>{w.seconds[state]:.1f}</td><td>{share:.0%}</td></tr>")
    out.append("</table></div>")
    if w.rungs:
        out.append("<p>Pruned trials by the epoch they were stopped at:</p><div class=scroll><table><tr><th>epoch</th><th>pruned</th><th>epochs run</th><th>seconds</th></tr>")
        out += [f"<tr><td>{r.step}</td><td>{r.pruned}</td><td>{r.epochs}</td><td>{r.seconds:.1f}</td></tr>" for r in w.rungs]
        out.append("</table></div>")
    if w.without_pruning is not None and w.saved is not None:
        out.append(f"<p>Without pruning this study would have cost about <b>{_dur(w.without_pruning)}</b> of compute instead of "
                   f"{_dur(w.total)}: pruning saved {_dur(w.saved)} ({w.saved / w.without_pruning:.0%}). Estimate: every pruned "
                   f"trial runs all {w.epochs} epochs at the completed trials' {w.seconds_per_epoch:.2f} s per epoch.</p>")
    return out


def _reliability_section(r: analysis.Reliability, metric: str) -> list[str]:
    out = ["<h2>Pruning reliability</h2>"]
    if not r.rungs:
        return out + [f"<p class=muted>{_e(r.note)}</p>"]
    out.append(f"<p>Rank correlation between {_e(metric)} at each epoch and the final value, over {r.n_completed} completed "
               f"trials; and how many of the {r.n_good} best trials the current pruning rule would have stopped there "
               f"(replayed against the study's other trials).</p>")
    if r.note:
        out.append(f"<p class=muted>{_e(r.note)}</p>")
    out.append("<div class=scroll><table><tr><th>epoch</th><th>trials</th><th>Spearman</th><th>Kendall</th><th>pruned here</th><th>best trials it would stop</th></tr>")
    for g in r.rungs:
        out.append(f"<tr><td>{g.step}</td><td>{g.n}</td><td>{_num(g.spearman)}</td><td>{_num(g.kendall)}</td>"
                   f"<td>{g.pruned_here}</td><td>{'-' if g.good_pruned is None else g.good_pruned}</td></tr>")
    out.append("</table></div>")
    if not r.warnings:
        out.append("<p>Early epochs rank trials much as the final value does where pruning happened: pruning looks safe.</p>")
    return out


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
