"""Storage URL -> Optuna storage, in one function (`open_storage`).

- nothing: ``$HPO_STORAGE``, else the embedded journal file ``./hpo.journal`` (no server;
  several local processes share it safely; ``optuna trials --storage hpo.journal`` reads it).
  A journal file costs a few ms per trial where SQLite costs tens (see the README).
- ``redis://``, ``rediss://``: Optuna's journal on Redis, with Optuna's own key layout
  (no prefix unless ``?prefix=NAME`` is given), so Optuna's CLI and optuna-dashboard read it;
  read in batches by `hpo.redis_journal` instead of one round trip per log.
- ``postgresql://``, ``mysql://``, ``sqlite:///``: Optuna's RDB storage.
- any other string without a scheme: a journal file at that path.

Passwords never leave this module unredacted: errors and hpo's log lines carry `redact(url)`,
and the password is scrubbed from every log record passing through Optuna's and the root
logger's handlers.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import importlib.util
import logging
import os
import re
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import optuna
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import FrozenTrial, TrialState

from hpo.redis_journal import RedisJournalBackend

DEFAULT_URL = "hpo.journal"
ENV_VAR = "HPO_STORAGE"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# A password given as a query field, which redis-py, libpq and SQLAlchemy all accept.
_QUERY_SECRET = re.compile(r"([?&;](?:ssl)?(?:password|passwd|pwd)=)([^&;#]*)", re.IGNORECASE)
_RDB_SCHEMES = ("postgresql", "postgres", "mysql", "mariadb", "sqlite")
# How old a Redis journal reply may be and still serve a read (the Optuna sampler's and pruner's
# reads of the study): other workers' writes of the last 50 ms are missed, as they would be by a
# read that came 50 ms earlier. A worker's own writes and the trial budget always read fresh.
REDIS_MAX_STALENESS = 0.05
# The same for the trial list read from a database (PostgreSQL, MySQL, SQLite); see `_RecentReads`.
RDB_MAX_STALENESS = 0.05
_SECRETS: set[str] = set()


class StorageError(ValueError):
    """One line for the user; never contains a password."""


def resolve_url(url: str | None) -> str:
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


Heartbeat = tuple[int, int, Callable[..., None]]


def open_storage(url: str | None = None, *, heartbeat: Heartbeat | None = None, existing: bool = False) -> BaseStorage:
    """The storage for `url` (see the module docstring); raises `StorageError`.

    `heartbeat` (interval s, grace s, stale-trial callback) switches on Optuna's trial
    heartbeat where the storage has one (RDB); journal storages use hpo's (`hpo.heartbeat`).
    `existing`: a journal file must be there already (for the commands that read or join a
    study, where a mistyped path would otherwise leave an empty file and report no studies).
    """
    url = resolve_url(url)
    _remember_password(url)
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else None
    _check_password_encoded(url)
    if scheme is not None:
        _check_port(url)
    try:
        if scheme is None:
            return _journal_file(url, existing)
        if scheme in ("redis", "rediss"):
            return _redis(url)
        if scheme.split("+")[0] in _RDB_SCHEMES:
            return _rdb(url, scheme, heartbeat)
    except StorageError:
        raise
    except Exception as err:
        raise StorageError(f"cannot open storage {redact(url)}: {_reason(err)}") from None
    raise StorageError(
        f"unknown storage scheme {scheme}:// in {redact(url)} "
        "(expected redis://, postgresql://, mysql://, sqlite:/// or a journal file path)"
    )


# A Redis lock expires after this long, so a worker killed while holding it blocks the
# others for at most this long; holders keep it for one read and one ask (milliseconds).
LOCK_TTL_S = 30
_LOCAL_LOCK = threading.Lock()


def refresh(storage: BaseStorage) -> None:
    """Makes the next read of `storage` see every write so far: hpo's Redis journal and its
    database storages otherwise serve a read of the trial list from the last one when that is
    under `REDIS_MAX_STALENESS` / `RDB_MAX_STALENESS` old."""
    backend = getattr(storage, "_backend", None)
    if isinstance(backend, RedisJournalBackend):
        backend.refresh()
    elif isinstance(storage, _RecentReads):
        storage.refresh()


@contextlib.contextmanager
def study_lock(storage: BaseStorage, study_name: str) -> Iterator[None]:
    """A lock on one study, shared by every process that uses `storage`.

    Workers check the trial budget and ask for a trial under it, so that however many race
    for the last trial, none is created past the budget. A holder that dies releases it:
    its connection or file closes (PostgreSQL, MySQL, files), or the lock expires (Redis).
    """
    if isinstance(storage, _CachedStorage):
        storage = storage._backend
    key = f"hpo:ask:{study_name}"
    if isinstance(storage, RDBStorage):
        with _rdb_lock(storage, key):
            yield
        return
    backend = getattr(storage, "_backend", None)
    redis_client = getattr(backend, "_redis", None)
    if redis_client is not None:
        with redis_client.lock(getattr(backend, "_prefix", "") + key, timeout=LOCK_TTL_S, sleep=0.005):
            yield
    elif isinstance(backend, JournalFileBackend):
        with _file_lock(backend._file_path):
            yield
    else:  # in-memory storage lives in one process
        with _LOCAL_LOCK:
            yield


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    # flock on the storage file itself: Optuna's own journal and SQLite locks are separate
    # (lock files and fcntl ranges), so this one guards only hpo's ask.
    with open(path, "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _rdb_lock(storage: RDBStorage, key: str) -> Iterator[None]:
    import sqlalchemy

    engine = storage.engine
    dialect = engine.dialect.name
    if dialect == "sqlite":
        with _file_lock(engine.url.database or ":memory:"):
            yield
        return
    number = zlib.crc32(key.encode()) - 2**31  # PostgreSQL's advisory keys are signed
    name = f"hpo:ask:{zlib.crc32(key.encode()):08x}"  # MySQL lock names: 64 characters at most
    with engine.connect() as conn:
        if dialect == "postgresql":
            # A session's advisory lock needs no transaction: in autocommit psycopg sends no BEGIN
            # and COMMIT, two of a trial's round trips.
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": number})
            release = sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": number}
        elif dialect in ("mysql", "mariadb"):
            while conn.execute(sqlalchemy.text("SELECT GET_LOCK(:n, 10)"), {"n": name}).scalar() != 1:
                time.sleep(0.01)
            release = sqlalchemy.text("SELECT RELEASE_LOCK(:n)"), {"n": name}
        else:
            release = None
        try:
            yield
        finally:
            if release is not None:
                conn.execute(*release)
            conn.commit()


def redact(url: str) -> str:
    """The URL with its password (in the user part or a ``password=`` query field) as ``***``."""
    found = _credentials(url)
    if found is not None and found[3] is not None:
        start, end, user, _ = found
        url = f"{url[:start]}{user}:***{url[end:]}"
    return scrub(_QUERY_SECRET.sub(r"\1***", url))


def _check_port(url: str) -> None:
    """A port that is not a number from 0 to 65535, named as such (drivers say 'connection refused'
    or show a Python int() error), and never shown unless it is plain digits after an @host."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return  # a malformed host: said as the storage is opened
    if "," in parts.netloc.rpartition("@")[2]:
        return  # several hosts (libpq's host1:port1,host2:port2): the driver reads them
    try:
        _ = parts.port  # reading it checks it
        return
    except ValueError:
        pass
    # Masked on the text as given (urlsplit drops tabs and newlines, so its netloc may not be in it).
    text = redact(url)
    head, _, rest = text.partition("://")
    netloc = re.match(r"[^/?#]*", rest).group(0)
    user, at, host = netloc.rpartition("@")
    # The port follows the first colon after the host (a bracketed IPv6 address holds colons).
    # Without an @host that colon may be the one between a user and a password: nothing after
    # it is shown (postgresql://bob:secret/db).
    colon = host.find(":", host.find("]") + 1 if host.startswith("[") else 0)
    port = host[colon + 1:] if colon >= 0 else ""
    if at and port.isascii() and port.isdigit():
        shown = port
    else:
        shown = "***"
        text = f"{head}://{user}{at}{host[:colon]}:***{rest[len(netloc):]}" if colon >= 0 else text
    raise StorageError(f"bad port {shown} in {text} (expected a number from 0 to 65535, as host:5432; "
                       "a password goes before an @: user:password@host)") from None


