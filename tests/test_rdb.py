"""hpo's Core statements for trials (`hpo.rdb`) against Optuna's ORM, on SQLite, PostgreSQL and MySQL:
the same rows written, the same trials read, the same errors."""

from __future__ import annotations

import datetime
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from hpo.rdb import _HEARTBEATS, FastRDBStorage
from hpo.storage import _with_driver, open_storage


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/test.db"
    url = request.getfixturevalue("postgres_url" if request.param == "postgresql" else "mysql_url")
    return _with_driver(url, url.split("://")[0])


def script(storage: Any, study_id: int) -> list[int]:
    """Every write the fast path overrides, with the odd cases: inf/nan reports, a report
    overwritten, an attribute overwritten, two objectives, a failed and a waiting trial."""
    first = storage.create_new_trial(study_id)
    storage.set_trial_param(first, "x", 1 / 3, FloatDistribution(-1, 1))  # not exact in float32
    storage.set_trial_param(first, "n", 3, IntDistribution(1, 8, log=True))
    storage.set_trial_param(first, "opt", 1, CategoricalDistribution(["adam", "sgd"]))
    for step, value in enumerate([0.1, math.inf, -math.inf, math.nan]):
        storage.set_trial_intermediate_value(first, step, value)
    storage.set_trial_intermediate_value(first, 0, 0.5)  # overwritten
    storage.set_trial_user_attr(first, "metrics", {"loss": [1.0, 0.5]})
    storage.set_trial_user_attr(first, "metrics", {"loss": [0.25]})
    storage.set_trial_user_attr(first, "metrics", {"loss": [0.25]})  # the same again: a write that changes nothing
    storage.set_trial_system_attr(first, "hpo:worker", "host:1")
    assert storage.set_trial_state_values(first, TrialState.COMPLETE, [2 / 3, math.inf])

    second = storage.create_new_trial(study_id)
    storage.set_trial_param(second, "x", -0.5, FloatDistribution(-1, 1))
    storage.set_trial_intermediate_value(second, 3, 2.0)
    assert storage.set_trial_state_values(second, TrialState.FAIL)

    waiting = storage.create_new_trial(study_id, optuna.trial.create_trial(state=TrialState.WAITING))
    # From templates: hpo's (running, with its attributes) and a finished one with everything.
    storage.create_new_trial(study_id, optuna.trial.FrozenTrial(
        number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.datetime.now(), datetime_complete=None,
        params={}, distributions={}, user_attrs={"hpo:worker": "h:2", "hpo:seeds": [1, 2]}, system_attrs={},
        intermediate_values={}, trial_id=-1))
    storage.create_new_trial(study_id, optuna.trial.create_trial(
        values=[0.5, -math.inf], params={"x": 0.1, "opt": "sgd"},
        distributions={"x": FloatDistribution(-1, 1), "opt": CategoricalDistribution(["adam", "sgd"])},
        user_attrs={"a": 1}, system_attrs={"b": [2]}, intermediate_values={0: 1.0, 2: math.nan}))
    running = storage.create_new_trial(study_id)
    assert not storage.set_trial_state_values(running, TrialState.RUNNING)  # already running
    assert storage.set_trial_state_values(waiting, TrialState.RUNNING)
    storage.set_trial_user_attr(waiting, "note", None)
    pruned = storage.create_new_trial(study_id)
    assert storage.set_trial_state_values(pruned, TrialState.PRUNED, [0.25])  # one value: one statement on PostgreSQL
    return [first, second, waiting]


def comparable(trial: optuna.trial.FrozenTrial) -> tuple:
    nan_free = {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in trial.intermediate_values.items()}
    return (trial.number, trial.state, trial.values, trial.params, trial.distributions, trial.user_attrs,
            trial.system_attrs, nan_free, trial.datetime_start is None, trial.datetime_complete is None)


def test_the_fast_path_writes_and_reads_what_optunas_orm_does(db_url: str) -> None:
    orm, fast = RDBStorage(db_url), FastRDBStorage(db_url)
    ours = fast.create_new_study([optuna.study.StudyDirection.MINIMIZE] * 2, f"fast-{uuid.uuid4().hex[:6]}")
    theirs = orm.create_new_study([optuna.study.StudyDirection.MINIMIZE] * 2, f"orm-{uuid.uuid4().hex[:6]}")
    script(fast, ours)
    script(orm, theirs)
    # Written by the fast path, read by Optuna: the same as Optuna's own writes.
    assert [comparable(t) for t in orm.get_all_trials(ours)] == [comparable(t) for t in orm.get_all_trials(theirs)]
    # Read by the fast path: equal to Optuna's reading, datetimes and ids included.
    for study_id in (ours, theirs):
        mine, reference = fast.get_all_trials(study_id), orm.get_all_trials(study_id)
        assert [comparable(t) for t in mine] == [comparable(t) for t in reference]
        assert [(t._trial_id, t.datetime_start, t.datetime_complete) for t in mine] == \
            [(t._trial_id, t.datetime_start, t.datetime_complete) for t in reference]
        assert comparable(fast.get_trial(reference[0]._trial_id)) == comparable(reference[0])
        assert [t.number for t in fast.get_all_trials(study_id, states=(TrialState.RUNNING,))] == [2, 3, 5]
        # What Optuna's cache asks for: trials past an id, and some older ones again.
        ids = [t._trial_id for t in reference]
        again = fast._get_trials(study_id, None, {ids[0]}, ids[3])
        assert [t._trial_id for t in again] == [ids[0], *ids[4:]]


