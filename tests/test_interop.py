"""A study run by hpo, read by Optuna's own CLI and by optuna-dashboard."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from inspect_studies import ROOT, hpo, write_yaml

N_TRIALS = 6


@pytest.fixture(scope="module")
def journal(tmp_path_factory) -> str:
    """A real hpo run: 6 trials of 4 epochs on digits (a few seconds)."""
    tmp = tmp_path_factory.mktemp("interop")
    path = str(tmp / "interop.journal")
    proc = hpo("run", str(write_yaml(tmp, "interop", n_trials=N_TRIALS)), "--storage", path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return path


def _optuna(*args: str) -> subprocess.CompletedProcess:
    # Optuna's console script, run through this interpreter (optuna has no __main__).
    code = "import sys, optuna.cli; sys.exit(optuna.cli.main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_optuna_cli_lists_the_trials_hpo_ran(journal):
    proc = _optuna("trials", "--storage", journal, "--study-name", "interop", "-f", "json")
    assert proc.returncode == 0, proc.stderr
    trials = json.loads(proc.stdout)
    assert len(trials) == N_TRIALS
    assert {t["state"] for t in trials} <= {"COMPLETE", "PRUNED"}
    assert all(t["user_attrs"]["hpo:worker"] for t in trials)


def test_optuna_cli_best_trial_matches_hpo_best(journal):
    proc = _optuna("best-trial", "--storage", journal, "--study-name", "interop", "-f", "json")
    assert proc.returncode == 0, proc.stderr
    best = json.loads(proc.stdout)
    ours = json.loads(hpo("best", "--json", "--storage", journal).stdout)
    assert best["number"] == ours[0]["number"] and best["value"] == pytest.approx(ours[0]["values"][0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.skipif(importlib.util.find_spec("optuna_dashboard") is None, reason="needs optuna-dashboard: pip install 'hpo[dashboard]'")
def test_hpo_dashboard_serves_the_study_on_loopback(journal):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "hpo", "dashboard", "--storage", journal, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()  # printed once the socket is bound
        assert line.startswith(f"optuna-dashboard on http://127.0.0.1:{port}/dashboard/studies/"), line + proc.stderr.read()
        studies = _get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["interop"]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}")
        assert len(detail["trials"]) == N_TRIALS
        assert {t["state"] for t in detail["trials"]} <= {"Complete", "Pruned"}
        assert "ssh -N -L" in proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.skipif(importlib.util.find_spec("optuna_dashboard") is None, reason="needs optuna-dashboard: pip install 'hpo[dashboard]'")
def test_dashboard_port_in_use_is_one_line(journal):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = hpo("dashboard", "--storage", journal, "--port", str(busy.getsockname()[1]))
    assert proc.returncode == 2
    assert proc.stderr.startswith("hpo: error: cannot listen on 127.0.0.1:") and proc.stderr.count("\n") == 1


def test_report_renders_a_real_run(journal, tmp_path):
    proc = hpo("report", "--storage", journal, "--out", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    page = Path(tmp_path / "r.html").read_text()
    assert "Study interop" in page and "Learning curves of interop" in page
