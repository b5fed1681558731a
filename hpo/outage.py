"""Riding out a storage server that restarts or is unreachable for a while.

Calls that reach the storage go through `persist`: on a connection error it waits with
exponential back-off and tries again, for at most `patience` seconds, so a worker keeps its
trial (and a finished trial's result, held here in memory) across a Redis or database restart
and tells it once the server is back.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

import optuna.exceptions
import redis.exceptions
import sqlalchemy.exc

from hpo.storage import scrub

T = TypeVar("T")

DEFAULT_PATIENCE = 600.0
TRANSIENT: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,  # a restarted Redis replaying its append-only file
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
)


def transient(err: BaseException) -> bool:
    """Whether `err` is the storage being unreachable, not a bad request: a connection error, or
    Optuna's (and hpo's) wrapping of one for a database call (`StorageInternalError` caused by
    a dropped connection, e.g. a database restart under a busy worker)."""
    if isinstance(err, TRANSIENT):
        return True
    return isinstance(err, optuna.exceptions.StorageInternalError) and isinstance(err.__cause__, TRANSIENT)


class StorageUnavailable(RuntimeError):
    """The storage stayed unreachable for longer than the patience allows."""


def persist(call: Callable[[], T], what: str, patience: float = DEFAULT_PATIENCE) -> T:
    """`call()`, retried with back-off (0.5 s doubling to 30 s) while the storage is unreachable."""
    started = time.monotonic()
    delay = 0.5
    warned = False
    while True:
        try:
            result = call()
        except Exception as err:
            if not transient(err):
                raise
            waited = time.monotonic() - started
            reason = scrub(" ".join(str(err).split()))[:200]
            if waited + delay > patience:
                raise StorageUnavailable(f"storage unreachable for {waited:.0f}s while {what} ({reason})") from None
            if not warned:
                print(f"hpo: storage unreachable while {what} ({reason}); retrying for up to {patience:.0f}s",
                      file=sys.stderr, flush=True)
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
            continue
        if warned:
            print(f"hpo: storage reachable again after {time.monotonic() - started:.0f}s ({what})", file=sys.stderr, flush=True)
        return result
