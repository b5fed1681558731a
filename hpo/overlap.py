"""A worker's storage calls on one thread beside training, in the order they were made.

Asking for the next trial (and sampling it), reporting an epoch, recording a trial's result:
each costs the sampler's and the storage's time, a few milliseconds on Redis and tens on a
database, and a trial need not wait for any of them. Only the next trial's ask is awaited, when
the trial before it has ended. A write that fails for good (the storage unreachable beyond the
worker's patience) stops the worker between trials, as it would have stopped at the call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from optuna.exceptions import UpdateFinishedTrialError

from hpo import outage

T = TypeVar("T")
# Where a trial's storage writes go: `at_once`, or a `StorageThread`'s `write`.
Write = Callable[[Callable[[], object]], None]


def at_once(call: Callable[[], object]) -> None:
    """The writer where nothing overlaps (a trial run alone by a population worker): each call
    runs where it is made."""
    call()


def persisted(write: Write, call: Callable[[], object], what: str, patience: float) -> None:
    """`call` through `write`, riding out a storage outage of up to `patience` seconds
    (`outage.persist`)."""
    write(partial(outage.persist, call, what, patience))


class StorageThread:
    """One thread that runs storage calls in order. Making a call never raises: a failed write's
    error is kept and raised by `check` (or `drain`), which the worker calls between trials, so
    that it is never mistaken for the error of the trial that trains meanwhile."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hpo-storage")
        self._last: Future | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, call: Callable[[], T]) -> Future[T]:
        """Runs `call` after every call before it; its result (or error) comes with the future."""
        self._last = self._pool.submit(call)
        return self._last

    def write(self, call: Callable[[], object]) -> None:
        """Runs `call` after every call before it; nobody waits for it."""

        def noted() -> None:
            try:
                call()
            except UpdateFinishedTrialError:
                # A write to a trial that another worker's sweep failed meanwhile: the trial's own
                # tell finds that out and counts it (`worker.finish`); nothing else is lost.
                pass
            except Exception as err:
                with self._lock:
                    self._error = self._error or err

        self.submit(noted)

    def check(self) -> None:
        """Raises the first error of a write, if one failed."""
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def wait(self) -> None:
        """Waits for every call made so far."""
        if self._last is not None:
            self._last.exception()  # waits: calls run one after another

    def drain(self) -> None:
        """Waits for every call made so far; raises the first error of a write."""
        self.wait()
        self.check()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown()
