"""'Hosts' for multi-machine tests: network namespaces, each linked to the root namespace by its own
virtual link (veth), and a TCP relay that stands in for a server's address on those links.

Only addresses created here are used (10.x.y.z on the links; the servers stay on 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from conftest import _missing

_COUNT = itertools.count()


@dataclass
class Host:
    ns: str  # the namespace's name
    link: str  # the root-side end of its veth pair
    address: str  # the root side's address on that link: the host as this namespace sees it
    inside: str  # the namespace's own address


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


@contextlib.contextmanager
def namespaces(count: int) -> Iterator[list[Host]]:
    """`count` namespaces, removed on exit. Skips (fails under HPO_REQUIRE_SERVICES=1) without root."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        _missing("root and iproute2 (to create network namespaces)")
    tag = f"{os.getpid() % 10_000}{next(_COUNT)}"
    # Distinct per test process (and per pytest-xdist worker), so parallel runs do not collide.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")[2:]
    subnet = 200 + int(worker) % 10 if worker.isdigit() else 210 + os.getpid() % 40
    made: list[str] = []
    links: list[str] = []
    hosts = []
    try:
        try:
            for i in range(count):
                ns, outside, inside = f"hpo{tag}h{i}", f"hv{tag}h{i}", f"hn{tag}h{i}"
                _run("ip", "netns", "add", ns)
                made.append(ns)
                _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
                links.append(outside)
                _run("ip", "link", "set", inside, "netns", ns)
                _run("ip", "addr", "add", f"10.{subnet}.{i}.1/24", "dev", outside)
                _run("ip", "link", "set", outside, "up")
                _run(*in_ns(ns, "ip", "addr", "add", f"10.{subnet}.{i}.2/24", "dev", inside))
                _run(*in_ns(ns, "ip", "link", "set", inside, "up"))
                _run(*in_ns(ns, "ip", "link", "set", "lo", "up"))
                # Everything beyond the link goes to the root namespace, as to a machine's gateway.
                _run(*in_ns(ns, "ip", "route", "add", "default", "via", f"10.{subnet}.{i}.1"))
                hosts.append(Host(ns, outside, f"10.{subnet}.{i}.1", f"10.{subnet}.{i}.2"))
        except subprocess.CalledProcessError as err:
            _missing(f"network namespaces ({err.stderr.strip()})")
        yield hosts
    finally:
        # Deleting one end of a veth pair deletes both, now; a deleted namespace frees its end only later.
        for link in links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def shared_address(hosts: list[Host]) -> str:
    """One more root-side address that every namespace reaches through its default route: a
    server's single address on a cluster network. It goes when the first link is deleted."""
    subnet = hosts[0].address.split(".")[1]
    address = f"10.{subnet}.254.1"
    _run("ip", "addr", "add", f"{address}/32", "dev", hosts[0].link)
    return address


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


def url_at(url: str, host: str, port: int) -> str:
    """`url` with its host and port replaced, credentials kept."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}:{port}" if auth else f"{host}:{port}"))
