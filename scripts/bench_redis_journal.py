"""Load and sync time of a study on Redis: Optuna's journal backend against hpo's, in one run.

    python scripts/bench_redis_journal.py                 # a private redis-server from PATH
    python scripts/bench_redis_journal.py --url redis://127.0.0.1:6379/12 --trials 300 10000

Each study is written once, straight through the backend (11 logs per trial, as a TPE worker
writes them: create, 4 params, 5 intermediate values, finish) and read by both backends:

- load, full replay: a worker starting on the study with no snapshot in Redis (a study written
  by hpo's batched appends, or a snapshot that does not unpickle after an Optuna upgrade);
- load, with snapshot: as above with the snapshot `JournalStorage` saves every 100 trials, taken
  50 trials before the end (the average distance to the last snapshot);
- sync: a loaded worker reads the 11 logs of one trial that another worker just finished
  (`JournalStorage._sync_with_backend`, which every storage call runs first).

Times are the best of `--repeat` runs; compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from datetime import datetime, timezone

import optuna
import redis
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalRedisBackend
from optuna.storages.journal._storage import JournalStorageReplayResult

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hpo.redis_journal import RedisJournalBackend  # noqa: E402

warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDY = "bench"
DISTRIBUTIONS = {
    "lr": {"name": "FloatDistribution", "attributes": {"step": None, "low": 1e-05, "high": 0.1, "log": True}},
    "layers": {"name": "IntDistribution", "attributes": {"log": False, "step": 1, "low": 1, "high": 4}},
    "act": {"name": "CategoricalDistribution", "attributes": {"choices": ["relu", "tanh"]}},
    "dropout": {"name": "FloatDistribution", "attributes": {"step": None, "low": 0.0, "high": 0.5, "log": False}},
}
BACKENDS = {"optuna": JournalRedisBackend, "hpo": RedisJournalBackend}


def trial_logs(trial_id: int, worker: str) -> list[dict]:
    """The logs one finished trial leaves in the journal, in Optuna's own format."""
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    value = 1.0 / (trial_id + 1)
    logs: list[dict] = [{"op_code": 4, "worker_id": worker, "study_id": 0, "datetime_start": now}]
    for name, internal in (("lr", 1e-3 * value), ("layers", 2.0), ("act", trial_id % 2), ("dropout", 0.25 * value)):
        dist = json.dumps(DISTRIBUTIONS[name])
        logs.append({"op_code": 5, "worker_id": worker, "trial_id": trial_id, "param_name": name, "param_value_internal": internal, "distribution": dist})
    for step in range(5):
        logs.append({"op_code": 7, "worker_id": worker, "trial_id": trial_id, "step": step, "intermediate_value": value * (5 - step)})
    logs.append({"op_code": 6, "worker_id": worker, "trial_id": trial_id, "state": 1, "values": [value], "datetime_complete": now})
    return logs


def build(url: str, prefix: str, n_trials: int) -> None:
    backend = RedisJournalBackend(url, prefix=prefix)
    worker = f"{uuid.uuid4()}-1"
    backend.append_logs([{"op_code": 0, "worker_id": worker, "study_name": STUDY, "directions": [1]}])
    for start in range(0, n_trials, 1000):
        backend.append_logs([log for t in range(start, min(start + 1000, n_trials)) for log in trial_logs(t, worker)])


def snapshot_before_last(url: str, prefix: str, n_trials: int, tail: int) -> None:
    """Saves the snapshot a worker would have saved `tail` trials before the end."""
    logs_before = 1 + 11 * (n_trials - tail)
    backend = RedisJournalBackend(url, prefix=prefix)
    replayed = JournalStorageReplayResult("bench-")
    replayed.apply_logs(log for _, log in zip(range(logs_before), backend.read_logs(0)))
    backend.save_snapshot(pickle.dumps(replayed))


def counted(backend):
    """The backend, and a list that gets one entry per command (one round trip) it sends."""
    sent: list[str] = []
    send = backend._redis.execute_command
    backend._redis.execute_command = lambda *args, **kwargs: sent.append(args[0]) or send(*args, **kwargs)
    return backend, sent


def load(kind: str, url: str, prefix: str, n_trials: int) -> tuple[float, int]:
    backend, sent = counted(BACKENDS[kind](url, prefix=prefix))
    start = time.perf_counter()
    study = optuna.load_study(study_name=STUDY, storage=JournalStorage(backend))
    assert len(study.get_trials(deepcopy=False)) == n_trials
    return time.perf_counter() - start, len(sent)


