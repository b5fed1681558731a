"""A Redis journal backend for Optuna's `JournalStorage` that reads in batches.

Same keys and values as Optuna's `JournalRedisBackend`, so either backend (and Optuna's CLI or
optuna-dashboard) reads what the other wrote:

- ``{prefix}:log_number``: the number of the last allocated log (``-1`` when none yet),
- ``{prefix}:log:{n}``: log ``n`` as ``json.dumps(log)``,
- ``{prefix}:snapshot``: a pickled replay result, written by `JournalStorage` itself.

Optuna's backend sends one GET per log: a worker that replays a study of 10,000 trials (about
110,000 logs) waits for 110,000 round trips, and every sync costs one per new log. This one
reads the new logs with one MGET per `BATCH` of them and appends a whole list of logs in one
script call. Like Optuna's default, it needs a single Redis server (replicas are fine), not
Redis Cluster: one MGET or script touches keys in many hash slots.

Example:

    .. code::

        from optuna.storages import JournalStorage
        from hpo.redis_journal import RedisJournalBackend

        storage = JournalStorage(RedisJournalBackend("redis://localhost:6379/0"))
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis
from optuna.storages.journal import BaseJournalBackend
from optuna.storages.journal._base import BaseJournalSnapshot

# Large enough that round trips stop mattering, small enough that one reply stays under 1 MB.
BATCH = 2000

# Optuna's script numbers each log with INCR and writes it in the same atomic step, so a reader
# never sees a number without its log on a single Redis server. Here the loop runs over all
# logs of one call; SETNX keeps Optuna's convention that the first log is number 0.
_APPEND = """
local counter = ARGV[1] .. ':log_number'
redis.call('setnx', counter, -1)
for i = 2, #ARGV do
    local n = redis.call('incr', counter)
    redis.call('set', string.format('%s:log:%d', ARGV[1], n), ARGV[i])
end
"""


class RedisJournalBackend(BaseJournalBackend, BaseJournalSnapshot):
    """Optuna's Redis journal layout, read with one MGET per `batch` logs.

    Args:
        url: URL of the Redis server, e.g. ``redis://localhost:6379/0``.
        prefix: Prefix of every key, as in Optuna's backend (``""`` is Optuna's default).
        batch: How many logs one MGET reads and one append script writes at most.
    """

    def __init__(self, url: str, prefix: str = "", batch: int = BATCH) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1 but got {batch}.")
        self._url = url
        self._prefix = prefix
        self._batch = batch
        self._connect()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_redis"], state["_append"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._connect()

    def _connect(self) -> None:
        # Timeouts turn a hung or restarting server into an error hpo can wait out (hpo.outage)
        # instead of a worker blocked forever.
        self._redis = redis.Redis.from_url(self._url, socket_connect_timeout=10, socket_timeout=60)
        self._append = self._redis.register_script(_APPEND)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        last = self._redis.get(f"{self._prefix}:log_number")
        if last is None:
            return
        last = int(last)
        number = log_number_from
        while number <= last:
            stop = min(number + self._batch, last + 1)
            values = self._redis.mget([self._key(n) for n in range(number, stop)])
            logs = _decode_all(values)
            if logs is not None:
                number = stop
                yield from logs
                continue
            for value in values:
                if value is None:
                    # Numbered but not written yet (possible only if a writer bypasses the
                    # script): wait for it like Optuna does, since skipping it would shift
                    # every later log number the caller counts.
                    value = self._wait_for(number)
                try:
                    log = json.loads(value)
                except json.JSONDecodeError:
                    # Optuna tolerates a torn last log and reads it again on the next sync.
                    if number != last:
                        raise
                    return
                number += 1
                yield log

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        encoded = [json.dumps(log) for log in logs]
        for start in range(0, len(encoded), self._batch):
            self._append(args=[self._prefix, *encoded[start : start + self._batch]])

    def save_snapshot(self, snapshot: bytes) -> None:
        self._redis.set(f"{self._prefix}:snapshot", snapshot)

    def load_snapshot(self) -> bytes | None:
        return self._redis.get(f"{self._prefix}:snapshot")

    def _key(self, number: int) -> str:
        return f"{self._prefix}:log:{number}"

    def _wait_for(self, number: int) -> bytes:
        delay = 0.1
        while (value := self._redis.get(self._key(number))) is None:
            time.sleep(delay)
            delay = min(delay * 2, 10)
        return value


def _decode_all(values: list[bytes | None]) -> list[dict[str, Any]] | None:
    """The logs of one MGET in a single `json.loads` (half the cost of one call per log), or
    None when one is missing or not valid JSON and each must be read on its own."""
    if None in values:
        return None
    try:
        logs = json.loads(b"[" + b",".join(values) + b"]")
    except json.JSONDecodeError:
        return None
    return logs if len(logs) == len(values) else None
