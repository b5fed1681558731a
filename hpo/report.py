"""Text views of a study: trial lines, state counts, per-worker activity, the best trial as YAML."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from hpo import coordinator, heartbeat, space
from hpo.config import Config

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def status_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    retried = heartbeat.retried_numbers(list(trials))
    counts["requeued"] = sum(1 for t in trials if t.state == TrialState.FAIL and t.number in retried)
    return counts


def describe_trial(trial: FrozenTrial, metrics: Sequence[str]) -> str:
    took = f" in {trial.duration.total_seconds():.1f}s" if trial.duration is not None else ""
    if trial.state == TrialState.COMPLETE:
        values = ", ".join(f"{m} {v:.4f}" for m, v in zip(metrics, trial.values))
        return f"trial {trial.number:>4} complete  {values}{took}"
    if trial.state == TrialState.PRUNED:
        step = trial.last_step
        value = trial.intermediate_values.get(step) if step is not None else None
        at = f" at epoch {step}" if step is not None else ""
        shown = f" ({metrics[0]} {value:.4f})" if value is not None else ""
        return f"trial {trial.number:>4} pruned{at}{shown}{took}"
    reason = trial.user_attrs.get("hpo:fail_reason", "no reason recorded")
    return f"trial {trial.number:>4} {trial.state.name.lower()}  {reason}"


def trial_record(trial: FrozenTrial, config: Config) -> dict[str, Any]:
    """One trial as plain JSON-ready data: what `hpo status --trial N` shows."""
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "values": trial.values,
        "params": params_of(trial, config),
        "curve": [trial.intermediate_values[step] for step in sorted(trial.intermediate_values)],
        "worker": trial.user_attrs.get("hpo:worker"),
        "started": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "seconds": round(trial.duration.total_seconds(), 1) if trial.duration is not None else None,
        "retry_of": [a["trial"] for a in trial.user_attrs.get("hpo:attempts", [])],
        "reason": trial.user_attrs.get("hpo:fail_reason") or trial.user_attrs.get("hpo:pruned"),
        "traceback": trial.user_attrs.get("hpo:traceback"),
    }


def trial_text(trial: FrozenTrial, config: Config) -> str:
    """One trial in full, for a person: its line, params, curve, worker, attempts and traceback."""
    r = trial_record(trial, config)
    lines = [describe_trial(trial, config.study.metrics)]
    lines.extend("  " + line for line in yaml.safe_dump(r["params"], sort_keys=False).splitlines())
    if r["curve"]:
        lines.append(f"  {config.study.metrics[0]} by epoch: " + ", ".join(f"{v:.4f}" for v in r["curve"]))
    lines.append(f"  worker {r['worker'] or 'unknown'}, started {r['started'] or 'not yet'}")
    for attempt in trial.user_attrs.get("hpo:attempts", []):
        lines.append(f"  retry of #{attempt['trial']}: {attempt['reason']}")
    if r["traceback"]:
        lines.append("  traceback (its last lines, as recorded):")
        lines.extend("    " + line for line in r["traceback"].rstrip().splitlines())
    return "\n".join(lines)


def all_failed(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The first failed trial when trials failed and none completed or was pruned, else None."""
    if any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials):
        return None
    return next((t for t in trials if t.state == TrialState.FAIL), None)


def params_of(trial: FrozenTrial, config: Config) -> dict[str, Any]:
    """The nested params the trial's factories saw, fixed values included."""
    return space.unflatten(config.space, trial.params)


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    try:
        return study.best_trials if len(study.directions) > 1 else [study.best_trial]
    except ValueError:
        return []


def best_yaml(study: optuna.Study, config: Config) -> str:
    """The best trial's params as a ``space:`` of fixed values that hpo accepts as is."""
    trials = best_trials(study)
    if not trials:
        return f"# study {study.study_name}: no completed trial yet\n"
    chunks = []
    for trial in trials:
        values = ", ".join(f"{m} = {v:.6g}" for m, v in zip(config.study.metrics, trial.values))
        header = f"# best trial #{trial.number} of study {study.study_name}: {values}\n"
        chunks.append(header + yaml.safe_dump({"space": params_of(trial, config)}, sort_keys=False))
    return "\n".join(chunks)


def worker_rows(study: optuna.Study, trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """Per worker: its last heartbeat (host, pid, device), the trials it runs, and its trial
    counts by state."""
    rows: dict[str, dict[str, Any]] = {}
    now = time.time()
    for worker, beat in heartbeat.workers(study).items():
        rows[worker] = {"worker": worker, "host": beat["host"], "pid": beat["pid"], "device": beat.get("device"),
                        "running_all": [], "alive": beat.get("alive", True), "beat_age": round(now - beat["beat"], 1),
                        "COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    for t in trials:
        row = rows.get(t.user_attrs.get("hpo:worker", ""))
        if row is None:
            continue
        if t.state.name in row:
            row[t.state.name] += 1
        elif t.state == TrialState.RUNNING:
            row["running_all"].append(t.number)
    for row in rows.values():
        row["running"] = row["running_all"][0] if row["running_all"] else None
    return sorted(rows.values(), key=lambda r: r["worker"])


def retried_rows(trials: Sequence[FrozenTrial]) -> list[str]:
    """One line per retried trial: the chain of attempts and why each ended."""
    lines = []
    for t in trials:
        attempts = t.user_attrs.get("hpo:attempts")
        if attempts:
            chain = " -> ".join(f"#{a['trial']} ({a['reason']})" for a in attempts)
            lines.append(f"  #{t.number} {t.state.name.lower()}, retry of {chain}")
    return lines


def status_text(study: optuna.Study, config: Config) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = status_counts(trials)
    lines = [f"study {study.study_name}: {len(coordinator.counted(trials))}/{config.study.n_trials or '∞'} trials"]
    lines.append("  " + "  ".join(f"{s.lower()} {counts[s]}" for s in STATES))
    if counts["requeued"]:
        lines.append(f"  ({counts['requeued']} interrupted and re-queued, not counted)")
    for trial in best_trials(study):
        values = ", ".join(f"{m} {v:.4f}" for m, v in zip(config.study.metrics, trial.values))
        lines.append(f"best: trial #{trial.number}: {values}")
        lines.extend("  " + line for line in yaml.safe_dump(params_of(trial, config), sort_keys=False).splitlines())
    retried = retried_rows(trials)
    if retried:
        lines.append("retried:")
        lines.extend(retried)
    rows = worker_rows(study, trials)
    if rows:
        lines.append("workers:")
        for r in rows:
            if not r["alive"]:
                doing = "exited"
            elif r["beat_age"] > config.study.grace_period:
                doing = "lost (no heartbeat)"
            else:
                doing = "running " + ", ".join(f"#{n}" for n in r["running_all"]) if r["running_all"] else "idle"
            device = f" on device {r['device']}" if r["device"] else ""
            lines.append(f"  {r['worker']}{device}: {doing}, heartbeat {r['beat_age']:.0f}s ago; "
                         f"complete {r['COMPLETE']}, pruned {r['PRUNED']}, failed {r['FAIL']}")
    return "\n".join(lines)
