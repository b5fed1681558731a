"""The launch recipes in scripts/launch: the ssh launcher, really run against three 'hosts' (network
namespaces, each with its own sshd) whose workers reach Redis at one shared address; the Redis
config, really started; the Slurm script and the Kubernetes manifest, checked for syntax.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import pytest
import yaml
from conftest import ROOT, SHARED_STUDY, _free_port, _missing, _wait_port, hpo, study_file
from netns import Host, Relay, in_ns, namespaces, shared_address, url_at
from optuna.trial import TrialState

from hpo.storage import open_storage

LAUNCH = ROOT / "scripts" / "launch"
SSH_WORKERS = LAUNCH / "ssh_workers.sh"
STRIDE = 100  # ssh_workers.sh's default --index-stride: host k's workers are numbered from k*100


def test_kubernetes_job_manifest() -> None:
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all((LAUNCH / "k8s_job.yaml").read_text())}
    job = docs["Job"]["spec"]
    assert job["parallelism"] == job["completions"] >= 1
    pod = job["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in worker["env"]}
    assert "secretKeyRef" in env["HPO_STORAGE"]["valueFrom"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert any(m["name"] in claims for m in worker["volumeMounts"])
    assert docs["PersistentVolumeClaim"]["metadata"]["name"] in claims.values()
    assert "ReadWriteMany" in docs["PersistentVolumeClaim"]["spec"]["accessModes"]


def test_shell_scripts_parse_and_pass_shellcheck() -> None:
    scripts = [SSH_WORKERS, LAUNCH / "slurm_array.sbatch"]
    for script in scripts:
        checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
    if shutil.which("shellcheck"):
        checked = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout
    assert "--worker-index" in hpo("worker", "--help").stdout  # the Slurm and Kubernetes recipes use it


def test_redis_conf_starts_a_persistent_server(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server")
    import redis

    port = _free_port()
    # The file as shipped; only where it listens and keeps its files are this test's own.
    server = subprocess.Popen([binary, str(LAUNCH / "redis.conf"), "--port", str(port), "--bind", "127.0.0.1",
                               "--dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_port(port), server.stdout.read() if server.poll() is not None else "no answer"
        client = redis.Redis(port=port)
        settings = {key: client.config_get(key)[key] for key in ("appendonly", "appendfsync", "maxmemory-policy")}
        assert settings == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}
        client.set("hpo-probe", "1")
        assert any(tmp_path.rglob("*.aof"))
    finally:
        server.kill()
        server.wait()


def test_ssh_launcher_never_prints_the_password(tmp_path: Path) -> None:
    # Nothing listens at the port: ssh fails, and the launcher's output is all there is to read.
    closed = _free_port()
    run = subprocess.run(
        ["bash", str(SSH_WORKERS), "start", "--study", "s", "--ssh-opts", f"-F /dev/null -p {closed} -o ConnectTimeout=5",
         "127.0.0.1"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "HPO_STORAGE": "redis://:s3cret-pw@127.0.0.1:6379/0?password=s3cret-pw"},
    )
    assert run.returncode != 0
    assert "s3cret" not in run.stdout + run.stderr
    assert "redis://:***@127.0.0.1:6379/0?password=***" in run.stdout
    assert "127.0.0.1: failed" in run.stderr


def test_supervised_workers_get_the_storage_url_outside_their_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpo import supervisor

    started = []
    monkeypatch.setattr(supervisor.subprocess, "Popen", lambda command, env: started.append((command, env)))
    supervisor._start(supervisor.Slot(0, "1"), "s", "redis://:s3cret-pw@cache:6379/0", 100, 2)
    ((command, env),) = started
    assert not any("s3cret" in arg for arg in command)
    assert env["HPO_STORAGE"] == "redis://:s3cret-pw@cache:6379/0" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert command[-4:] == ["--worker-index", "100", "--threads", "2"]


def _workers_exiting_with(code: int | list[int], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Makes `supervise` start workers that exit at once with `code` (or with each of a list's codes
    in turn, from one start to the next); returns the list of slots started."""
    from hpo import supervisor

    started: list[int] = []
    codes = iter(code) if isinstance(code, list) else None

    def start(slot, *args) -> None:
        started.append(slot.index)
        slot.process = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({next(codes) if codes else code})"])

    monkeypatch.setattr(supervisor, "_start", start)
    return started