def _check_password_encoded(url: str) -> None:
    """A password with a raw ``#``, ``?`` or ``/`` is read differently by each driver, and a parser
    that stops at one may show the rest in its error; asked for percent-encoded instead."""
    found = _credentials(url)
    password = found[3] if found is not None else None
    raw = next((c for c in "#?/" if c in password), None) if password else None
    if raw is not None:
        raise StorageError(f"the password in {redact(url)} holds a raw {raw!r}: percent-encode it "
                           f"({quote(raw, safe='')}; Python: urllib.parse.quote(password, safe=''))")


def _credentials(url: str) -> tuple[int, int, str, str | None] | None:
    """Where ``user:password`` lies in `url`, the user, and the password (None without a colon)."""
    span = _userinfo(url)
    if span is None:
        return None
    user, colon, password = url[span[0]:span[1]].partition(":")
    return span[0], span[1], user, password if colon else None


def _userinfo(url: str) -> tuple[int, int] | None:
    """Where ``user:password`` lies in `url`, or None. Usually `urlsplit`'s user part. Where that has
    no ``@`` but the text has one later, it is either an ``@`` in the path or query (no password),
    or a password holding a raw ``/``, ``?`` or ``#`` (the drivers accept those, and urlsplit ends
    the user part there, showing the rest of the password as the path): a port after the colon
    says the former."""
    match = _SCHEME.match(url)
    if match is None:
        return None
    start = match.end()
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # a malformed host, e.g. an unclosed IPv6 bracket
        netloc = ""
    if "@" in netloc:
        return start, start + netloc.rfind("@")
    at = url.find("@", start)
    if at < 0:
        return None
    head = re.split(r"[/?#]", url[start:at], maxsplit=1)[0]
    user, colon, rest = head.partition(":")
    return (start, at) if colon and not rest.isdigit() else None


