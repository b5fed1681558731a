"""`hpo report` (one offline page) and `hpo status` (warning line, --json, --watch)."""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import re
import subprocess
import sys

import pytest
from inspect_studies import hand_trials, hpo, stored_hand_study, write_yaml
from optuna.trial import FrozenTrial, TrialState

from hpo import coordinator, heartbeat, html_report, live, plots
from hpo.config import load_config
from hpo.storage import open_storage


@pytest.fixture(scope="module")
def journal(tmp_path_factory) -> str:
    return stored_hand_study(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def page(journal, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("out")
    proc = hpo("report", "--storage", journal, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out / 'hand.html'}"
    return (out / "hand.html").read_text()


def test_report_is_one_offline_page_readable_on_a_phone(page):
    assert page.startswith("<!DOCTYPE html>")
    assert '<meta name=viewport content="width=device-width, initial-scale=1">' in page
    assert re.search(r"<script[^>]*\bsrc=", page) is None and re.search(r"<link[^>]*\bhref=", page) is None
    assert page.count("Plotly.newPlot") == len(plots.KINDS) - 1  # every kind but the Pareto front of a 1-objective study
    assert "max-width:1100px" in page and "overflow-x:auto" in page


def test_report_has_summary_best_trial_top_table_and_config(page):
    assert "<h1>Study hand</h1>" in page
    assert "<td>complete</td><td>5</td>" in page and "<td>pruned</td><td>2</td>" in page
    assert "Best trial #4" in page and "momentum: 0.86" in page
    assert "Top 5 trials" in page
    assert "n_warmup_steps: 0" in page  # the stored config


def test_report_has_waste_and_reliability_with_the_warning(page):
    assert "<tr><td class=l>pruned</td><td>2</td><td>3.0</td><td>13%</td></tr>" in page
    assert "<b>28.5 s</b>" in page and "saved 5.0 s" in page
    assert "<tr><td>0</td><td>5</td><td>0.00</td><td>0.20</td><td>1</td><td>1</td></tr>" in page
    assert page.count("class=warn") == 2 and "early rungs do not predict the end" in page


def test_report_to_a_named_file_with_the_short_flag(journal, tmp_path):
    out = tmp_path / "sub" / "r.html"
    assert hpo("report", "--storage", journal, "-o", str(out)).returncode == 0
    assert out.stat().st_size > 1_000_000


def test_an_output_that_cannot_be_written_is_one_line(journal, tmp_path):
    (tmp_path / "a-file").write_text("")
    blocked = str(tmp_path / "a-file" / "x.html")  # its folder would be a file
    for command in (["plot", "history", "--out", blocked], ["report", "-o", blocked]):
        proc = hpo(*command, "--storage", journal)
        assert (proc.returncode, proc.stderr) == (2, f"hpo: error: cannot write {blocked}: File exists ({tmp_path / 'a-file'})\n"), command
    typo = hpo("report", "-o", str(tmp_path / "r.txt"), "--storage", journal)  # not a folder to make
    assert (typo.returncode, typo.stderr) == (2, f"hpo: error: cannot write {tmp_path / 'r.txt'}: unknown file type .txt "
                                                 "(expected an .html file, or a folder)\n")
    assert not (tmp_path / "r.txt").exists()
    dotted = hpo("report", "-o", str(tmp_path / "v1.2"), "--storage", journal)  # a folder's name may have a dot
    assert dotted.returncode == 0 and (tmp_path / "v1.2" / "hand.html").exists(), dotted.stderr
    port = hpo("dashboard", "--port", "99999", "--storage", journal)
    assert port.returncode == 2 and port.stderr.endswith("error: argument --port: must be 0-65535, got 99999\n")


def test_a_reader_that_leaves_first_ends_hpo_status_quietly(journal):
    # `hpo status | head -1`: the pipe's reader is gone when hpo writes. No error line; the exit
    # code a tool killed by SIGPIPE gives.
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "hpo", "status", "--storage", journal], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_report_of_a_study_without_completed_trials_says_so(tmp_path):
    storage = open_storage(str(tmp_path / "early.journal"))
    created = coordinator.create(load_config(str(write_yaml(tmp_path, "early"))), storage)
    created.study.add_trials([t for t in hand_trials() if t.state.name != "COMPLETE"])
    study, config = coordinator.load("early", storage)
    page = html_report.build(study, config)
    assert "No completed trial yet" in page
    assert "importance: study &#x27;early&#x27; has no completed trial yet" in page
    assert page.count("Plotly.newPlot") == 2  # learning curves and timeline still draw


def test_status_prints_the_reliability_warning(journal):
    proc = hpo("status", "--storage", journal)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and "early rungs do not predict the end" in warnings[0]


def test_status_json_is_machine_readable(journal):
    proc = hpo("status", "--json", "--storage", journal)
    data = json.loads(proc.stdout)
    assert data["counts"]["COMPLETE"] == 5 and data["counts"]["PRUNED"] == 2
    assert data["best"][0]["number"] == 4 and data["best"][0]["values"] == [0.9]
    assert data["done"] is True and data["running"] == []
    assert data["trials_per_minute"] == pytest.approx(8 / (70.5 / 60), rel=1e-3)  # 8 trials over 70.5 s
    assert len(data["warnings"]) == 2


def test_status_of_one_trial_shows_its_params_and_curve(journal):
    proc = hpo("status", "--trial", "4", "--storage", journal)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("trial    4 complete  val_accuracy 0.9000")
    assert "  model:" in lines and "  val_accuracy by epoch: 0.1000, 0.2000, 0.3000, 0.9000" in lines
    assert json.loads(hpo("status", "--trial", "4", "--json", "--storage", journal).stdout)["curve"] == [0.1, 0.2, 0.3, 0.9]


def test_json_output_writes_a_nan_or_infinite_value_as_null():
    from hpo import cli

    text = cli._json({"curve": [float("nan"), 0.5, float("inf")], "values": (float("-inf"),), "n": 3})
    assert json.loads(text) == {"curve": [None, 0.5, None], "values": [None], "n": 3}


def test_reading_a_study_imports_no_torch(journal):
    # torch takes a second or two to import: `hpo status` and the other readers do without it.
    code = f"import sys; from hpo import cli; code = cli.main(['status', '--storage', {journal!r}]); print(code, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stderr


def test_best_and_studies_json(journal):
    best = json.loads(hpo("best", "--json", "--storage", journal).stdout)
    assert best[0]["number"] == 4
    studies = json.loads(hpo("studies", "--json", "--storage", journal).stdout)
    assert studies == [{"study": "hand", "trials": 8, "directions": ["maximize"], "best": [0.9]}]


def test_status_watch_stops_by_itself_once_the_study_is_done(journal):
    proc = hpo("status", "--watch", "--interval", "0.1", "--storage", journal, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.count("study hand:") == 1 and "study done" in proc.stdout


def _running(number: int, steps: list[float], worker: str) -> FrozenTrial:
    start = datetime.datetime.now() - datetime.timedelta(seconds=30)
    return FrozenTrial(number=number, state=TrialState.RUNNING, value=None, datetime_start=start, datetime_complete=None,
                       params={}, distributions={}, user_attrs={"hpo:worker": worker}, system_attrs={},
                       intermediate_values=dict(enumerate(steps)), trial_id=number)


def test_live_view_shows_running_trials_with_epoch_and_latest_metric(tmp_path):
    storage = open_storage(str(tmp_path / "live.journal"))
    created = coordinator.create(load_config(str(write_yaml(tmp_path, "live", n_trials=20))), storage)
    # Trial 9 failed and was re-queued as 10: as the text view counts, 9 is not a finished trial.
    failed, retry = _running(9, [0.2], "w2"), _running(10, [], "w2")
    failed.state, failed.datetime_complete = TrialState.FAIL, datetime.datetime.now()
    retry.state, retry.datetime_start, retry.user_attrs = TrialState.WAITING, None, {heartbeat.RETRY_OF: 9}
    created.study.add_trials(hand_trials() + [_running(8, [0.3, 0.45], "w3"), failed, retry])
    study, config = coordinator.load("live", storage)
    snap = live.snapshot(study, config)
    assert snap["finished"] == 8 and snap["counts"]["requeued"] == 1
    assert snap["running"] == [{"number": 8, "worker": "w3", "epoch": 1, "latest": 0.45, "seconds": pytest.approx(30, abs=5)}]
    assert snap["done"] is False
    out = io.StringIO()
    live.watch(lambda: live.snapshot(study, config), interval=0, out=out, max_frames=2)
    frames = out.getvalue()
    assert frames.count("study live: 8/20 trials finished") == 2
    assert "#8    w3: epoch 1, val_accuracy 0.4500" in frames
    assert "best so far: trial #4: val_accuracy 0.9000" in frames


def test_a_study_is_done_when_its_budget_is_spent_though_a_trial_is_still_queued(tmp_path):
    # A retry queued once the budget had been spent (workers stop asking then) never runs: a
    # watch that waited for it would never end.
    storage = open_storage(str(tmp_path / "queued.journal"))
    created = coordinator.create(load_config(str(write_yaml(tmp_path, "queued", n_trials=8))), storage)
    created.study.add_trials(hand_trials())
    study, config = coordinator.load("queued", storage)
    assert live.snapshot(study, config)["done"] is True
    study.enqueue_trial({"lr": 0.05})
    snap = live.snapshot(study, config)
    assert snap["counts"]["WAITING"] == 1 and snap["done"] is True
    # With the budget not spent, the queued trial is still to run.
    config = dataclasses.replace(config, study=dataclasses.replace(config.study, n_trials=9))
    assert live.snapshot(study, config)["done"] is False


def test_status_never_shows_a_storage_password():
    url = "redis://:s3cret-pw@127.0.0.1:1/0"
    proc = hpo("status", "--json", "--storage", url)
    assert proc.returncode == 2 and "s3cret-pw" not in proc.stdout + proc.stderr

