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

import importlib.util
import logging
import os
import re
import warnings
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

DEFAULT_URL = "hpo.journal"
ENV_VAR = "HPO_STORAGE"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_RDB_SCHEMES = ("postgresql", "postgres", "mysql", "mariadb", "sqlite")
_SECRETS: set[str] = set()


class StorageError(ValueError):
    """One line for the user; never contains a password."""


def resolve_url(url: str | None) -> str:
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


Heartbeat = tuple[int, int, Callable[..., None]]


def open_storage(url: str | None = None, *, heartbeat: Heartbeat | None = None) -> BaseStorage:
    """The storage for `url` (see the module docstring); raises `StorageError`.

    `heartbeat` (interval s, grace s, stale-trial callback) switches on Optuna's trial
    heartbeat where the storage has one (RDB); journal storages use hpo's (`hpo.heartbeat`).
    """
    url = resolve_url(url)
    _remember_password(url)
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else None
    try:
        if scheme is None:
            return _journal_file(url)
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


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    parts = urlsplit(url) if _SCHEME.match(url) else None
    if parts is None or parts.password is None:
        return scrub(url)
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def scrub(text: str) -> str:
    """Removes every password seen in a storage URL from `text`."""
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


def _journal_file(path: str) -> BaseStorage:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StorageError(f"cannot create journal file {path}: folder {directory} does not exist")
    if os.path.isdir(path):
        raise StorageError(f"journal storage {path} is a folder (expected a file path such as {os.path.join(path, 'hpo.journal')})")
    return JournalStorage(JournalFileBackend(path))


def _redis(url: str) -> BaseStorage:
    import redis

    from hpo.redis_journal import RedisJournalBackend

    parts = urlsplit(url)
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
    return JournalStorage(RedisJournalBackend(clean, prefix=prefix))


def _rdb(url: str, scheme: str, heartbeat: Heartbeat | None) -> BaseStorage:
    import sqlalchemy.exc

    beat = {}
    if heartbeat is not None:
        interval, grace, callback = heartbeat
        beat = {"heartbeat_interval": interval, "grace_period": grace, "heartbeat_stale_trial_callback": callback}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # pool_pre_ping: a worker outlives database restarts and idle-connection reaping.
            return RDBStorage(_with_driver(url, scheme), engine_kwargs={"pool_pre_ping": True}, **beat)
    except ModuleNotFoundError as err:
        extra = "mysql" if "mysql" in scheme or "mariadb" in scheme else "postgres"
        raise StorageError(f"{scheme}:// needs a database driver ({err.name} is not installed; pip install 'hpo[{extra}]')") from None
    except sqlalchemy.exc.ArgumentError as err:
        raise StorageError(f"bad database URL {redact(url)} ({_reason(err)})") from None
    except sqlalchemy.exc.OperationalError as err:
        raise StorageError(f"cannot connect to {redact(url)} ({_reason(err.orig or err)})") from None


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
    if not _SCHEME.match(url):
        return
    try:
        password = urlsplit(url).password
    except ValueError:
        return
    if password:
        _SECRETS.add(password)
        for logger in (logging.getLogger(), logging.getLogger("optuna")):
            for handler in logger.handlers:
                if _FILTER not in handler.filters:
                    handler.addFilter(_FILTER)
