"""One worker's life: failures are recorded and survived, seeds differ, signals leave nothing running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import hpo
from optuna.trial import TrialState

import trainers
from hpo import coordinator, worker
from hpo.config import load_config
from hpo.storage import open_storage

BOOM = "boom from the user's factory: shape [batch, 3] in [/fc]"
TASK = '''
import math, time
import torch
from torch import nn

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return x[:192], y[:192], x[192:], y[192:]

class Net(nn.Module):
    def __init__(self, params):
        super().__init__()
        self.params = params
        self.lin = nn.Linear(8, 2)
    def forward(self, x):
        if self.params.get("slow"):
            time.sleep(0.2)
        out = self.lin(x)
        return out * math.nan if self.params.get("mode") == "nan" else out

def model(params):
    if params.get("mode") == "boom":
        raise ValueError("boom from the user's factory: shape [batch, 3] in [/fc]")
    return Net(params)
'''


def write_study(tmp_path: Path, name: str, space: dict, *, n_trials: int = 4, baseline: list | None = None,
                trainer: dict | None = None, **study) -> Path:
    (tmp_path / "usertask.py").write_text(TASK)
    raw = {
        "study": {"name": name, "direction": "maximize", "metric": "val_accuracy", "n_trials": n_trials, "seed": 7, "sampler": "random", "pruner": "none", **study},
        "trainer": trainer or {"epochs": 2, "batch_size": 32},
        "task": {"model": "usertask:model", "data": "usertask:data"},
        "space": space,
    }
    if baseline:
        raw["baseline"] = baseline
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def created(path: Path, url: str) -> optuna.Study:
    return coordinator.create(load_config(str(path)), open_storage(url)).study


def test_user_exception_and_nan_loss_fail_the_trial_with_a_reason_and_the_worker_goes_on(tmp_path: Path) -> None:
    path = write_study(
        tmp_path, "failures",
        {"mode": {"type": "categorical", "choices": ["ok", "boom", "nan"]}},
        n_trials=3, baseline=[{"mode": "boom"}, {"mode": "nan"}, {"mode": "ok"}],
    )
    url = str(tmp_path / "h.journal")
    study = created(path, url)
    summary = worker.run_worker("failures", url, index=0)
    trials = {t.params["mode"]: t for t in study.get_trials()}
    assert summary.states == {"FAIL": 2, "COMPLETE": 1}
    assert trials["boom"].state == TrialState.FAIL
    assert trials["boom"].user_attrs["hpo:fail_reason"] == "ValueError: " + BOOM
    assert "Traceback" in trials["boom"].user_attrs["hpo:traceback"]
    assert trials["nan"].state == TrialState.FAIL
    assert trials["nan"].user_attrs["hpo:fail_reason"].startswith("NonFiniteLossError: training loss is nan at epoch 0")
    assert trials["ok"].state == TrialState.COMPLETE


def test_workers_seed_their_samplers_differently_and_record_it(tmp_path: Path) -> None:
    path = write_study(tmp_path, "seeds", {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}}, n_trials=4)
    url = str(tmp_path / "h.journal")
    study = created(path, url)
    for index in (0, 1):
        # One trial each: a worker stops when the budget is spent, so cap it through the config.
        worker.run_worker("seeds", url, index=index)
        if index == 0:
            assert len(study.get_trials()) == 4
    by_seed: dict[int, list[float]] = {}
    for t in study.get_trials():
        by_seed.setdefault(t.user_attrs["hpo:seeds"]["sampler"], []).append(t.params["lr"])
        assert t.user_attrs["hpo:seeds"] == {"sampler": 7}
    assert list(by_seed) == [7]  # worker 0 did all four: study seed 7 + index 0
    assert worker.sampler_seed(7, 1, "h:1") == 8
    assert worker.sampler_seed(7, None, "hostA:100") != worker.sampler_seed(7, None, "hostB:100")


def test_two_workers_with_the_same_study_seed_propose_different_params(tmp_path: Path) -> None:
    path = write_study(tmp_path, "distinct", {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}}, n_trials=2)
    url = str(tmp_path / "h.journal")
    created(path, url)
    storage = open_storage(url)
    _, config = coordinator.load("distinct", storage)
    from hpo import samplers

    proposals = []
    for index in (0, 1):
        sampler = samplers.build_sampler(config.study.sampler, {}, worker.sampler_seed(7, index, "x"), config.space)
        study = optuna.load_study(study_name="distinct", storage=storage, sampler=sampler)
        trial = study.ask()
        proposals.append(trial.suggest_float("lr", 1e-3, 1e-1, log=True))
        study.tell(trial, 0.0)
    assert proposals[0] != proposals[1]


RACER = """
import sys
from hpo import coordinator
name, url = sys.argv[1], sys.argv[2]
study, config = coordinator.open_study(url, name)
while True:
    asked, _ = coordinator.ask(study, config)
    if not asked:
        break
    study.tell(asked[0], 0.0)