def sync(kind: str, url: str, prefix: str, repeat: int) -> tuple[float, int]:
    backend, sent = counted(BACKENDS[kind](url, prefix=prefix))
    storage = JournalStorage(backend)
    other = RedisJournalBackend(url, prefix=prefix)
    n_trials = len(storage.get_all_trials(0, deepcopy=False))
    times = []
    for i in range(repeat):
        other.append_logs(trial_logs(n_trials + i, f"{uuid.uuid4()}-2"))
        sent.clear()
        start = time.perf_counter()
        # What every storage call does first; timed alone because building the list of all
        # trials afterwards costs the same (milliseconds at 10,000 trials) with either backend.
        with storage._thread_lock:
            storage._sync_with_backend()
        times.append(time.perf_counter() - start)
        trips = len(sent)
        assert len(storage.get_all_trials(0, deepcopy=False)) == n_trials + i + 1
    return statistics.median(times), trips


def read_only(url: str, prefix: str, repeat: int) -> float:
    """hpo's read of the whole log without the replay, to show which part of a load is whose."""
    backend = RedisJournalBackend(url, prefix=prefix)
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in backend.read_logs(0):
            pass
        runs.append(time.perf_counter() - start)
    return min(runs)


def best(url: str, prefix: str, n_trials: int, repeat: int) -> dict[str, tuple[float, int]]:
    """Best load time and round trips per backend; the backends take turns so that both see
    the same noise from other jobs on the machine."""
    runs: dict[str, list[tuple[float, int]]] = {kind: [] for kind in BACKENDS}
    for _ in range(repeat):
        for kind in BACKENDS:
            runs[kind].append(load(kind, url, prefix, n_trials))
    return {kind: (min(t for t, _ in kind_runs), kind_runs[0][1]) for kind, kind_runs in runs.items()}


def private_redis() -> tuple[subprocess.Popen, str, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("no redis-server on PATH: pass --url redis://HOST:PORT/DB")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url, workdir
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("private redis-server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="Redis to use (default: a private redis-server on a free port)")
    parser.add_argument("--trials", type=int, nargs="+", default=[300, 10_000])
    parser.add_argument("--repeat", type=int, default=5, help="load runs per cell (best is kept)")
    parser.add_argument("--sync-repeat", type=int, default=20, help="syncs per cell (median is kept)")
    args = parser.parse_args()
    proc, url, workdir = (None, args.url, None) if args.url else private_redis()
    client = redis.Redis.from_url(url)
    run = uuid.uuid4().hex[:8]
    rows = []
    notes = []
    try:
        for n in args.trials:
            prefix = f"bench-{run}-{n}"
            build(url, prefix, n)
            full = best(url, prefix, n, args.repeat)
            notes.append(f"full replay of {n:,} trials with hpo's backend: {read_only(url, prefix, args.repeat):.3f} s of its {full['hpo'][0]:.3f} s is reading Redis, the rest is Optuna's replay and load_study")
            snapshot_before_last(url, prefix, n, tail=min(50, n))
            snap = best(url, prefix, n, args.repeat)
            synced = {k: sync(k, url, prefix, args.sync_repeat) for k in BACKENDS}
            rows.append((f"load {n:,} trials, full replay", full, "s"))
            rows.append((f"load {n:,} trials, with snapshot", snap, "s"))
            rows.append((f"sync 1 new trial on {n:,}", {k: (t * 1000, c) for k, (t, c) in synced.items()}, "ms"))
            for key in client.scan_iter(f"{prefix}:*", count=10_000):
                client.delete(key)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n11 logs per trial; load: best of {args.repeat}; sync: median of {args.sync_repeat}; round trips = Redis commands sent\n")
    print("| case | Optuna backend | hpo backend | hpo faster by | round trips Optuna / hpo |")
    print("|---|---:|---:|---:|---:|")
    for name, cell, unit in rows:
        (theirs, their_trips), (ours, our_trips) = cell["optuna"], cell["hpo"]
        print(f"| {name} | {theirs:.3f} {unit} | {ours:.3f} {unit} | {theirs / ours:.1f}x | {their_trips:,} / {our_trips:,} |")
    print("", *notes, sep="\n")

if __name__ == "__main__":
    main()
