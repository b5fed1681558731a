"""hpo's Redis journal: Optuna's keys and values, read in batches, appended atomically."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import redis
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalRedisBackend

from hpo import redis_journal
from hpo.redis_journal import RedisJournalBackend
from hpo.storage import open_storage

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def fresh_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -1, 1)
    trial.suggest_int("layers", 1, 4)
    trial.suggest_categorical("act", ["relu", "tanh"])
    for step in range(5):
        trial.report(x * step, step)
    trial.set_user_attr("note", f"trial {trial.number}")
    return x * x


def summary(storage: JournalStorage, name: str) -> list[tuple]:
    study = optuna.load_study(study_name=name, storage=storage)
    return [(t.number, t.state, t.params, t.values, t.intermediate_values, t.user_attrs) for t in study.trials]


def logs(n: int, tag: str = "w") -> list[dict]:
    return [{"op_code": 7, "worker_id": tag, "trial_id": 0, "step": i, "intermediate_value": i / 3} for i in range(n)]


class CommandCounter:
    """Counts the commands a backend sends to Redis: one per round trip, as nothing pipelines."""

    def __init__(self, backend: RedisJournalBackend | JournalRedisBackend) -> None:
        self.names: list[str] = []
        client = backend._redis
        send = client.execute_command

        def counted(*args, **kwargs):
            self.names.append(str(args[0]).upper())
            return send(*args, **kwargs)

        client.execute_command = counted


def test_study_round_trips_through_hpos_backend(redis_url: str) -> None:
    url = f"{redis_url}?prefix={fresh_prefix()}"
    storage = open_storage(url)
    assert isinstance(storage._backend, RedisJournalBackend)
    optuna.create_study(study_name="roundtrip", storage=storage).optimize(objective, n_trials=5)
    assert len(summary(open_storage(url), "roundtrip")) == 5
    assert summary(open_storage(url), "roundtrip") == summary(storage, "roundtrip")


def test_hpo_reads_a_study_written_by_optunas_backend(redis_url: str) -> None:
    prefix = fresh_prefix()
    written = JournalStorage(JournalRedisBackend(redis_url, prefix=prefix))
    optuna.create_study(study_name="from-optuna", storage=written).optimize(objective, n_trials=5)
    read = JournalStorage(RedisJournalBackend(redis_url, prefix=prefix))
    assert summary(read, "from-optuna") == summary(written, "from-optuna")


def test_optunas_backend_reads_a_study_written_by_hpo(redis_url: str) -> None:
    prefix = fresh_prefix()
    written = JournalStorage(RedisJournalBackend(redis_url, prefix=prefix))
    optuna.create_study(study_name="from-hpo", storage=written).optimize(objective, n_trials=5)
    read = JournalStorage(JournalRedisBackend(redis_url, prefix=prefix))
    assert summary(read, "from-hpo") == summary(written, "from-hpo")


def test_keys_and_values_are_byte_identical_to_optunas(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    theirs, ours = fresh_prefix(), fresh_prefix()
    entries = logs(3) + [{"op_code": 0, "worker_id": "w", "study_name": "ünïcode", "directions": [1]}]
    JournalRedisBackend(redis_url, prefix=theirs).append_logs(entries)
    RedisJournalBackend(redis_url, prefix=ours).append_logs(entries)
    JournalRedisBackend(redis_url, prefix=theirs).save_snapshot(b"\x00snapshot")
    RedisJournalBackend(redis_url, prefix=ours).save_snapshot(b"\x00snapshot")

    def dump(prefix: str) -> dict[bytes, bytes]:
        keys = client.keys(f"{prefix}:*")
        return {key.replace(prefix.encode(), b"P", 1): client.get(key) for key in keys}

    assert dump(ours) == dump(theirs)
    assert sorted(dump(ours)) == [b"P:log:0", b"P:log:1", b"P:log:2", b"P:log:3", b"P:log_number", b"P:snapshot"]
    assert RedisJournalBackend(redis_url, prefix=theirs).load_snapshot() == b"\x00snapshot"


def test_optuna_cli_lists_trials_written_by_hpo(redis_url: str) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=name, storage=open_storage(redis_url)).optimize(objective, n_trials=3)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "optuna"), "trials", "--storage", redis_url, "--study-name", name, "-f", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert [t["number"] for t in json.loads(result.stdout)] == [0, 1, 2]


def test_a_full_read_takes_one_round_trip_per_batch(redis_url: str) -> None:
    backend = RedisJournalBackend(redis_url, prefix=fresh_prefix(), batch=100)
    backend.append_logs(logs(1000))
    counter = CommandCounter(backend)
    assert list(backend.read_logs(0)) == logs(1000)
    assert counter.names == ["EVALSHA"] * 10


def test_a_sync_reads_only_the_new_logs_in_one_round_trip(redis_url: str) -> None:
    prefix = fresh_prefix()
    worker = JournalStorage(RedisJournalBackend(redis_url, prefix=prefix))
    study = optuna.create_study(study_name="sync", storage=worker)
    study.optimize(objective, n_trials=20)
    other = optuna.load_study(study_name="sync", storage=JournalStorage(RedisJournalBackend(redis_url, prefix=prefix)))
    other.optimize(objective, n_trials=1)
    counter = CommandCounter(worker._backend)
    assert len(study.get_trials(deepcopy=False)) == 21
    assert counter.names == ["EVALSHA"]
    assert len(study.get_trials(deepcopy=False)) == 21
    assert counter.names == ["EVALSHA", "EVALSHA"]


def test_a_write_and_the_sync_after_it_take_one_round_trip(redis_url: str) -> None:
    prefix = fresh_prefix()
    worker = JournalStorage(RedisJournalBackend(redis_url, prefix=prefix))
    study = optuna.create_study(study_name="write", storage=worker)
    trial = study.ask()
    other = optuna.load_study(study_name="write", storage=JournalStorage(RedisJournalBackend(redis_url, prefix=prefix)))
    other.optimize(objective, n_trials=2)
    counter = CommandCounter(worker._backend)
    trial.set_user_attr("k", 1)  # the reply also brings the other worker's two trials
    assert counter.names == ["EVALSHA"]
    assert worker._replay_result.get_trial(trial._trial_id).user_attrs == {"k": 1}
    assert len(worker._replay_result.get_all_trials(study._study_id, states=None)) == 3
    assert counter.names == ["EVALSHA"]


def test_reads_within_max_staleness_are_served_locally_but_never_miss_own_writes(redis_url: str) -> None:
    prefix = fresh_prefix()
    backend = RedisJournalBackend(redis_url, prefix=prefix, max_staleness=60)
    worker = JournalStorage(backend)
    study = optuna.create_study(study_name="stale", storage=worker)
    other = optuna.load_study(study_name="stale", storage=JournalStorage(RedisJournalBackend(redis_url, prefix=prefix)))
    counter = CommandCounter(backend)
    other.optimize(objective, n_trials=1)
    assert study.get_trials(deepcopy=False) == [] and counter.names == []  # within 60 s: not asked
    study.set_user_attr("mine", True)  # a write brings everything up to it, the other's too
    assert study.user_attrs == {"mine": True} and len(study.get_trials(deepcopy=False)) == 1
    assert counter.names == ["EVALSHA"]
    other.optimize(objective, n_trials=1)
    assert len(study.get_trials(deepcopy=False)) == 1
    backend.refresh()
    assert len(study.get_trials(deepcopy=False)) == 2
    assert counter.names == ["EVALSHA", "EVALSHA"]


def test_a_read_the_caller_stopped_part_way_is_not_served_from_the_last_reply(redis_url: str) -> None:
    backend = RedisJournalBackend(redis_url, prefix=fresh_prefix(), max_staleness=60)
    backend.append_logs(logs(5))
    counter = CommandCounter(backend)
    first = backend.read_logs(0)
    assert next(first) == logs(5)[0]  # then its replay raises, say, and drops the rest
    assert list(backend.read_logs(1)) == logs(5)[1:]
    assert counter.names == ["EVALSHA", "EVALSHA"]
    assert list(backend.read_logs(5)) == [] and counter.names == ["EVALSHA", "EVALSHA"]  # now caught up


def test_max_staleness_must_not_be_negative(redis_url: str) -> None:
    with pytest.raises(ValueError, match="max_staleness must not be negative"):
        RedisJournalBackend(redis_url, max_staleness=-1)


def test_appends_send_one_script_call_for_a_list_of_logs(redis_url: str) -> None:
    backend = RedisJournalBackend(redis_url, prefix=fresh_prefix(), batch=50)
    counter = CommandCounter(backend)
    backend.append_logs(logs(120))
    assert counter.names == ["EVALSHA"] * 3
    assert list(backend.read_logs(0)) == logs(120)


def append_from_a_process(backend: RedisJournalBackend, tag: str, calls: int) -> None:
    for i in range(calls):
        backend.append_logs([{"op_code": 7, "worker_id": tag, "trial_id": i, "step": step, "intermediate_value": 0.5} for step in range(3)])


def test_concurrent_appends_from_processes_are_gap_free_and_keep_each_list_together(redis_url: str) -> None:
    prefix = fresh_prefix()
    backend = RedisJournalBackend(redis_url, prefix=prefix)
    # spawn: each child gets the backend pickled, as Optuna's multiprocessing users do.
    context = multiprocessing.get_context("spawn")
    tags = [f"p{i}" for i in range(4)]
    children = [context.Process(target=append_from_a_process, args=(backend, tag, 40)) for tag in tags]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    read = list(backend.read_logs(0))
    assert len(read) == 4 * 40 * 3
    assert int(redis.Redis.from_url(redis_url).get(f"{prefix}:log_number")) == len(read) - 1
    for start in range(0, len(read), 3):
        one_call = read[start : start + 3]
        assert [log["step"] for log in one_call] == [0, 1, 2]
        assert len({(log["worker_id"], log["trial_id"]) for log in one_call}) == 1
    for tag in tags:
        assert [log["trial_id"] for log in read[::3] if log["worker_id"] == tag] == list(range(40))


def test_a_numbered_but_unwritten_log_is_waited_for_not_skipped(redis_url: str, monkeypatch) -> None:
    prefix = fresh_prefix()
    client = redis.Redis.from_url(redis_url)
    backend = RedisJournalBackend(redis_url, prefix=prefix)
    backend.append_logs(logs(3))
    # A writer that took number 3 and has not written it yet; a later writer already wrote 4.
    client.incr(f"{prefix}:log_number")
    backend.append_logs([{"op_code": 7, "worker_id": "later", "trial_id": 0, "step": 9, "intermediate_value": 1.0}])
    late = {"op_code": 7, "worker_id": "late", "trial_id": 0, "step": 8, "intermediate_value": 1.0}
    waits = []

    def writer_finishes_while_reader_waits(seconds: float) -> None:
        waits.append(seconds)
        client.set(f"{prefix}:log:3", json.dumps(late))

    monkeypatch.setattr(redis_journal.time, "sleep", writer_finishes_while_reader_waits)
    read = list(backend.read_logs(0))
    assert waits, "the reader should have waited for log 3"
    assert [log["worker_id"] for log in read] == ["w", "w", "w", "late", "later"]


def test_a_torn_last_log_is_left_for_the_next_read_like_optuna(redis_url: str) -> None:
    prefix = fresh_prefix()
    client = redis.Redis.from_url(redis_url)
    backend = RedisJournalBackend(redis_url, prefix=prefix)
    backend.append_logs(logs(2))
    client.incr(f"{prefix}:log_number")
    client.set(f"{prefix}:log:2", b'{"op_code": 7, "wor')
    assert list(backend.read_logs(0)) == logs(2)
    client.set(f"{prefix}:log:1", b"not json")
    with pytest.raises(json.JSONDecodeError):
        list(backend.read_logs(0))


def test_backend_pickles_without_its_connection(redis_url: str) -> None:
    backend = RedisJournalBackend(redis_url, prefix=fresh_prefix())
    backend.append_logs(logs(2))
    assert "_redis" not in backend.__getstate__()
    assert list(pickle.loads(pickle.dumps(backend)).read_logs(0)) == logs(2)


def test_batch_must_be_positive(redis_url: str) -> None:
    with pytest.raises(ValueError, match="batch must be at least 1 but got 0"):
        RedisJournalBackend(redis_url, batch=0)
