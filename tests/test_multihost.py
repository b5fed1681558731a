"""Several hosts sharing one study: workers in network namespaces of their own, each reaching the
storage server only through its own virtual link (veth) to the host side, as a worker on another
machine would. Needs root (to create the namespaces); under HPO_REQUIRE_SERVICES=1 it must run.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import pytest
from conftest import SHARED_STUDY, hpo, study_file
from netns import Host, Relay, namespaces, url_at
from optuna.trial import TrialState

from hpo.storage import open_storage

pytestmark = pytest.mark.e2e

N_HOSTS = 3


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    with namespaces(N_HOSTS) as made:
        yield made


@pytest.mark.parametrize("server", ["redis", "postgres"])
def test_workers_on_three_hosts_share_one_study(tmp_path: Path, hosts: list[Host], server: str,
                                                request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(f"{server}_url")
    parts = urlsplit(url)
    name = f"hosts-{server}"
    assert hpo("create", str(study_file(tmp_path, name, **SHARED_STUDY)), "--storage", url, cwd=tmp_path).returncode == 0

    relays = [Relay(host.address, (parts.hostname, parts.port)) for host in hosts]
    try:
        # A namespace is really another host: the server's loopback address is not reachable from it.
        ns = hosts[0].ns
        probe = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                                f"import socket; socket.create_connection(('127.0.0.1', {parts.port}), timeout=2)"],
                               capture_output=True)
        assert probe.returncode != 0
        workers = [
            subprocess.Popen(["ip", "netns", "exec", host.ns, sys.executable, "-m", "hpo", "worker", "--study", name,
                              "--storage", url_at(url, host.address, relay.port), "--threads", "1"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for host, relay in zip(hosts, relays)
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