def test_gpu_numbers_count_the_gpus_this_process_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpo import supervisor

    # Under Slurm with GPUs 2 and 5 allocated: GPU 0 and 1 are those, never the machine's 0 and 1.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert [(s.index, s.device) for s in supervisor.slots("all", 2, None)] == [(0, "2"), (1, "2"), (2, "5"), (3, "5")]
    assert [s.device for s in supervisor.slots("1", 1, None)] == ["5"]
    with pytest.raises(supervisor.SupervisorError, match=r"^--gpus 0,2: no GPU 2 here \(GPUs 0-1 visible in CUDA_VISIBLE_DEVICES=2,5;"):
        supervisor.slots("0,2", 1, None)
    # CUDA counts up to an entry that names no GPU: "-1" hides them all.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(supervisor.SupervisorError, match=r"^--gpus all: no GPU is visible here"):
        supervisor.slots("all", 1, None)
    # Without it, torch's count (none on a CPU machine): a typo'd GPU is an error, not a CPU worker.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(supervisor.SupervisorError, match=r"^--gpus 0: no GPU 0 here \(no GPU visible; --jobs J for CPU workers\)$"):
        supervisor.slots("0", 1, None)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert [s.device for s in supervisor.slots("3,1", 1, None)] == ["3", "1"]
    with pytest.raises(supervisor.SupervisorError, match=r"^--per-gpu 2 packs workers on the GPUs that --gpus names"):
        supervisor.slots(None, 2, None)


def test_supervisor_does_not_restart_a_worker_that_reported_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpo import supervisor

    started = _workers_exiting_with(2, monkeypatch)
    assert supervisor.supervise("s", "redis://x", supervisor.slots(None, 1, 2)) == 2
    assert sorted(started) == [0, 1]


def test_supervisor_restarts_a_worker_that_exits_2_after_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    # Started again after a crash, a worker may find the storage restarting: passing, not a usage error.
    from hpo import supervisor

    started = _workers_exiting_with([3, 2, 0], monkeypatch)
    assert supervisor.supervise("s", "redis://x", supervisor.slots(None, 1, 1)) == 0
    assert started == [0, 0, 0]


def test_supervisor_gives_up_on_a_crashing_worker_and_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpo import supervisor

    started = _workers_exiting_with(3, monkeypatch)
    assert supervisor.supervise("s", "redis://x", supervisor.slots(None, 1, 1), max_restarts=2) == 3
    assert started == [0, 0, 0]


