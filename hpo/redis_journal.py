"""A Redis journal backend for Optuna's `JournalStorage`: batched reads, one round trip per call.

Same keys and values as Optuna's `JournalRedisBackend`, so either backend (and Optuna's CLI or
optuna-dashboard) reads what the other wrote:

- ``{prefix}:log_number``: the number of the last allocated log (``-1`` when none yet),
- ``{prefix}:log:{n}``: log ``n`` as ``json.dumps(log)``,
- ``{prefix}:snapshot``: a pickled replay result, written by `JournalStorage` itself.

Optuna's backend sends one GET per log: a worker that replays a study of 10,000 trials (about
110,000 logs) waits for 110,000 round trips, and every sync costs one per new log. Here:

- a read is one script call that returns the log count and up to `BATCH` new logs;
- an append is one script call that writes the whole list of logs and returns, in the same
  reply, every log the caller has not read yet, its own included. `JournalStorage` syncs after
  each write to learn what the write did; that sync is then served from the reply, with no
  round trip of its own;
- a read that comes within `max_staleness` seconds of the last reply is served from what the
  process already has (a sync after a write never is: it reads the write's reply). Reads of
  other workers' progress are racy anyway; what must be exact (the trial budget) calls
  `refresh()` first.

Like Optuna's default, it needs a single Redis server (replicas are fine), not Redis Cluster:
the scripts touch keys in many hash slots.

Example:

    .. code::

        from optuna.storages import JournalStorage
        from hpo.redis_journal import RedisJournalBackend

        storage = JournalStorage(RedisJournalBackend("redis://localhost:6379/0"))
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import redis
from optuna.storages.journal import BaseJournalBackend
from optuna.storages.journal._base import BaseJournalSnapshot

# Large enough that round trips stop mattering, small enough that one reply stays under 1 MB.
BATCH = 2000

# Returns {last log number, logs from ARGV[2] on (at most ARGV[3] of them)}; a log numbered but
# not written yet comes back as nil. MGET in slices: Lua's unpack() has a stack limit.
_READ_FROM = """
local function read_from(prefix, first, batch)
    local last = tonumber(redis.call('get', prefix .. ':log_number') or '-1')
    local reply = {last}
    local stop = math.min(last, first + batch - 1)
    for start = first, stop, 1000 do
        local keys = {}
        for n = start, math.min(start + 999, stop) do
            keys[#keys + 1] = string.format('%s:log:%d', prefix, n)
        end
        local values = redis.call('mget', unpack(keys))
        for i = 1, #keys do reply[#reply + 1] = values[i] end
    end
    return reply
end
"""

_READ = _READ_FROM + "return read_from(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]))"

# Optuna's script numbers each log with INCR and writes it in the same atomic step, so a reader
# never sees a number without its log on a single Redis server. Here the loop runs over all
# logs of one call; SETNX keeps Optuna's convention that the first log is number 0. A negative
# ARGV[2] (nothing read yet) asks for no logs back.
_APPEND = _READ_FROM + """
local counter = ARGV[1] .. ':log_number'
redis.call('setnx', counter, -1)
for i = 4, #ARGV do
    local n = redis.call('incr', counter)
    redis.call('set', string.format('%s:log:%d', ARGV[1], n), ARGV[i])
end
if tonumber(ARGV[2]) < 0 then return {} end
return read_from(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]))
"""


class RedisJournalBackend(BaseJournalBackend, BaseJournalSnapshot):
    """Optuna's Redis journal layout, read and written with one script call per `batch` logs.

    Args:
        url: URL of the Redis server, e.g. ``redis://localhost:6379/0``.
        prefix: Prefix of every key, as in Optuna's backend (``""`` is Optuna's default).
        batch: How many logs one call reads and one append writes at most.
        max_staleness: Seconds for which a read may be served from the last reply instead of
            asking Redis again (0: every read asks, as Optuna's backends do).
    """

    def __init__(self, url: str, prefix: str = "", batch: int = BATCH, max_staleness: float = 0.0) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1 but got {batch}.")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must not be negative but got {max_staleness}.")
        self._url = url
        self._prefix = prefix
        self._batch = batch
        self._max_staleness = max_staleness
        # The first log the caller has not read yet (None: unknown until its first read), and
        # what the last append's reply brought back from there: (first number, [last, *values]).
        self._next: int | None = None
        self._ahead: tuple[int, list[Any]] | None = None
        # When the request behind the last reply was sent (the reply is at least that fresh),
        # and the last `refresh()`: a reply to a request sent before it does not serve reads.
        self._replied_at = -math.inf
        self._fresh_after = -math.inf
        self._taken_all = False
        self._connect()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_redis"], state["_read"], state["_append"]
        state.update(_next=None, _ahead=None, _replied_at=-math.inf, _fresh_after=-math.inf, _taken_all=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._connect()

    def _connect(self) -> None:
        # Timeouts turn a hung or restarting server into an error hpo can wait out (hpo.outage)
        # instead of a worker blocked forever.
        self._redis = redis.Redis.from_url(self._url, socket_connect_timeout=10, socket_timeout=60)
        self._read = self._redis.register_script(_READ)
        self._append = self._redis.register_script(_APPEND)

    def refresh(self) -> None:
        """The next read asks Redis unless a reply to a request sent after this call came first.

        Called under a lock, it makes the next read see every write of the lock's earlier holders,
        even if another thread's request sent before it is answered in between."""
        self._fresh_after = time.monotonic()

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == log_number_from:
            reply = ahead[1]
        elif (self._taken_all and log_number_from == self._next and self._replied_at >= self._fresh_after
              and time.monotonic() - self._replied_at < self._max_staleness):
            return
        else:
            reply = self._call(self._read, log_number_from)
        # Until the caller has taken every log (its replay may raise part way and drop the rest),
        # no read is served from here.
        self._taken_all = False
        yield from self._logs(reply, log_number_from)
        self._taken_all = True

    def _logs(self, reply: list[Any], number: int) -> Iterator[dict[str, Any]]:
        while True:
            last, values = int(reply[0]), reply[1:]
            logs = _decode_all(values)
            if logs is not None:
                for log in logs:
                    number += 1
                    self._next = number
                    yield log
            else:
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
                        self._replied_at = -math.inf
                        return
                    number += 1
                    self._next = number
                    yield log
            if number > last:
                self._next = number
                return
            reply = self._call(self._read, number)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        encoded = [json.dumps(log) for log in logs]
        for start in range(0, len(encoded), self._batch):
            chunk = encoded[start : start + self._batch]
            final = start + self._batch >= len(encoded)
            # Only the last chunk's reply is kept: it holds the earlier chunks' logs too.
            first = self._next if final and self._next is not None else -1
            reply = self._call(self._append, first, chunk)
            if first >= 0:
                self._ahead = (first, reply)

    def save_snapshot(self, snapshot: bytes) -> None:
        self._redis.set(f"{self._prefix}:snapshot", snapshot)

    def load_snapshot(self) -> bytes | None:
        return self._redis.get(f"{self._prefix}:snapshot")

    def _call(self, script, first: int, logs: list[str] = ()) -> list[Any]:
        sent = time.monotonic()
        reply = script(args=[self._prefix, first, self._batch, *logs])
        self._replied_at = sent
        return reply

    def _wait_for(self, number: int) -> bytes:
        delay = 0.1
        while (value := self._redis.get(f"{self._prefix}:log:{number}")) is None:
            time.sleep(delay)
            delay = min(delay * 2, 10)
        return value


def _decode_all(values: list[bytes | None]) -> list[dict[str, Any]] | None:
    """The logs of one reply in a single `json.loads` (half the cost of one call per log), or
    None when one is missing or not valid JSON and each must be read on its own."""
    if None in values:
        return None
    try:
        logs = json.loads(b"[" + b",".join(values) + b"]")
    except json.JSONDecodeError:
        return None
    return logs if len(logs) == len(values) else None
