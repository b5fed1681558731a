"""Several hosts sharing one study: workers in network namespaces of their own, each reaching the
storage server only through its own virtual link (veth) to the host side, as a worker on another
machine would. Needs root (to create the namespaces); under HPO_REQUIRE_SERVICES=1 it must run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna
import pytest
from conftest import _missing, hpo, study_file
from optuna.trial import TrialState

from hpo.storage import open_storage

pytestmark = pytest.mark.e2e

N_HOSTS = 3
_COUNT = itertools.count()
FAST = {
    "study": {"n_trials": 9, "pruner": {"name": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 1}}},
    "trainer": {"epochs": 3},
}


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture
def hosts() -> Iterator[list[tuple[str, str]]]:
    """(namespace, host-side address) of each 'host'; the namespace sees the host only at that address."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        _missing("root and iproute2 (to create network namespaces)")
    tag = f"{os.getpid() % 10_000}{next(_COUNT)}"
    subnet = 200 + os.getpid() % 50  # distinct per test process, so parallel runs do not collide
    made: list[str] = []
    links: list[str] = []
    result = []
    try:
        for i in range(N_HOSTS):
            ns, outside, inside = f"hpo{tag}h{i}", f"hv{tag}h{i}", f"hn{tag}h{i}"
            _run("ip", "netns", "add", ns)
            made.append(ns)
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            links.append(outside)
            _run("ip", "link", "set", inside, "netns", ns)
            _run("ip", "addr", "add", f"10.{subnet}.{i}.1/24", "dev", outside)
            _run("ip", "link", "set", outside, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.{subnet}.{i}.2/24", "dev", inside)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", inside, "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            result.append((ns, f"10.{subnet}.{i}.1"))
    except subprocess.CalledProcessError as err:
        _remove(made, links)
        _missing(f"network namespaces ({err.stderr.strip()})")
    yield result
    _remove(made, links)


def _remove(namespaces: list[str], links: list[str]) -> None:
    # Deleting one end of a veth pair deletes both, now; a deleted namespace frees its end only later.
    for link in links:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Relay:
    """Forwards every TCP connection accepted at `listen` to `target`, counting them.

    The database listens on the host's loopback only; the relay stands in for it on the
    host-side address of a link, as the server's own address would on a real network.
    """

    def __init__(self, listen: str, target: tuple[str, int]) -> None:
        self.target = target
        self.connections = 0
        self.server = socket.create_server((listen, 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(self.target)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()

    def close(self) -> None:
        self.server.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _at(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}:{port}" if auth else f"{host}:{port}"))


@pytest.mark.parametrize("server", ["redis", "postgres"])
def test_workers_on_three_hosts_share_one_study(tmp_path: Path, hosts: list[tuple[str, str]], server: str,
                                                request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(f"{server}_url")
    parts = urlsplit(url)
    name = f"hosts-{server}"
    assert hpo("create", str(study_file(tmp_path, name, **FAST)), "--storage", url, cwd=tmp_path).returncode == 0

    relays = [Relay(address, (parts.hostname, parts.port)) for _, address in hosts]
    try:
        # A namespace is really another host: the server's loopback address is not reachable from it.
        ns = hosts[0][0]
        probe = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                                f"import socket; socket.create_connection(('127.0.0.1', {parts.port}), timeout=2)"],
                               capture_output=True)
        assert probe.returncode != 0
        workers = [
            subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "hpo", "worker", "--study", name,
                              "--storage", _at(url, address, relay.port), "--threads", "1"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for (ns, address), relay in zip(hosts, relays)
        ]
        for w in workers:
            _out, err = w.communicate(timeout=300)
            assert w.returncode == 0, err
    finally:
        for relay in relays:
            relay.close()

    assert all(relay.connections >= 1 for relay in relays)  # every host talked to the server
    trials = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()
    assert [t.number for t in trials] == list(range(9))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.user_attrs["hpo:worker"] for t in trials}) >= 2
