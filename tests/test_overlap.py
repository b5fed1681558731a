"""The worker's storage thread: calls run in order, a failed write stops the worker at its next wait."""

from __future__ import annotations

import threading

import pytest
from optuna.exceptions import UpdateFinishedTrialError

from hpo import overlap


def test_calls_run_one_after_another_in_the_order_they_were_made() -> None:
    thread = overlap.StorageThread()
    done: list[int] = []
    gate = threading.Event()
    thread.write(lambda: (gate.wait(5), done.append(0)))
    for i in range(1, 6):
        thread.write(lambda i=i: done.append(i))
    asked = thread.submit(lambda: list(done))
    assert done == []  # the first call still waits: nothing overtook it
    gate.set()
    assert asked.result(timeout=5) == [0, 1, 2, 3, 4, 5]
    thread.close()


def test_a_failed_write_is_raised_by_check_and_drain_never_by_the_next_call() -> None:
    thread = overlap.StorageThread()
    thread.write(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        thread.drain()
    thread.drain()  # raised once; the thread goes on
    thread.write(lambda: 1 / 0)
    thread.wait()
    # Making calls never raises it: the error would land in whatever trial trains meanwhile.
    thread.write(lambda: None)
    assert thread.submit(lambda: 7).result(timeout=5) == 7
    with pytest.raises(ZeroDivisionError):
        thread.check()
    thread.close()


def test_a_write_to_a_trial_failed_meanwhile_by_a_sweep_is_not_an_error() -> None:
    thread = overlap.StorageThread()

    def finished() -> None:
        raise UpdateFinishedTrialError("trial 3 is already finished")

    thread.write(finished)
    thread.close()  # raises nothing


def test_at_once_runs_the_call_where_it_is_made() -> None:
    seen = []
    overlap.at_once(lambda: seen.append(threading.current_thread()))
    assert seen == [threading.current_thread()]