def test_a_trials_params_go_in_one_statement_as_optunas_rows_with_optunas_errors(db_url: str) -> None:
    orm, fast = RDBStorage(db_url), FastRDBStorage(db_url)
    study_id = fast.create_new_study([optuna.study.StudyDirection.MINIMIZE], f"params-{uuid.uuid4().hex[:6]}")
    x, n, opt = FloatDistribution(-1, 1), IntDistribution(1, 8, log=True), CategoricalDistribution(["adam", "sgd"])
    trial = fast.create_new_trial(study_id)
    statements: list[str] = []
    sqlalchemy.event.listen(fast.engine, "before_cursor_execute", lambda conn, cursor, sql, *rest: statements.append(sql))
    fast.set_trial_params(trial, [("x", 1 / 3, x, None), ("n", 3, n, None), ("opt", 1, opt, None)])
    # One write (before it, one read of the study's distribution for each name new to the process).
    assert [sql.split()[0] for sql in statements] == ["SELECT"] * 3 + ["INSERT"]
    written = orm.get_trial(trial)
    assert (written.params, written.distributions) == ({"x": 1 / 3, "n": 3, "opt": "sgd"}, {"x": x, "n": n, "opt": opt})
    # One of them there already: the others written, the duplicate ignored, as Optuna ignores it.
    second = fast.create_new_trial(study_id)
    fast.set_trial_param(second, "x", 0.5, x)
    fast.set_trial_params(second, [("x", 0.25, x, None), ("n", 2, n, None)])
    assert orm.get_trial(second).params == {"x": 0.5, "n": 2}
    # A distribution that clashes with the study's: Optuna's error, and none of them written.
    with pytest.raises(ValueError, match="different distribution kind"):
        fast.set_trial_params(second, [("y", 0.5, FloatDistribution(0, 1), None), ("opt", 0.5, x, None)])
    assert orm.get_trial(second).params == {"x": 0.5, "n": 2}
    # Another process's storage, which has not seen the trial: the same rows.
    third = fast.create_new_trial(study_id)
    FastRDBStorage(db_url).set_trial_params(third, [("x", -0.5, x, None), ("n", 8, n, None)])
    assert orm.get_trial(third).params == {"x": -0.5, "n": 8}
    # A finished trial: Optuna's error, whatever the distributions.
    assert fast.set_trial_state_values(third, TrialState.COMPLETE, [1.0])
    for params in ([("y", 0.5, x, None), ("z", 0.5, x, None)], [("y", 0.5, x, None), ("opt", 0.5, x, None)]):
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            fast.set_trial_params(third, params)
    assert orm.get_trial(third).params == {"x": -0.5, "n": 8}


def test_the_fast_path_raises_what_optuna_raises(db_url: str) -> None:
    fast = FastRDBStorage(db_url)
    study_id = fast.create_new_study([optuna.study.StudyDirection.MINIMIZE], f"err-{uuid.uuid4().hex[:6]}")
    trial = fast.create_new_trial(study_id)
    fast.set_trial_param(trial, "x", 0.5, FloatDistribution(0, 1))
    fast.set_trial_param(trial, "x", 0.75, FloatDistribution(0, 1))  # a duplicate: ignored, as by Optuna
    assert fast.get_trial(trial).params == {"x": 0.5}
    other = fast.create_new_trial(study_id)
    with pytest.raises(ValueError, match="different distribution kind"):
        fast.set_trial_param(other, "x", 0, CategoricalDistribution(["a", "b"]))
    # Another process's storage, which has not seen "x" yet, checks it against the database.
    with pytest.raises(ValueError, match="different distribution kind"):
        FastRDBStorage(db_url).set_trial_param(other, "x", 0, CategoricalDistribution(["a", "b"]))
    assert fast.set_trial_state_values(trial, TrialState.COMPLETE, [1.0])
    for write in (lambda: fast.set_trial_intermediate_value(trial, 0, 1.0),
                  lambda: fast.set_trial_user_attr(trial, "k", 1),
                  lambda: fast.set_trial_param(trial, "y", 0.5, FloatDistribution(0, 1)),
                  lambda: fast.set_trial_state_values(trial, TrialState.FAIL),
                  lambda: fast.set_trial_state_values(trial, TrialState.COMPLETE, [2.0])):
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            write()
    # As Optuna: a finished trial is the error, not an incompatible distribution; and a
    # distribution that was not written is not one that later ones must match.
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        fast.set_trial_param(trial, "x", 0, CategoricalDistribution(["a", "b"]))
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        fast.set_trial_param(trial, "z", 0, CategoricalDistribution(["a", "b"]))
    fast.set_trial_param(other, "z", 0.5, FloatDistribution(0, 1))
    with pytest.raises(KeyError):
        fast.get_trial(10**9)
    with pytest.raises(KeyError):
        fast.set_trial_intermediate_value(10**9, 0, 1.0)
    with pytest.raises(KeyError):
        fast.set_trial_state_values(10**9, TrialState.COMPLETE, [1.0])
    assert fast.get_trial(trial).values == [1.0]
    with pytest.raises(KeyError):
        fast.get_all_trials(10**9)