"""


@pytest.mark.parametrize("kind", ["file", "sqlite", "redis", "postgres", "mysql"])
def test_workers_racing_for_the_last_trials_never_overrun_the_budget(tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> None:
    url = {"file": lambda: str(tmp_path / "h.journal"), "sqlite": lambda: f"sqlite:///{tmp_path / 'h.db'}",
           "redis": lambda: request.getfixturevalue("redis_url"), "postgres": lambda: request.getfixturevalue("postgres_url"),
           "mysql": lambda: request.getfixturevalue("mysql_url")}[kind]()
    name = f"race-{kind}-{tmp_path.name}"
    path = write_study(tmp_path, name, {"lr": {"type": "float", "low": 1e-3, "high": 1e-1}}, n_trials=20)
    created(path, url)
    # Four processes that do nothing but ask and tell: the tightest race there is.
    racers = [subprocess.Popen([sys.executable, "-c", RACER, name, url], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
              for _ in range(4)]
    for racer in racers:
        assert racer.wait(timeout=120) == 0, racer.stderr.read()
    trials = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()
    assert [t.number for t in trials] == list(range(20))
    assert {t.state for t in trials} == {TrialState.COMPLETE}


def test_ask_gives_no_more_trials_than_the_budget_has_room_for(tmp_path: Path) -> None:
    path = write_study(tmp_path, "room", {"lr": {"type": "float", "low": 1e-3, "high": 1e-1}}, n_trials=4, baseline=[{"lr": 0.01}])
    url = str(tmp_path / "h.journal")
    study = created(path, url)
    _, config = coordinator.load("room", open_storage(url))
    first, seen = coordinator.ask(study, config, n=3)
    assert [t.number for t in first] == [0, 1, 2] and seen[0].state == TrialState.WAITING  # the baseline goes first
    assert study._storage.get_trial(first[0]._trial_id).system_attrs["fixed_params"] == {"lr": 0.01}
    rest, _ = coordinator.ask(study, config, n=3)
    assert [t.number for t in rest] == [3]
    assert coordinator.ask(study, config) == ([], study.get_trials(deepcopy=False))


def test_study_timeout_ends_the_worker(tmp_path: Path) -> None:
    path = write_study(tmp_path, "timeout", {"slow": True, "lr": {"type": "float", "low": 1e-3, "high": 1e-1}}, n_trials=None, timeout=1)
    url = str(tmp_path / "h.journal")
    study = created(path, url)
    summary = worker.run_worker("timeout", url, index=0)
    assert 1 <= sum(summary.states.values()) <= 3
    assert all(t.state.is_finished() for t in study.get_trials())


def test_ctrl_c_before_a_command_or_a_worker_started_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    # Where Ctrl-C lands in the first second: building the parser (it imports Optuna), and an
    # `hpo run --jobs J` child importing torch. No traceback from either.
    from hpo import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_parser", interrupted)
    assert cli.main(["status"]) == 130
    assert capsys.readouterr().err == "hpo: interrupted\n"
    monkeypatch.setattr(worker, "run_worker", interrupted)
    with pytest.raises(SystemExit) as stopped:
        cli._child_worker("s", "x.journal", 1, 1)
    assert stopped.value.code == 130


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_stops_the_worker_and_requeues_its_trial(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    path = write_study(tmp_path, "signals", {"slow": True, "lr": {"type": "float", "low": 1e-3, "high": 1e-1}}, n_trials=3)
    url = str(tmp_path / "h.journal")
    study = created(path, url)
    proc = subprocess.Popen([sys.executable, "-m", "hpo", "worker", "--study", "signals", "--storage", url], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(t.state == TrialState.RUNNING and t.params for t in study.get_trials()):
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 1
    assert stopped[0].user_attrs["hpo:fail_reason"].startswith(f"interrupted by {sig.name}")
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs["hpo:retry_of"] == stopped[0].number
    # The re-queued trial runs with the same params and the interrupted one does not count.
    worker.run_worker("signals", url, index=1)
    trials = study.get_trials()
    assert trials[waiting[0].number].params == stopped[0].params
    assert len(coordinator.counted(trials)) == 3


def test_sigterm_hands_back_the_trial_asked_ahead_too(tmp_path: Path) -> None:
    path = write_study(tmp_path, "ahead", {"slow": True, "lr": {"type": "float", "low": 1e-3, "high": 1e-1}}, n_trials=4, ask_ahead=True)
    url = str(tmp_path / "h.journal")
    study = created(path, url)
    proc = subprocess.Popen([sys.executable, "-m", "hpo", "worker", "--study", "ahead", "--storage", url], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    # The trial that trains and the next one, asked and sampled while it does.
    while time.time() < deadline and len([t for t in study.get_trials() if t.state == TrialState.RUNNING and t.params]) < 2:
        time.sleep(0.05)
    running = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert len(running) == 2 and all(t.params for t in running)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.number for t in failed) == sorted(t.number for t in running)
    assert all(t.user_attrs["hpo:fail_reason"].startswith("interrupted by SIGTERM") for t in failed)
    waiting = {t.user_attrs["hpo:retry_of"]: t for t in trials if t.state == TrialState.WAITING}
    assert sorted(waiting) == sorted(t.number for t in failed)
    # Both go back with their params; a later worker runs them and the study ends on budget.
    worker.run_worker("ahead", url, index=1)
    trials = study.get_trials()
    for t in failed:
        assert trials[waiting[t.number].number].params == t.params
        assert trials[waiting[t.number].number].state == TrialState.COMPLETE
    assert len(coordinator.counted(trials)) == 4
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_ask_ahead_is_on_for_server_storages_and_off_for_a_journal_file(tmp_path: Path, redis_url: str) -> None:
    path = write_study(tmp_path, "defaults", {"lr": {"type": "float", "low": 1e-3, "high": 1e-1}})
    config = load_config(str(path))
    assert worker.asks_ahead(config, open_storage(redis_url))
    assert worker.asks_ahead(config, open_storage(f"sqlite:///{tmp_path / 'h.db'}"))
    assert not worker.asks_ahead(config, open_storage(str(tmp_path / "h.journal")))
    forced = load_config(str(write_study(tmp_path, "forced", {"lr": {"type": "float", "low": 1e-3, "high": 1e-1}}, ask_ahead=True)))
    assert worker.asks_ahead(forced, open_storage(str(tmp_path / "h.journal")))


def test_a_seeded_worker_on_a_journal_file_proposes_the_same_trials_every_run(tmp_path: Path) -> None:
    params = []
    for run in range(2):
        directory = tmp_path / f"run{run}"
        directory.mkdir()
        # TPE past its random start-up trials: its proposals depend on every result told before.
        path = write_study(directory, "same", {"lr": {"type": "float", "low": 1e-3, "high": 1e-1}}, n_trials=6,
                           sampler={"name": "tpe", "options": {"n_startup_trials": 2}})
        url = str(directory / "h.journal")
        study = created(path, url)
        worker.run_worker("same", url, index=0)
        params.append([t.params for t in study.get_trials()])
    assert params[0] == params[1]


def test_a_worker_waits_for_other_workers_trials_before_it_leaves(tmp_path: Path) -> None:
    path = write_study(tmp_path, "wait", {"lr": {"type": "float", "low": 1e-3, "high": 1e-1}}, n_trials=2, heartbeat_interval=1, grace_period=3)
    url = str(tmp_path / "h.journal")
    study = created(path, url)
    config = load_config(str(path))
    # A dead worker's trial: running, and its worker's last beat long ago.
    lost = study.ask()
    lost.suggest_float("lr", 1e-3, 1e-1)
    lost.set_user_attr("hpo:worker", "dead-host:1")
    trials = study.get_trials()
    assert coordinator.others_may_requeue(config, trials, "me:2")
    assert not coordinator.others_may_requeue(config, trials, "dead-host:1")
    # The live worker runs its own trial, finds the budget spent, sweeps the dead one's trial
    # after the grace period, runs its retry, and only then leaves.
    summary = worker.run_worker("wait", url, index=0)
    trials = study.get_trials()
    assert summary.states == {"COMPLETE": 2}
    assert trials[lost.number].state == TrialState.FAIL
    own, retry = [t for t in trials if t.state == TrialState.COMPLETE]
    assert (own.user_attrs.get("hpo:retry_of"), retry.user_attrs.get("hpo:retry_of")) == (None, lost.number)
    # The lost trial was swept after the worker's own trial had ended: the worker waited for it.
    assert trials[lost.number].datetime_complete > own.datetime_complete
    assert len(coordinator.counted(trials)) == 2


def test_existing_study_with_another_config_is_refused_unless_asked(tmp_path: Path) -> None:
    url = str(tmp_path / "h.journal")
    path = write_study(tmp_path, "twice", {"lr": {"type": "float", "low": 1e-3, "high": 1e-1}})
    assert hpo("create", str(path), "--storage", url, cwd=tmp_path).returncode == 0
    assert hpo("create", str(path), "--storage", url, cwd=tmp_path).returncode == 0  # same config: fine
    changed = write_study(tmp_path, "twice", {"lr": {"type": "float", "low": 1e-4, "high": 1e-1}})
    refused = hpo("create", str(changed), "--storage", url, cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "hpo: error: study 'twice' already exists with a different config; use --resume to continue it with this file, or --overwrite to start over"
    assert hpo("create", str(changed), "--storage", url, "--resume", cwd=tmp_path).returncode == 0
    assert load_config(str(changed)).fingerprint() == coordinator.load("twice", open_storage(url))[1].fingerprint()
    assert hpo("create", str(changed), "--storage", url, "--overwrite", cwd=tmp_path).returncode == 0


def test_a_stored_config_that_no_longer_validates_can_be_replaced(tmp_path: Path) -> None:
    # Stored by an hpo that checked less (here a seed torch refuses): this file resumes or overwrites it.
    config = load_config(str(write_study(tmp_path, "old", {"lr": {"type": "float", "low": 1e-3, "high": 1e-1}})))
    storage = open_storage(str(tmp_path / "h.journal"))
    created = coordinator.create(config, storage)
    refused = {**config.raw, "study": {**config.raw["study"], "seed": 2**64}}
    created.study.set_user_attr(coordinator.CONFIG_ATTR, refused)
    with pytest.raises(coordinator.StudyError, match="already exists with a different config"):
        coordinator.create(config, storage)
    assert coordinator.create(config, storage, on_exists="resume").resumed
    created.study.set_user_attr(coordinator.CONFIG_ATTR, refused)
    assert not coordinator.create(config, storage, on_exists="overwrite").resumed


def test_unknown_study_is_one_line(tmp_path: Path) -> None:
    url = str(tmp_path / "h.journal")
    write = write_study(tmp_path, "known", {"lr": 0.1, "x": {"type": "int", "low": 1, "high": 2}})
    assert hpo("create", str(write), "--storage", url).returncode == 0
    result = hpo("worker", "--study", "unknwn", "--storage", url)
    assert result.returncode == 2
    assert result.stderr == "hpo: error: no study named 'unknwn' (studies here: known)\n"


def test_a_worker_without_the_studys_device_says_so_in_one_line_before_asking_for_trials(tmp_path: Path) -> None:
    url = str(tmp_path / "h.journal")
    write = write_study(tmp_path, "gpu", {"lr": 0.1, "x": {"type": "int", "low": 1, "high": 2}},
                        trainer={"epochs": 2, "device": "cuda:63"})
    assert hpo("create", str(write), "--storage", url, cwd=tmp_path).returncode == 0
    result = hpo("worker", "--study", "gpu", "--storage", url, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    # On this machine CUDA is missing; on one with fewer than 64 GPUs, that GPU is.
    assert result.stderr.startswith("hpo: error: study gpu: trainer.device: device 'cuda:63' was asked for, but ")
    assert result.stderr.count("\n") == 1
    assert optuna.load_study(study_name="gpu", storage=open_storage(url)).trials == []  # none failed for it


def test_hpo_run_without_the_device_says_so_in_one_line_before_making_the_study(tmp_path: Path) -> None:
    write = write_study(tmp_path, "gpu", {"lr": 0.1, "x": {"type": "int", "low": 1, "high": 2}},
                        trainer={"epochs": 2, "device": "cuda:63"})
    result = hpo("run", str(write), "--jobs", "2", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith("hpo: error: study gpu: trainer.device: device 'cuda:63' was asked for, but ")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "hpo.journal").exists()


def test_a_cuda_device_past_those_the_process_sees_is_refused(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert trainers.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(RuntimeError, match=r"this process sees 2 CUDA devices \(cuda:0 to cuda:1\)"):
        trainers.resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match=r"sees 1 CUDA device \(cuda:0\)"):
        trainers.resolve_device("cuda:1")
    # A worker that `hpo worker --gpus` pinned to one GPU: the hint says how to name it.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    config = load_config(write_study(tmp_path, "pinned", {"lr": 0.1}, trainer={"epochs": 1, "device": "cuda:1"}))
    with pytest.raises(coordinator.StudyError, match=r"^study pinned: trainer.device: device 'cuda:1' was asked for, but "
                       r"this process sees 1 CUDA device \(cuda:0\) \(CUDA_VISIBLE_DEVICES=3: .*say device: cuda\)$"):
        worker.check_device(config)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # NVML and the runtime disagreeing
    with pytest.raises(RuntimeError, match=r"sees no CUDA device$"):
        trainers.resolve_device("cuda:0")


def test_a_run_whose_extra_worker_stops_on_an_error_says_so_in_its_exit_code(tmp_path: Path) -> None:
    write = write_study(tmp_path, "halfway", {"lr": 0.1, "x": {"type": "int", "low": 1, "high": 2}})
    # The task imports in the main process only: the --jobs worker process stops at its start.
    task = (tmp_path / "usertask.py").read_text()
    (tmp_path / "usertask.py").write_text(
        "import multiprocessing\nif multiprocessing.current_process().name != 'MainProcess':\n"
        "    raise ImportError('not in a worker process')\n" + task)
    result = hpo("run", str(write), "--jobs", "2", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("hpo: error: ") and "not in a worker process" in lines[0]
    assert lines[-1] == "hpo: error: worker 1 of 2 stopped with exit code 2 (its error is above)"
    study = optuna.load_study(study_name="halfway", storage=open_storage(str(tmp_path / "hpo.journal")))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4  # the main process's worker ran them


def test_a_mistyped_journal_path_is_one_line_and_makes_no_file(tmp_path: Path) -> None:
    url = str(tmp_path / "typo.journal")
    for command in (["status"], ["studies"], ["worker", "--study", "s"]):
        result = hpo(*command, "--storage", url, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (2, f"hpo: error: no journal file {url} (hpo run or hpo create makes one; "
                                                         "elsewhere, say --storage)\n"), command
    assert not (tmp_path / "typo.journal").exists()
    write = write_study(tmp_path, "known", {"lr": 0.1})
    assert hpo("create", str(write), "--storage", url).returncode == 0  # a study is created where none was
    optuna.delete_study(study_name="known", storage=open_storage(url))
    assert hpo("studies", "--storage", url).stdout == f"no studies in {url}\n"


def test_task_code_is_found_beside_the_study_file_from_any_working_directory(tmp_path: Path) -> None:
    project = tmp_path / "elsewhere"
    project.mkdir()
    path = write_study(project, "outside", {"lr": {"type": "float", "low": 1e-3, "high": 1e-1}}, n_trials=2)
    result = hpo("run", str(path), "--storage", str(tmp_path / "h.journal"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "best: trial #" in result.stdout
    assert textwrap.dedent("study outside: 2/2 trials") in result.stdout



def test_the_console_script_finds_a_task_in_the_working_directory_also_under_a_supervisor(tmp_path: Path) -> None:
    # `python -m hpo` puts the working directory on sys.path; the installed `hpo` script does not.
    script = Path(sys.executable).with_name("hpo")
    assert script.exists(), "the package's console script (pip install -e .)"
    path = write_study(tmp_path, "here", {"lr": 0.1}, n_trials=2)
    url = str(tmp_path / "h.journal")
    assert hpo("create", str(path), "--storage", url, cwd=tmp_path).returncode == 0
    for extra in ([], ["--jobs", "1"]):
        result = subprocess.run([str(script), "worker", "--study", "here", "--storage", url, *extra],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert len([t for t in optuna.load_study(study_name="here", storage=open_storage(url)).trials if t.state.is_finished()]) == 2


def test_hpo_run_exits_1_when_none_of_its_own_trials_completed(tmp_path: Path) -> None:
    url = str(tmp_path / "h.journal")

    def run(mode: str, n_trials: int, *extra: str) -> subprocess.CompletedProcess:
        path = write_study(tmp_path, "runs", {"mode": mode}, n_trials=n_trials)
        return hpo("run", str(path), "--storage", url, "--resume", *extra, cwd=tmp_path)

    first = run("ok", 1, "--jobs", "4")  # more workers than trials: the others would only wait
    assert first.returncode == 0 and " pruner, 1 worker(s) x 1 thread(s)" in first.stdout, first.stdout
    failing = run("boom", 3)  # the study has a completed trial, from the run before
    assert failing.returncode == 1, failing.stderr
    assert f"raise ValueError(\"{BOOM}\")" in failing.stderr  # the traceback
    # The trial's line as the error says it: brackets are text, not markup; one line, not wrapped.
    assert f"\ntrial    1 fail  ValueError: {BOOM}\n" in failing.stdout, failing.stdout
    assert failing.stderr.rstrip().endswith("hpo: error: no trial of this run completed: every one failed (trial 1 above; "
                                            "any trial: hpo status --study runs --storage URL --trial N)")

    # Looking at a study needs none of the task's code: read from where it does not import.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    one = hpo("status", "--trial", "2", "--storage", url, cwd=elsewhere)
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith(f"trial    2 fail  ValueError: {BOOM}\n  mode: boom\n")
    assert "usertask.py\", line 25, in model" in one.stdout
    record = json.loads(hpo("status", "--trial", "2", "--json", "--storage", url, cwd=elsewhere).stdout)
    assert record["state"] == "fail" and record["reason"] == "ValueError: " + BOOM and record["traceback"]
    missing = hpo("status", "--trial", "7", "--storage", url, cwd=elsewhere)
    assert (missing.returncode, missing.stderr) == (2, "hpo: error: study runs has no trial 7 (trials 0-2)\n")

    assert run("ok", 4).returncode == 0  # failures of earlier runs are not this one's


def test_hpo_worker_exits_1_when_every_trial_it_ran_failed(tmp_path: Path) -> None:
    # So that a Slurm array task or a Kubernetes Job shows the failure; a worker with one trial to
    # show for itself exits 0 (its failures are the study's business: `hpo status`).
    url = str(tmp_path / "h.journal")
    created(write_study(tmp_path, "failing", {"mode": "boom"}, n_trials=2), url)
    failing = hpo("worker", "--study", "failing", "--storage", url, cwd=tmp_path)
    assert failing.returncode == 1, failing.stderr
    assert failing.stderr.rstrip().endswith(
        "hpo: error: every trial this worker ran failed; why: hpo status --study failing --storage URL --trial 0")
    assert "done: 2 fail" in failing.stdout
    created(write_study(tmp_path, "fine", {"mode": "ok"}, n_trials=1), url)
    fine = hpo("worker", "--study", "fine", "--storage", url, cwd=tmp_path)
    assert fine.returncode == 0, fine.stderr


def test_signals_wait_for_a_safe_point_and_a_second_ctrl_c_stops_at_once() -> None:
    signals = worker.Signals()
    previous = signals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # noted, not raised: a storage call may be in flight
        assert signals.name == "SIGTERM"
        with pytest.raises(worker.Interrupted) as stopped:
            signals.on_batch_end(None)  # the next batch boundary acts on it
        assert stopped.value.signal_name == "SIGTERM"
        signals.name = None
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode boundary
    finally:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)


def test_status_lists_every_trial_a_population_worker_holds(tmp_path: Path) -> None:
    from hpo import coordinator, heartbeat
    from hpo.report import status_text

    path = write_study(tmp_path, "held", {"lr": {"type": "float", "low": 1e-3, "high": 1e-1}})
    study = created(path, str(tmp_path / "h.journal"))
    config = load_config(str(path))
    heartbeat.Heartbeat(study, "w0", 30, 120, 2).beat()
    held, _ = coordinator.ask(study, config, 2, {"hpo:worker": "w0"})
    assert [t.user_attrs["hpo:worker"] for t in held] == ["w0", "w0"]
    assert "w0: running #0, #1, heartbeat" in status_text(study, config)
    study.tell(held[0], 0.5)
    assert "w0: running #1, heartbeat" in status_text(study, config)


def test_trial_seeding_leaves_torch_as_manual_seed_does() -> None:
    import torch

    from hpo.objective import seed_torch

    seed_torch(5)
    ours = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(ours, torch.rand(4))