def test_supervisor_names_an_unknown_study_once_and_starts_no_worker(redis_url: str) -> None:
    result = hpo("worker", "--study", "no-such-study", "--storage", redis_url, "--jobs", "2", timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("hpo: error: no study named 'no-such-study'") == 1, result.stderr
    assert "joining" not in result.stdout and "restarting" not in result.stderr


# ---- the launcher against three namespace hosts, each running sshd ----

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@pytest.fixture
def ssh_hosts(tmp_path: Path) -> Iterator[tuple[list[Host], dict[str, str]]]:
    """Three hosts with an sshd each (root, key only); yields them and the env that lets
    ssh_workers.sh log in to them (HPO_SSH_OPTS)."""
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        _missing("OpenSSH (sshd at /usr/sbin/sshd, ssh, ssh-keygen: apt-get install -y openssh-server)")
    keys = tmp_path / "ssh"
    keys.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / key)], check=True)
    shutil.copy(keys / "client_key.pub", keys / "authorized_keys")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    daemons: list[subprocess.Popen] = []
    with namespaces(3) as hosts:
        try:
            for i, host in enumerate(hosts):
                config = keys / f"sshd_{i}.conf"
                config.write_text("\n".join([
                    f"ListenAddress {host.inside}",
                    f"HostKey {keys / 'host_key'}",
                    f"AuthorizedKeysFile {keys / 'authorized_keys'}",
                    f"PidFile {keys / f'sshd_{i}.pid'}",
                    "PermitRootLogin yes", "StrictModes no", "UsePAM no",
                    "PasswordAuthentication no", "KbdInteractiveAuthentication no", "",
                ]))
                daemons.append(subprocess.Popen(in_ns(host.ns, SSHD, "-D", "-e", "-f", str(config)),
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for host, daemon in zip(hosts, daemons):
                if not _reachable(host.inside, 22):
                    daemon.kill()
                    pytest.fail(f"sshd in {host.ns} did not start: {daemon.communicate()[1]}")
            opts = (f"-F /dev/null -i {keys / 'client_key'} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
                    "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=10")
            yield hosts, {**os.environ, "HPO_SSH_OPTS": opts}
        finally:
            for daemon in daemons:
                daemon.kill()
                daemon.wait()


def _reachable(address: str, port: int, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((address, port)) == 0:
                return True
        time.sleep(0.1)
    return False


def _processes_of(study: str) -> list[int]:
    """Live (not zombie) processes whose command line names the study: its workers and supervisors."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and study.encode() in args and b"worker" in args:
            found.append(int(entry.name))
    return found


def _launch(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SSH_WORKERS), *args], capture_output=True, text=True, env=env, timeout=timeout)


def _host_of(trial: optuna.trial.FrozenTrial) -> int:
    """Which host ran the trial: hpo:worker is host:pid/index, and the launcher numbers host k's
    workers from k*STRIDE (the host name itself is the same in every namespace)."""
    return int(trial.user_attrs["hpo:worker"].rpartition("/")[2]) // STRIDE


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.e2e
def test_ssh_launcher_runs_and_stops_workers_on_three_hosts(
        tmp_path: Path, ssh_hosts: tuple[list[Host], dict[str, str]], redis_url: str) -> None:
    hosts, env = ssh_hosts
    parts = urlsplit(redis_url)
    done_study, stop_study = "launch-ssh", "launch-ssh-stop"
    for name, changes in ((done_study, SHARED_STUDY), (stop_study, {**SHARED_STUDY, "study": {**SHARED_STUDY["study"], "n_trials": 500}})):
        assert hpo("create", str(study_file(tmp_path, name, **changes)), "--storage", redis_url, cwd=tmp_path).returncode == 0
    # One server address for all hosts, as on a cluster network; 127.0.0.1 is not reachable from them.
    relay = Relay(shared_address(hosts), (parts.hostname, parts.port))
    url = url_at(redis_url, relay.server.getsockname()[0], relay.port)
    venv = str(Path(sys.executable).parent.parent)
    common = ["--venv", venv, "--workdir", str(tmp_path), "--wait", "60"]
    # Mixed on purpose: a host with its own --jobs (a supervisor and its worker), and plain workers.
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(f"# test hosts\n{hosts[0].inside} --jobs 1\n\n{hosts[1].inside}\n")
    try:
        # 0. A worker that cannot start is reported, with the end of its log.
        bad = _launch({**env, "HPO_STORAGE": url}, "start", "--study", done_study, *common, hosts[2].inside, "--", "--bogus")
        assert bad.returncode != 0
        assert f"{hosts[2].inside}: worker exited at once with 2" in bad.stdout, bad.stdout
        assert "unrecognized arguments: --bogus" in bad.stdout

        # 1. Three hosts work the study to its end; each worker exits by itself.
        started = _launch({**env, "HPO_STORAGE": url}, "start", "--study", done_study, "--hosts", str(hosts_file),
                          *common, hosts[2].inside, "--", "--threads", "1")
        assert started.returncode == 0, started.stdout + started.stderr
        pids = {host: int(pid) for host, pid in re.findall(r"^(\S+): pid (\d+), log ", started.stdout, re.M)}
        assert set(pids) == {host.inside for host in hosts}, started.stdout
        _wait(lambda: not _processes_of(done_study), 300, "the workers to finish the study")
        trials = optuna.load_study(study_name=done_study, storage=open_storage(redis_url)).get_trials()
        assert [t.number for t in trials] == list(range(9))
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        assert len({_host_of(t) for t in trials}) >= 2, [t.user_attrs["hpo:worker"] for t in trials]
        logs = {host.inside: (tmp_path / "hpo-logs" / f"{host.inside}.log").read_text() for host in hosts}
        assert "supervising 1 workers" in logs[hosts[0].inside]
        assert all("worker joining study" in logs[h.inside] for h in hosts[1:])
        assert relay.connections >= 3

        # 2. A study far from done: `stop` hands the running trials back and leaves no worker behind.
        started = _launch({**env, "HPO_STORAGE": url}, "start", "--study", stop_study, "--hosts", str(hosts_file),
                          *common, "--", "--threads", "1")
        assert started.returncode == 0, started.stdout + started.stderr
        study = optuna.load_study(study_name=stop_study, storage=open_storage(redis_url))
        _wait(lambda: {_host_of(t) for t in study.get_trials() if "hpo:worker" in t.user_attrs} == {0, 1}, 300,
              "both hosts to take a trial")
        # The third host's worker of step 1 is long gone: `stop` finds it so and leaves its pid alone.
        stopped = _launch(env, "stop", "--hosts", str(hosts_file), *common, hosts[2].inside, timeout=180)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert stopped.stdout.count(": stopped") == 2, stopped.stdout
        assert f"{hosts[2].inside}: pid {pids[hosts[2].inside]}: already exited" in stopped.stdout
        assert _processes_of(stop_study) == []
        assert not any((tmp_path / "hpo-logs").glob("*.pid"))
        trials = study.get_trials()
        assert not [t.number for t in trials if t.state == TrialState.RUNNING]
        assert len(trials) < 500
    finally:
        relay.close()
        for study_name in (done_study, stop_study):  # whatever a failed run left: only our own workers
            for pid in _processes_of(study_name):
                os.kill(pid, 9)
