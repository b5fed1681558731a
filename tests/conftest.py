"""Fixtures: real servers from env vars, or private ones started from the binaries on PATH.

HPO_TEST_REDIS_URL (its database is flushed), HPO_TEST_POSTGRES_URL (a fresh database is
created and dropped on it), HPO_TEST_MYSQL_URL (likewise). With HPO_REQUIRE_SERVICES=1
(CI) a missing server fails the test instead of skipping it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DIGITS_YAML = ROOT / "search_spaces" / "digits_mlp.yaml"


def _missing(what: str) -> None:
    if os.environ.get("HPO_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} is required (HPO_REQUIRE_SERVICES=1) but not available")
    pytest.skip(f"{what} not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


def _per_xdist_worker(url: str) -> str:
    """Under pytest-xdist each worker process flushes its Redis database at start: give each its own
    (gw0 the URL's, gw1 the one below, ...) so that one worker's flush never wipes another's study."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    offset = int(worker[2:]) if worker[2:].isdigit() else 0
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(db - offset) % 16}"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("HPO_TEST_REDIS_URL")
    if url:
        url = _per_xdist_worker(url)
    proc = None
    if not url:
        binary = shutil.which("redis-server")
        if binary is None:
            _missing("Redis (HPO_TEST_REDIS_URL or redis-server on PATH)")
        port = _free_port()
        workdir = tmp_path_factory.mktemp("redis")
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not _wait_port(port):
            proc.kill()
            _missing("a private redis-server")
        url = f"redis://127.0.0.1:{port}/0"
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).flushdb()
    except redis.exceptions.RedisError as err:
        _missing(f"Redis at {url} ({err})")
    yield url
    if proc is not None:
        proc.kill()
        proc.wait()


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _start_private_postgres(tmp: Path) -> tuple[subprocess.Popen, str] | None:
    initdb, postgres = _postgres_bin("initdb"), _postgres_bin("postgres")
    if not initdb or not postgres:
        return None
    # PostgreSQL refuses to run as root: run it as the postgres user when we are root.
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    datadir = tmp / "pgdata"
    datadir.mkdir()
    if prefix:
        shutil.chown(tmp, "postgres")
        shutil.chown(datadir, "postgres")
    init = subprocess.run([*prefix, initdb, "-D", str(datadir), "-A", "trust", "-U", "postgres"], capture_output=True)
    if init.returncode != 0:
        return None
    port = _free_port()
    proc = subprocess.Popen(
        [*prefix, postgres, "-D", str(datadir), "-p", str(port), "-k", str(tmp), "-c", "listen_addresses=127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not _wait_port(port):
        proc.kill()
        return None
    return proc, f"postgresql://postgres@127.0.0.1:{port}/postgres"


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = os.environ.get("HPO_TEST_POSTGRES_URL")
    proc = None
    # Not under pytest's tmp dir: its parents are private to root, and PostgreSQL runs as postgres.
    private = Path(tempfile.mkdtemp(prefix="hpo-pg-"))
    if not base:
        started = _start_private_postgres(private)
        if started is None:
            _missing("PostgreSQL (HPO_TEST_POSTGRES_URL or initdb/postgres on PATH)")
        proc, base = started
    import psycopg

    admin = base.replace("postgresql+psycopg://", "postgresql://")
    name = f"hpo_test_{uuid.uuid4().hex[:8]}"
    for attempt in range(50):
        try:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            break
        except psycopg.OperationalError as err:
            if proc is None or attempt == 49:
                _missing(f"PostgreSQL ({err})")
            time.sleep(0.2)
    head, _, _ = admin.rpartition("/")
    yield f"{head}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if proc is not None:
        proc.terminate()
        proc.wait()
    shutil.rmtree(private, ignore_errors=True)


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    base = os.environ.get("HPO_TEST_MYSQL_URL")
    if not base:
        _missing("MySQL/MariaDB (HPO_TEST_MYSQL_URL)")
    import pymysql

    head, _, _ = base.rpartition("/")
    name = f"hpo_test_{uuid.uuid4().hex[:8]}"
    from urllib.parse import urlsplit

    parts = urlsplit(base)
    try:
        conn = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username, password=parts.password or "")
    except pymysql.err.OperationalError as err:
        _missing(f"MySQL ({err})")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    yield f"{head}/{name}"
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def hpo(*args: str, cwd: Path | str | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs the `hpo` CLI in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "hpo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# A study for several workers at once: enough work (about 8 s for one worker) that a worker which
# starts first, while the others are still importing torch, cannot finish it alone; no pruner, so
# no trial ends early.
SHARED_STUDY = {"study": {"n_trials": 9, "pruner": "none"}, "trainer": {"epochs": 30}}


def study_file(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of the shipped digits study with a new name and the given `study`/`trainer` changes."""
    raw = yaml.safe_load(DIGITS_YAML.read_text())
    raw["study"]["name"] = name
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