def _secrets(url: str) -> set[str]:
    """The passwords in `url`, as written and percent-decoded (a driver's error may show either)."""
    found = [m.group(2) for m in _QUERY_SECRET.finditer(url)]
    credentials = _credentials(url)
    if credentials is not None and credentials[3]:
        found.append(credentials[3])
    return {form for secret in found if secret for form in (secret, unquote(secret))}


Param = tuple[str, float, BaseDistribution]  # name, internal value, distribution: `set_trial_param`'s


def set_trial_params(storage: BaseStorage, trial_id: int, params: Sequence[Param]) -> None:
    """A trial's parameters, as `set_trial_param` writes them one by one, in one write: on a journal
    (a file or Redis) one append (one file lock, one Redis call), on a database one statement.
    Raises what `set_trial_param` raises for the first one that fails."""
    if not params:
        return
    if isinstance(storage, _RecentReads):
        storage.set_trial_params(trial_id, params)
        return
    if not isinstance(storage, JournalStorage):
        for param in params:
            storage.set_trial_param(trial_id, *param)
        return
    replay = storage._replay_result
    # Under the lock: a failed write in another thread changes the worker id's stem for a while (below).
    with storage._thread_lock:
        logs = [{"op_code": JournalOperation.SET_TRIAL_PARAM, "worker_id": replay.worker_id, "trial_id": trial_id,
                 "param_name": name, "param_value_internal": value, "distribution": distribution_to_json(distribution)}
                for name, value, distribution in params]
        storage._backend.append_logs(logs)
        try:
            storage._sync_with_backend()
        except Exception:
            # Optuna's replay raised for the first of these that failed (the trial finished
            # meanwhile, a distribution that clashes with an earlier trial's) and stopped there.
            # The rest are replayed as another worker's writes are, skipped where they fail, so
            # that no later read of this storage raises for them.
            prefix, replay._worker_id_prefix = replay._worker_id_prefix, "another worker's "  # the worker id's stem
            try:
                storage._sync_with_backend()
            finally:
                replay._worker_id_prefix = prefix
            raise


@contextlib.contextmanager
def params_in_one_write(trial: optuna.Trial) -> Iterator[None]:
    """Within the block, the parameters `trial` draws are held and written together at its end
    (`set_trial_params`); also after an error, as each would have been written as drawn. Where
    the write fails, the trial keeps the values drawn and a retry (`hpo.outage.persist`) writes
    the same ones again: a write may have landed though its reply was lost, and then only the same
    values leave the storage as the trial trains (a journal keeps a parameter's last value, a
    database its first)."""
    storage = trial.storage
    if isinstance(storage, _HeldParams):  # within another such block: that one writes them
        yield
        return
    # The trial's own record: a journal hands out its replay's, which must not show parameters
    # before they are written (its check of a name's distribution against other trials reads it).
    frozen = copy.copy(trial._cached_frozen_trial)
    frozen.params, frozen.distributions = dict(frozen.params), dict(frozen.distributions)
    trial._cached_frozen_trial = frozen
    held = _HeldParams(storage, getattr(trial, _UNWRITTEN, []))
    trial.storage = held  # what `Trial._suggest` writes through
    try:
        yield
    finally:
        trial.storage = storage
        try:
            set_trial_params(storage, trial._trial_id, held.params)
        except BaseException:
            setattr(trial, _UNWRITTEN, held.params)
            raise
        if hasattr(trial, _UNWRITTEN):
            delattr(trial, _UNWRITTEN)


# A trial's parameters drawn but not known to be written (`params_in_one_write`).
_UNWRITTEN = "_hpo_unwritten_params"