def test_heartbeats_are_optunas_rows_dated_by_the_server(db_url: str) -> None:
    fast = FastRDBStorage(db_url, heartbeat_interval=1, grace_period=2)
    study_id = fast.create_new_study([optuna.study.StudyDirection.MINIMIZE], f"beat-{uuid.uuid4().hex[:6]}")
    alive, stale = fast.create_new_trial(study_id), fast.create_new_trial(study_id)
    fast.record_heartbeat(stale)
    fast.record_heartbeat(alive)
    time.sleep(3)  # past the grace period, with a second to spare: MySQL's DATETIME counts whole seconds
    fast.record_heartbeat(alive)  # the row updated, not a second one
    with fast.engine.connect() as conn:
        beats = dict(conn.execute(sqlalchemy.select(_HEARTBEATS.c.trial_id, _HEARTBEATS.c.heartbeat)
                                  .where(_HEARTBEATS.c.trial_id.in_([alive, stale]))).all())
    assert set(beats) == {alive, stale} and beats[alive] > beats[stale]
    # Optuna's own stale-trial query reads them: only the trial that stopped beating is stale.
    assert RDBStorage(db_url, heartbeat_interval=1, grace_period=2)._get_stale_trial_ids(study_id) == [stale]


def test_open_storage_gives_the_fast_path_for_databases(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    assert isinstance(storage._backend, FastRDBStorage)
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=5)
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db").trials) == 5


def test_a_pooled_connection_the_server_dropped_is_replaced(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A connection idle past IDLE_PING_S is pinged and replaced before use; one used a moment ago
    # is not pinged, so its next statement fails once, and the call's retry gets a new one.
    import psycopg

    from hpo import rdb

    monkeypatch.setattr(rdb, "IDLE_PING_S", 0.3)
    app = f"hpo-test-{uuid.uuid4().hex[:6]}"
    url = _with_driver(postgres_url, "postgresql")
    # One pooled connection, so that the call after a drop gets the one just used.
    fast = FastRDBStorage(f"{url}{'&' if '?' in url else '?'}application_name={app}",
                          engine_kwargs={"pool_pre_ping": False, "pool_size": 1})
    study_id = fast.create_new_study([optuna.study.StudyDirection.MINIMIZE], app)

    def drop_connections() -> None:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app,))

    trial_id = fast.create_new_trial(study_id)
    drop_connections()
    time.sleep(0.5)
    fast.set_trial_intermediate_value(trial_id, 0, 1.0)  # pinged, found dead, replaced: no error
    drop_connections()
    with pytest.raises(optuna.exceptions.StorageInternalError):
        fast.set_trial_intermediate_value(trial_id, 1, 2.0)
    fast.set_trial_intermediate_value(trial_id, 1, 2.0)
    assert fast.get_trial(trial_id).intermediate_values == {0: 1.0, 1: 2.0}


@pytest.mark.parametrize("returning", [True, False], ids=["numbered-in-insert", "counted-after"])
def test_trials_made_at_once_by_several_processes_get_distinct_numbers(db_url: str, returning: bool) -> None:
    """hpo numbers a trial in its insert (or, where the database returns no inserted row, as
    MySQL, counts after it), Optuna after it; both under the study's row lock, so however the
    writers interleave, the numbers are 0..n-1 in the order of the ids."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite takes one writer at a time: nothing interleaves")
    name = f"race-{uuid.uuid4().hex[:6]}"
    study_id = FastRDBStorage(db_url).create_new_study([optuna.study.StudyDirection.MINIMIZE], name)
    ours = [FastRDBStorage(db_url) for _ in range(3)]
    for storage in ours:  # each engine has connected: its dialect is set up, and now overridden
        storage.engine.dialect.insert_returning = returning and storage.engine.dialect.insert_returning
    storages = [*ours, RDBStorage(db_url)]
    start = threading.Barrier(len(storages))

    def make(storage: Any) -> None:
        start.wait()
        for _ in range(15):
            storage.create_new_trial(study_id)

    threads = [threading.Thread(target=make, args=(s,)) for s in storages]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trials = RDBStorage(db_url).get_all_trials(study_id)
    assert sorted(t._trial_id for t in trials) == [t._trial_id for t in trials]
    assert [t.number for t in trials] == list(range(len(storages) * 15))
