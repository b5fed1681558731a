"""`hpo status` as data and as a live view: counts, best so far, pace, running trials.

`snapshot` is what `hpo status --json` prints; `render` is one frame of `hpo status --watch`.
Both read only the storage, so they show every worker's trials, local or not.
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import optuna
from optuna.trial import TrialState

from hpo import analysis, coordinator, heartbeat
from hpo.report import STATES, best_trials, params_of, status_counts, worker_rows


def snapshot(study: optuna.Study, config, now: datetime.datetime | None = None) -> dict[str, Any]:
    """The study's state as plain JSON-ready data."""
    now = now or datetime.datetime.now()
    trials = study.get_trials(deepcopy=False)
    counts = status_counts(trials)
    # As the text view counts them: a failure that was re-queued is not a finished trial, its retry is.
    retried = heartbeat.retried_numbers(trials)
    finished = [t for t in trials if t.state.is_finished() and t.datetime_complete and t.number not in retried]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    running = [t for t in trials if t.state == TrialState.RUNNING]
    # A finished study's pace is over its own span; a running one's runs up to now.
    end = now if running or not finished else max(t.datetime_complete for t in finished)
    minutes = (end - min(starts)).total_seconds() / 60 if starts else 0.0
    _, reliability = analysis.of_study(study, config)
    return {
        "study": study.study_name,
        "n_trials": config.study.n_trials,
        "metrics": list(config.study.metrics),
        "counts": counts,
        "finished": len(finished),
        "trials_per_minute": round(len(finished) / minutes, 3) if minutes > 0 else None,
        "best": [{"number": t.number, "values": t.values, "params": params_of(t, config)} for t in best_trials(study)],
        "running": [{
            "number": t.number,
            "worker": t.user_attrs.get("hpo:worker"),
            "epoch": t.last_step,
            "latest": t.intermediate_values.get(t.last_step) if t.last_step is not None else None,
            "seconds": round((now - t.datetime_start).total_seconds(), 1) if t.datetime_start else None,
        } for t in sorted(running, key=lambda t: t.number)],
        "workers": worker_rows(study, trials),
        "warnings": reliability.warnings,
        # A queued trial past the spent budget never runs: it does not keep the study open.
        "done": not running and not coordinator.budget_left(config, trials, now),
    }


def render(snap: dict[str, Any]) -> str:
    """One frame of the live view, as text."""
    metric = snap["metrics"][0]
    counted = snap["counts"]["COMPLETE"] + snap["counts"]["PRUNED"] + snap["counts"]["FAIL"] - snap["counts"]["requeued"]
    pace = f"{snap['trials_per_minute']:.1f} trials/min" if snap["trials_per_minute"] else "pace unknown"
    state = "done" if snap["done"] else "running"
    lines = [f"study {snap['study']}: {counted}/{snap['n_trials'] or '∞'} trials finished, {pace}, {state}"]
    lines.append("  " + "  ".join(f"{s.lower()} {snap['counts'][s]}" for s in STATES))
    for b in snap["best"]:
        values = ", ".join(f"{m} {v:.4f}" for m, v in zip(snap["metrics"], b["values"]))
        lines.append(f"best so far: trial #{b['number']}: {values}")
    if not snap["best"]:
        lines.append("best so far: none (no completed trial yet)")
    if snap["running"]:
        lines.append("running:")
        for r in snap["running"]:
            at = f"epoch {r['epoch']}, {metric} {r['latest']:.4f}" if r["epoch"] is not None and r["latest"] is not None else "starting"
            lines.append(f"  #{r['number']:<4} {r['worker'] or '?'}: {at}, {r['seconds'] or 0:.0f}s")
    lines += [f"warning: {w}" for w in snap["warnings"]]
    return "\n".join(lines)


def watch(
    read: Callable[[], dict[str, Any]],
    *,
    interval: float = 2.0,
    out: TextIO | None = None,
    max_frames: int | None = None,
) -> dict[str, Any]:
    """Redraws `render(read())` every `interval` seconds until the study is done (or Ctrl-C).

    On a terminal each frame replaces the last; piped, frames follow each other.
    """
    out = out or sys.stdout
    clear = "\x1b[H\x1b[2J" if out.isatty() else ""
    frames = 0
    while True:
        snap = read()
        frames += 1
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        out.write(f"{clear}{render(snap)}\n[{stamp}] {'study done' if snap['done'] else f'refreshing every {interval:g}s, Ctrl-C to stop'}\n")
        out.flush()
        if snap["done"] or (max_frames is not None and frames >= max_frames):
            return snap
        time.sleep(interval)


def status_lines(study: optuna.Study, config) -> Sequence[str]:
    """The warning lines `hpo status` prints under its usual text."""
    _, reliability = analysis.of_study(study, config)
    return [f"warning: {w}" for w in reliability.warnings]