class _HeldParams:
    """A trial's storage that holds its `set_trial_param` calls and passes every other call on."""

    def __init__(self, storage: BaseStorage, params: Sequence[Param] = ()) -> None:
        self._storage = storage
        self.params = list(params)

    def set_trial_param(self, trial_id: int, name: str, value: float, distribution: BaseDistribution) -> None:
        self.params.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def scrub(text: str) -> str:
    """Removes every password seen in a storage URL from `text`. One of fewer than 4 characters
    also occurs inside ordinary words ("e" in every "Error"): it is removed where it stands apart
    from letters and digits, as in ``:pw@`` or ``password=pw&``, not from every word."""
    for secret in sorted(_SECRETS, key=len, reverse=True):  # a password that holds a shorter one: whole first
        if len(secret) >= _SHORT:
            text = text.replace(secret, "***")
        else:
            text = _apart(secret).sub("***", text)
    return text


_SHORT = 4


@functools.cache
def _apart(secret: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])")


def _journal_file(path: str, existing: bool = False) -> BaseStorage:
    if existing and not os.path.exists(path):
        raise StorageError(f"no journal file {path} (hpo run or hpo create makes one; elsewhere, say --storage)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StorageError(f"cannot create journal file {path}: folder {directory} does not exist")
    if os.path.isdir(path):
        raise StorageError(f"journal storage {path} is a folder (expected a file path such as {os.path.join(path, 'hpo.journal')})")
    return JournalStorage(JournalFileBackend(path))


def _redis(url: str) -> BaseStorage:
    import redis

    parts = urlsplit(url)
    database = parts.path.strip("/")
    if database and not database.isdigit():  # redis-py would quietly use database 0
        raise StorageError(f"bad Redis URL {redact(url)}: database {database!r} is not a number (expected redis://host:6379/0)")
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", "")
    clean = urlunsplit(parts._replace(query=urlencode(query)))
    try:
        client = redis.Redis.from_url(clean, socket_connect_timeout=5, socket_timeout=10)
        client.ping()
    except redis.exceptions.AuthenticationError as err:
        raise StorageError(f"Redis at {redact(url)} refused the credentials ({_reason(err)})") from None
    except redis.exceptions.ResponseError as err:  # e.g. NOAUTH, or a password where none is set
        raise StorageError(f"Redis at {redact(url)} refused the connection ({_reason(err)})") from None
    except redis.exceptions.RedisError as err:
        raise StorageError(f"cannot reach Redis at {redact(url)} ({_reason(err)})") from None
    except ValueError as err:
        raise StorageError(f"bad Redis URL {redact(url)} ({_reason(err)})") from None
    client.close()
    return JournalStorage(RedisJournalBackend(clean, prefix=prefix, max_staleness=REDIS_MAX_STALENESS))


def _rdb(url: str, scheme: str, heartbeat: Heartbeat | None) -> BaseStorage:
    import sqlalchemy.exc

    from hpo.rdb import FastRDBStorage  # SQLAlchemy: imported only for a database

    beat = {}
    if heartbeat is not None:
        interval, grace, callback = heartbeat
        beat = {"heartbeat_interval": interval, "grace_period": grace, "heartbeat_stale_trial_callback": callback,
                # Given only when the storage is opened again with the config read from it: its
                # tables and their version were just checked (30-50 ms of a worker's start).
                "skip_table_creation": True, "skip_compatibility_check": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # A worker outlives database restarts and idle-connection reaping: a connection idle
            # for a second is pinged before use (`hpo.rdb.ping_when_idle`).
            rdb = FastRDBStorage(_with_driver(url, scheme), engine_kwargs={"pool_pre_ping": False}, **beat)
            return _RecentReads(rdb, max_staleness=RDB_MAX_STALENESS)
    except ModuleNotFoundError as err:
        extra = "mysql" if "mysql" in scheme or "mariadb" in scheme else "postgres"
        raise StorageError(f"{scheme}:// needs a database driver ({err.name} is not installed; pip install 'hpo[{extra}]')") from None
    except sqlalchemy.exc.ArgumentError as err:
        raise StorageError(f"bad database URL {redact(url)} ({_reason(err)})") from None
    except sqlalchemy.exc.OperationalError as err:
        raise StorageError(f"cannot connect to {redact(url)} ({_reason(err.orig or err)})") from None


class _RecentReads(_CachedStorage):
    """Optuna's cache of an RDB storage's finished trials, whose reads of a study's trial list are
    served from the last one while it is under `max_staleness` old, as hpo's Redis journal does.

    TPE (with constant liar) reads the whole study twice per trial and the pruner once more; each
    read costs 5-10 ms of SQLAlchemy on PostgreSQL, which was a fifth of a worker's CPU per trial.
    Other workers' writes of the last 50 ms may be missed, as by a read that came 50 ms earlier.
    A trial this process creates is in the list at once (Optuna's cache adds it); its parameters,
    attributes and state changes make the next read fresh (trials sampled together, as population
    mode does, must see each other's parameters for constant liar and the grid sampler). Only its
    intermediate values may show a window late in the list, never in `get_trial`, which reads a
    running trial from the database, except the one read of a trial this process has just created
    (by `optuna.Trial`), which is given what was written. The trial budget reads fresh (`refresh`,
    under the study's lock). The reads and writes themselves skip Optuna's ORM (`hpo.rdb`).
    """

    def __init__(self, backend: RDBStorage, max_staleness: float) -> None:
        super().__init__(backend)
        self._max_staleness = max_staleness
        self._read_at: dict[int, float] = {}  # when the last read of each study was sent
        # Reads sent before this moment are not trusted: a write or `refresh` came after them.
        self._fresh_after = time.monotonic()
        self._created: tuple[int, FrozenTrial] | None = None  # the trial this process made last

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        # Another process's monotonic clock: its times mean nothing here.
        self._read_at, self._fresh_after, self._created = {}, time.monotonic(), None

    def refresh(self) -> None:
        self._fresh_after = time.monotonic()

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        # `optuna.Trial` reads the trial it was just given; it is exactly what was written.
        trial_id = super().create_new_trial(study_id, template_trial)
        with self._lock:
            study_id, number = self._trial_id_to_study_id_and_number[trial_id]
            self._created = (trial_id, copy.deepcopy(self._studies[study_id].trials[number]))
        return trial_id

    def get_trial(self, trial_id: int) -> FrozenTrial:
        created, self._created = self._created, None
        if created is not None and created[0] == trial_id:
            return created[1]
        return super().get_trial(trial_id)

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        sent = time.monotonic()
        last = self._read_at.get(study_id)
        if (last is not None and last > self._fresh_after and 0 <= sent - last < self._max_staleness
                and study_id in self._studies):
            return
        super()._read_trials_from_remote_storage(study_id)
        self._read_at[study_id] = sent

    # This process's writes that its next read of the trial list must see.
    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        return self._then_refresh(super().set_trial_state_values, trial_id, state, values)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._then_refresh(super().set_trial_user_attr, trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._then_refresh(super().set_trial_system_attr, trial_id, key, value)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        self._then_refresh(super().set_trial_param, trial_id, param_name, param_value_internal, distribution)

    def set_trial_params(self, trial_id: int, params: Sequence[Param]) -> None:
        """`set_trial_param` for each of `params`, in one statement (`FastRDBStorage.set_trial_params`)."""
        with self._lock:  # as Optuna's cache writes one: with the distributions it knows for the study
            study_id, _ = self._trial_id_to_study_id_and_number[trial_id]
            known = self._studies[study_id].param_distribution
            try:
                self._backend.set_trial_params(trial_id, [(*param, known.get(param[0])) for param in params])
            finally:
                self.refresh()
            for name, _, distribution in params:
                known.setdefault(name, distribution)

    def _then_refresh(self, write: Callable[..., Any], *args: Any) -> Any:
        try:
            return write(*args)
        finally:  # a write that failed may still have reached the database
            self.refresh()


def _with_driver(url: str, scheme: str) -> str:
    """Plain ``postgresql://`` and ``mysql://`` default to drivers hpo does not install."""
    rest = url[len(scheme) + 3 :]
    if scheme in ("postgresql", "postgres") and importlib.util.find_spec("psycopg2") is None:
        if importlib.util.find_spec("psycopg") is not None:
            return f"postgresql+psycopg://{rest}"
        return f"postgresql://{rest}"
    if scheme in ("mysql", "mariadb") and importlib.util.find_spec("MySQLdb") is None:
        if importlib.util.find_spec("pymysql") is not None:
            return f"mysql+pymysql://{rest}"
    return url


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    text = text.split(" (Background on this error")[0]
    return scrub(text)[:300]


class _ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            record.msg = scrub(record.getMessage())
            record.args = ()
        return True


_FILTER = _ScrubFilter()


def _remember_password(url: str) -> None:
    secrets = _secrets(url)
    if secrets:
        _SECRETS.update(secrets)
        for logger in (logging.getLogger(), logging.getLogger("optuna")):
            for handler in logger.handlers:
                if _FILTER not in handler.filters:
                    handler.addFilter(_FILTER)
