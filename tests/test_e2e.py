"""End to end, as a user runs it: the CLI in subprocesses, real Redis and PostgreSQL, several workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import DIGITS_YAML, hpo, study_file
from optuna.trial import TrialState

from hpo.storage import open_storage

pytestmark = pytest.mark.e2e

# A low-learning-rate baseline cannot reach 50% accuracy in one epoch: the threshold pruner
# stops it at epoch 1, so every run of this study prunes at least one trial.
FAST = {
    "study": {"n_trials": 9, "pruner": {"name": "threshold", "options": {"lower": 0.5, "n_warmup_steps": 1}}},
    # Enough epochs that the first worker up cannot finish the study before the others have
    # imported torch: several workers must share it.
    "trainer": {"epochs": 30},
}
SLOW_BASELINE = {"lr": 1.0e-4, "optimizer": {"name": "sgd", "momentum": 0.5, "nesterov": False}, "model": {"width": 32, "layers": 1}}
# And two that pass the threshold by far, so every run also completes some trials, whichever
# worker's sampler proposes the rest (random ones are often slow SGD runs that get pruned).
GOOD_BASELINES = [{"lr": 3.0e-3, "optimizer": {"name": "adam", "beta1": 0.9}, "model": {"width": width, "layers": 2}}
                  for width in (128, 256)]


def fast_study(tmp_path: Path, name: str) -> Path:
    path = study_file(tmp_path, name, **FAST)
    raw = yaml.safe_load(path.read_text())
    raw["baseline"] = [SLOW_BASELINE, *GOOD_BASELINES]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def finished_states(url: str, name: str) -> list[TrialState]:
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    return [t.state for t in study.get_trials()]


def test_run_digits_study_on_embedded_storage(tmp_path: Path) -> None:
    result = hpo("run", str(DIGITS_YAML), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "running study digits-mlp on " in result.stdout
    assert "best: trial #" in result.stdout
    study = optuna.load_study(study_name="digits-mlp", storage=open_storage(str(tmp_path / "hpo.journal")))
    states = [t.state for t in study.get_trials()]
    assert len(states) == 40 and TrialState.RUNNING not in states
    assert states.count(TrialState.PRUNED) >= 1
    assert study.best_value >= 0.95


def run_shared_study(tmp_path: Path, url: str, name: str, optuna_url: str) -> None:
    path = fast_study(tmp_path, name)
    created = hpo("create", str(path), "--storage", url, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    workers = [
        subprocess.Popen([sys.executable, "-m", "hpo", "worker", "--study", name, "--storage", url, "--threads", "1"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    for w, (_out, err) in zip(workers, outputs):
        assert w.returncode == 0, err
    states = finished_states(url, name)
    assert len(states) == 9, states
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert states.count(TrialState.PRUNED) >= 1
    # Several workers really shared the study.
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    assert len({t.user_attrs["hpo:worker"] for t in study.get_trials()}) >= 2
    # Optuna's own CLI reads the same study.
    optuna_cli = str(Path(sys.executable).with_name("optuna"))
    listed = subprocess.run([optuna_cli, "trials", "--study-name", name, "--storage", optuna_url, "-f", "json"],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert sorted(t["number"] for t in json.loads(listed.stdout)) == list(range(9))


def test_create_and_three_workers_on_redis(tmp_path: Path, redis_url: str) -> None:
    run_shared_study(tmp_path, redis_url, "e2e-redis", redis_url)


def test_create_and_three_workers_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    # Optuna's CLI builds its own engine: name the psycopg 3 driver for it.
    run_shared_study(tmp_path, postgres_url, "e2e-postgres", postgres_url.replace("postgresql://", "postgresql+psycopg://"))


def test_bad_study_file_gives_one_line_and_exit_2_before_anything_is_created(tmp_path: Path) -> None:
    path = study_file(tmp_path, "bad", study={"n_trials": 0})
    result = hpo("run", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"{path}:5: study.n_trials: 0 is not an integer >= 1 (expected an integer >= 1)\n"
    assert not (tmp_path / "hpo.journal").exists()


def test_status_best_studies_and_plot_after_a_run(tmp_path: Path) -> None:
    path = fast_study(tmp_path, "inspect")
    assert hpo("run", str(path), "--jobs", "2", cwd=tmp_path).returncode == 0
    status = hpo("status", cwd=tmp_path)
    assert status.returncode == 0 and status.stdout.startswith("study inspect: 9/9 trials")
    assert "workers:" in status.stdout
    counts = json.loads(hpo("status", "--json", cwd=tmp_path).stdout)["counts"]
    assert counts["COMPLETE"] + counts["PRUNED"] == 9 and counts["PRUNED"] >= 1
    assert "inspect: 9 trials, maximize, best" in hpo("studies", cwd=tmp_path).stdout

    best = hpo("best", cwd=tmp_path)
    assert best.returncode == 0 and best.stdout.startswith("# best trial #")
    # The printed params are a fixed space that hpo accepts: retrain the best configuration.
    raw = yaml.safe_load(path.read_text())
    raw.update(yaml.safe_load(best.stdout))
    raw["study"].update({"name": "retrain", "n_trials": 1})
    raw.pop("baseline")
    (tmp_path / "retrain.yaml").write_text(yaml.safe_dump(raw))
    assert hpo("check", "retrain.yaml", cwd=tmp_path).returncode == 0

    plot = hpo("plot", "importance", "--study", "inspect", "--out", "imp.html", cwd=tmp_path)
    assert plot.returncode == 0, plot.stderr
    html = (tmp_path / "imp.html").read_text()
    assert "Hyperparameter importance of inspect" in html and "<script src=\"https://cdn" not in html
