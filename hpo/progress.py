"""The live view of a running study: a line per finished trial and a status bar.

It reads the storage, so it shows every worker's trials, local or not.
"""

from __future__ import annotations

import sys
import threading

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from hpo.config import Config
from hpo.report import describe_trial, status_counts
from hpo.storage import refresh


class StudyProgress:
    def __init__(self, study: optuna.Study, config: Config, console: Console | None = None) -> None:
        self.study, self.config = study, config
        self.console = console or Console(file=sys.stdout, highlight=False)
        self._seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[summary]}"),
            console=self.console,
            transient=True,
        )
        total = config.study.n_trials
        self._task = self._bar.add_task(config.study.name, total=total, summary="")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StudyProgress:
        self._bar.start()
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        refresh(self.study._storage)  # the workers wrote through storages of their own
        self.poll()
        self._bar.stop()

    def poll(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        for trial in sorted(trials, key=lambda t: t.number):
            if trial.state.is_finished() and trial.number not in self._seen:
                self._seen.add(trial.number)
                self._print(trial)
        counts = status_counts(trials)
        finished = counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"] - counts["requeued"]
        summary = f"pruned {counts['PRUNED']} · failed {counts['FAIL'] - counts['requeued']} · running {counts['RUNNING']}"
        best = _best(self.study)
        if best is not None:
            summary += f" · best {best.values[0]:.4f} (#{best.number})" if len(best.values) == 1 else ""
        self._bar.update(self._task, completed=finished, summary=summary)

    def _print(self, trial: FrozenTrial) -> None:
        style = {TrialState.COMPLETE: "green", TrialState.PRUNED: "yellow", TrialState.FAIL: "red"}.get(trial.state, "")
        # Plain text, not markup: an error message's "[batch, 3]" is text. Unwrapped, so that a
        # log or a pipe gets one line per trial.
        self.console.print(Text(describe_trial(trial, self.config.study.metrics), style=style), soft_wrap=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.poll()
            except Exception:  # a display hiccup must never stop the study
                pass


def _best(study: optuna.Study) -> FrozenTrial | None:
    if len(study.directions) > 1:
        return None
    try:
        return study.best_trial
    except ValueError:
        return None
