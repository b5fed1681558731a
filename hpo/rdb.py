"""Optuna's RDB storage with its hot statements in SQLAlchemy Core: the same tables, the same rows.

A worker on PostgreSQL spent most of its CPU in SQLAlchemy's ORM: reading a trial built a
model object per row of six tables (6-10 ms a read on the 2-core machine, three reads a trial),
and each report, parameter, attribute and state change loaded the trial's ORM object first
(3-5 ms each). `FastRDBStorage` overrides exactly those calls with Core statements on Optuna's
own table objects (`optuna.storages._rdb.models`), so column names, types and enums are
Optuna's, and Optuna's CLI, dashboard and `RDBStorage` read what it writes.

The statements of the calls made per trial are built once and run with parameters. A read is one
statement. A report, an attribute, a result, and a parameter of a trial this process made or read
carry their own check that the trial is unfinished, instead of a read before them. A trial is
numbered in its insert where the database returns inserted rows (PostgreSQL, SQLite, MariaDB 10.5
and later; MySQL counts after the insert, as Optuna does). A trial of `scripts/bench_workers.py`
sends 17.5 statements on PostgreSQL, where it sent 26.5 built at each call.

It keeps Optuna's semantics: the trial must exist (`KeyError`) and be unfinished
(`UpdateFinishedTrialError`); a duplicate parameter, report or attribute write that loses a race
is ignored as Optuna ignores it; database errors become `StorageInternalError`; datetimes are
stored as naive UTC and read as naive local time. A heartbeat is one upsert of Optuna's row;
everything else (studies, the stale-trial query) is Optuna's.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import random
import time
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc
from optuna import distributions
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.dialects import mysql, postgresql, sqlite

_TRIALS = models.TrialModel.__table__
_PARAMS = models.TrialParamModel.__table__
_VALUES = models.TrialValueModel.__table__
_REPORTS = models.TrialIntermediateValueModel.__table__
_USER_ATTRS = models.TrialUserAttributeModel.__table__
_SYSTEM_ATTRS = models.TrialSystemAttributeModel.__table__
_HEARTBEATS = models.TrialHeartbeatModel.__table__
# A pooled connection idle for longer than this is pinged before use (`ping_when_idle`).
IDLE_PING_S = 1.0


class FastRDBStorage(RDBStorage):
    """`RDBStorage` whose trial reads and writes skip the ORM (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The first distribution seen per (study, parameter): what Optuna checks a new one against.
        self._distributions: dict[tuple[int, str], distributions.BaseDistribution] = {}
        # Each trial's study, where known: a parameter's write needs it, and it never changes.
        self._study_of: dict[int, int] = {}
        ping_when_idle(self.engine)

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)  # a new engine
        ping_when_idle(self.engine)

    # Reads ---------------------------------------------------------------------------------

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._transaction(single=True) as conn:
            trials = _read_trials(conn, _reads(None, self._dialect), {"id": trial_id})
        if not trials:
            raise KeyError(models.NOT_FOUND_MSG)
        return trials[0]

    def _get_trials(self, study_id: int, states: Container[TrialState] | None, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[FrozenTrial]:
        included = [i for i in included_trial_ids if i <= trial_id_greater_than]
        params: dict[str, Any] = {"study_id": study_id, "states": list(states or ()), "included": included,
                                  "greater": trial_id_greater_than}
        query = _reads((states is not None, bool(included) and trial_id_greater_than > -1, trial_id_greater_than > -1),
                       self._dialect)
        with self._transaction(single=True) as conn:
            trials = _read_trials(conn, query, params)
            if not trials and conn.execute(_STUDY, {"study_id": study_id}).first() is None:
                raise KeyError(models.NOT_FOUND_MSG)
        for trial in trials:
            self._study_of[trial._trial_id] = study_id
        return trials

    # Writes --------------------------------------------------------------------------------

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        for attempt in range(5):  # as Optuna: the study's row lock may deadlock under load (retried)
            try:
                with self._transaction() as conn:
                    # The study's row is locked while the trial's number is counted, as Optuna does.
                    if conn.execute(_STUDY_LOCKED, {"study_id": study_id}).first() is None:
                        raise KeyError(models.NOT_FOUND_MSG)
                    trial = self._insert_trial(conn, study_id, template_trial)
                self._study_of[trial._trial_id] = study_id
                return trial
            except StorageInternalError as err:
                # A lost connection is not retried here: its commit may have gone through, and a
                # second trial would be made. The caller's outage handling (`hpo.outage`) decides.
                if attempt == 4 or getattr(err.__cause__, "connection_invalidated", False):
                    raise
                time.sleep(random.random() * 2.0)
        raise AssertionError("unreachable")

    def _insert_trial(self, conn: sqlalchemy.Connection, study_id: int, template: FrozenTrial | None) -> FrozenTrial:
        """The new trial's row, numbered, and, from `template`, its child rows."""
        start = _utc(template.datetime_start) if template is not None else _utc(datetime.datetime.now())
        complete = _utc(template.datetime_complete) if template is not None else None
        state = template.state if template is not None else TrialState.RUNNING
        row = {"sid": study_id, "state_": state, "start": start, "complete": complete}
        if conn.dialect.insert_returning:
            trial_id, number = conn.execute(_NEW_NUMBERED_TRIAL, row).one()
        else:  # no INSERT ... RETURNING (MySQL, MariaDB before 10.5): counted once the row is in, as Optuna does
            trial_id = conn.execute(_NEW_TRIAL, {"study_id": study_id, "number": None, "state": state,
                                                 "datetime_start": start, "datetime_complete": complete}
                                    ).inserted_primary_key[0]
            number = conn.execute(_EARLIER, {"study_id": study_id, "id": trial_id}).scalar_one()
            conn.execute(_SET_TRIAL, {"id": trial_id, "number": number})
        if template is not None:
            values = template.values if template.values is not None and len(template.values) > 1 else (
                [template.value] if template.value is not None else [])
            for objective, value in enumerate(values):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                conn.execute(_VALUES.insert().values(trial_id=trial_id, objective=objective, value=stored, value_type=kind))
            for name, value in template.params.items():
                dist = template.distributions[name]
                self._check_distribution(conn, study_id, name, dist, None)
                conn.execute(_NEW_PARAM, {"trial_id": trial_id, "param_name": name, "param_value": dist.to_internal_repr(value),
                                          "distribution_json": distributions.distribution_to_json(dist)})
            for table, attrs in ((_USER_ATTRS, template.user_attrs), (_SYSTEM_ATTRS, template.system_attrs)):
                if attrs:
                    conn.execute(table.insert(), [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                                                  for k, v in attrs.items()])
            for step, value in template.intermediate_values.items():
                stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
                conn.execute(_REPORTS.insert().values(trial_id=trial_id, step=step, intermediate_value=stored,
                                                      intermediate_value_type=kind))
            frozen = copy.deepcopy(template)
            frozen.number, frozen.datetime_start, frozen._trial_id = number, _local(start), trial_id
            return frozen
        return FrozenTrial(number=number, state=state, value=None, values=None, datetime_start=_local(start),
                           datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
                           intermediate_values={}, trial_id=trial_id)

    def _check_distribution(self, conn: sqlalchemy.Connection | None, study_id: int, name: str,
                            distribution: distributions.BaseDistribution,
                            previous: distributions.BaseDistribution | None, record: bool = True) -> None:
        """Raises where `distribution` cannot share parameter `name` with the study's earlier trials.
        Reads them on `conn` (None: a connection of its own) unless this process has seen `name`.
        Remembers the study's distribution for `name`: the earlier trials' or, with `record`,
        this one (the caller without `record` writes it first)."""
        if previous is None:
            previous = self._distributions.get((study_id, name))
        if previous is None:
            query = (sqlalchemy.select(_PARAMS.c.distribution_json)
                     .select_from(_PARAMS.join(_TRIALS, _PARAMS.c.trial_id == _TRIALS.c.trial_id))
                     .where(_TRIALS.c.study_id == study_id, _PARAMS.c.param_name == name).limit(1))
            if conn is None:
                with self._transaction(single=True) as own:
                    row = own.execute(query).first()
            else:
                row = conn.execute(query).first()
            if row is not None:
                previous = _distribution(row[0])
        if previous is not None:
            self._distributions.setdefault((study_id, name), previous)
            distributions.check_distribution_compatibility(previous, distribution)
        elif record:
            self._distributions.setdefault((study_id, name), distribution)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        value, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(intermediate_value)
        self._write_unfinished(_upsert(_REPORTS, ("step",), ("intermediate_value", "intermediate_value_type"),
                                       self._dialect, unfinished=True),
                               {"trial_id": trial_id, "step": step, "intermediate_value": value,
                                "intermediate_value_type": kind})

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(_USER_ATTRS, trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(_SYSTEM_ATTRS, trial_id, key, value)

    def _set_attr(self, table: sqlalchemy.Table, trial_id: int, key: str, value: Any) -> None:
        self._write_unfinished(_upsert(table, ("key",), ("value_json",), self._dialect, unfinished=True),
                               {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)})

    def _write_unfinished(self, statement: sqlalchemy.Executable, row: dict[str, Any]) -> None:
        """Writes a child row of the trial `row["trial_id"]` by `statement`, one of `_upsert`'s or
        `_new_param`'s, whose row comes from a select of the trial's row only while it is
        unfinished: Optuna's check, which `_updating` makes with a statement of its own first, is
        the write's own condition. A write that touched no row reads the trial to raise what
        Optuna raises; if it is unfinished after all, the row already held these values (MySQL
        counts a row updated to its own values as unchanged). A duplicate that only inserts (a
        parameter) is ignored, as Optuna ignores it."""
        trial_id = row["trial_id"]
        with self._transaction(ignore_integrity_error=True, single=True) as conn:
            if conn.execute(statement, row, execution_options=_ROWCOUNT).rowcount == 0:
                self._check_updatable(conn, trial_id)

    def _check_updatable(self, conn: sqlalchemy.Connection, trial_id: int, lock: bool = False) -> Any:
        """The trial's study id and state (its row locked, with `lock`); raises what Optuna raises
        for a write to the trial: `KeyError` where there is none, `UpdateFinishedTrialError` where
        it is finished."""
        found = conn.execute(_STATE_LOCKED if lock else _STATE, {"id": trial_id}).first()
        if found is None:
            raise KeyError(models.NOT_FOUND_MSG)
        self.check_trial_is_updatable(trial_id, found.state)
        return found

    def _set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                         distribution: distributions.BaseDistribution,
                         previous_distribution: distributions.BaseDistribution | None) -> None:
        row = {"trial_id": trial_id, "param_name": param_name, "param_value": param_value_internal,
               "distribution_json": distributions.distribution_to_json(distribution)}
        study_id = self._study_of.get(trial_id)
        if study_id is None:  # a trial this process has not seen: its study is read with its state
            with self._updating(trial_id, ignore_integrity_error=True) as (conn, trial):
                self._study_of[trial_id] = trial.study_id
                self._check_distribution(conn, trial.study_id, param_name, distribution, previous_distribution)
                conn.execute(_NEW_PARAM, row)
            return
        # The distribution is checked before the write, which is then one statement.
        self._check_before_writing(trial_id, study_id, [(param_name, distribution, previous_distribution)])
        self._write_unfinished(_new_param(self._dialect), row)
        self._distributions.setdefault((study_id, param_name), distribution)

    def _check_before_writing(self, trial_id: int, study_id: int, params: Sequence[tuple[
            str, distributions.BaseDistribution, distributions.BaseDistribution | None]]) -> None:
        """Raises where a parameter's distribution cannot join the study's (name, distribution, the
        study's where the caller knows it). As Optuna, a finished or unknown trial is the error
        rather than the distribution; and only a distribution written is the one the parameter's
        later ones must match, so none is recorded here."""
        try:
            for name, distribution, previous in params:
                self._check_distribution(None, study_id, name, distribution, previous, record=False)
        except ValueError:
            with self._transaction(single=True) as conn:
                self._check_updatable(conn, trial_id)
            raise

    def set_trial_params(self, trial_id: int, params: Sequence[tuple[str, float, distributions.BaseDistribution,
                                                                     distributions.BaseDistribution | None]]) -> None:
        """A trial's parameters (name, internal value, distribution, the study's distribution for
        the name where the caller knows it), as `_set_trial_param` writes them one by one: here one
        statement for them all, where the trial is one this process made or read."""
        study_id = self._study_of.get(trial_id)
        if study_id is None or len(params) < 2:
            for param in params:
                self._set_trial_param(trial_id, *param)
            return
        self._check_before_writing(trial_id, study_id, [(name, distribution, previous)
                                                        for name, _, distribution, previous in params])
        for start in range(0, len(params), _PARAMS_PER_STATEMENT):
            chunk = params[start : start + _PARAMS_PER_STATEMENT]
            row: dict[str, Any] = {"trial_id": trial_id}
            for i, (name, value, distribution, _) in enumerate(chunk):
                row.update({f"name{i}": name, f"value{i}": value, f"json{i}": distributions.distribution_to_json(distribution)})
            try:
                with self._transaction(single=True) as conn:
                    if conn.execute(_new_params(len(chunk)), row, execution_options=_ROWCOUNT).rowcount == 0:
                        self._check_updatable(conn, trial_id)
            except sqlalchemy.exc.IntegrityError:
                # One of them was there already (the statement inserts all or none): one by one,
                # each duplicate ignored as Optuna ignores it.
                for param in chunk:
                    self._set_trial_param(trial_id, *param)
            for name, _, distribution, _ in chunk:
                self._distributions.setdefault((study_id, name), distribution)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        if state.is_finished():
            return self._finish(trial_id, state, values)
        try:
            with self._updating(trial_id, for_update=True) as (conn, trial):
                self._write_values(conn, trial_id, values)
                if state == TrialState.RUNNING and trial.state != TrialState.WAITING:
                    return False  # as Optuna: the values above are still committed
                change: dict[str, Any] = {"id": trial_id, "state": state}
                if state == TrialState.RUNNING:
                    change["datetime_start"] = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
                conn.execute(_SET_TRIAL, change)
        except sqlalchemy.exc.IntegrityError:
            return False
        return True

    def _finish(self, trial_id: int, state: TrialState, values: Sequence[float] | None) -> bool:
        """`set_trial_state_values` to a finished state: the update of the trial's row, made only
        while it is unfinished, is the check that Optuna's read of the row makes first. With no
        value, or one on PostgreSQL (which writes it in the same statement), it is one statement."""
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        row: dict[str, Any] = {"id": trial_id, "state_": state, "complete": now}
        one = not values or (len(values) == 1 and self._dialect == "postgresql")
        try:
            with self._transaction(single=one) as conn:
                if values and one:
                    row["value"], row["value_type"] = models.TrialValueModel.value_to_stored_repr(values[0])
                    done = conn.execute(_finish_with_value(), row, execution_options=_ROWCOUNT).rowcount
                else:
                    done = conn.execute(_FINISH, row, execution_options=_ROWCOUNT).rowcount
                    if done:
                        self._write_values(conn, trial_id, values)
                if not done:
                    self._check_updatable(conn, trial_id)
                    return False  # not expected: a finished trial stays finished
        except sqlalchemy.exc.IntegrityError:
            return False
        return True

    def _write_values(self, conn: sqlalchemy.Connection, trial_id: int, values: Sequence[float] | None) -> None:
        statement = _upsert(_VALUES, ("objective",), ("value", "value_type"), self._dialect)
        for objective, v in enumerate(values or ()):
            value, kind = models.TrialValueModel.value_to_stored_repr(v)
            conn.execute(statement, {"trial_id": trial_id, "objective": objective, "value": value, "value_type": kind})

    def record_heartbeat(self, trial_id: int) -> None:
        # Optuna's reads the row, then the server's clock, then writes it: one upsert here, dated
        # by the server's clock as Optuna's stale-trial query expects.
        with self._transaction(single=True) as conn:
            conn.execute(_heartbeat(self._dialect), {"trial_id": trial_id})

    @functools.cached_property
    def _dialect(self) -> str:
        return self.engine.dialect.name

    # Plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, ignore_integrity_error: bool = False, single: bool = False) -> Iterator[sqlalchemy.Connection]:
        """A connection in a transaction, committed at the end of the block. `single`: the block
        needs none, being one write, or reads that read committed gives a snapshot each anyway;
        on PostgreSQL each of its statements then commits by itself, without the BEGIN and COMMIT
        that psycopg sends as round trips of their own (a third of a report's)."""
        try:
            if single and self.engine.dialect.name == "postgresql":
                # psycopg's autocommit is a client-side switch, set and reset at no round trip.
                with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    yield conn
                return
            with self.engine.begin() as conn:
                yield conn
        except sqlalchemy.exc.IntegrityError:
            if not ignore_integrity_error:
                raise
        except sqlalchemy.exc.SQLAlchemyError as err:
            raise StorageInternalError(f"the database failed a trial's read or write: {type(err).__name__}") from err

    @contextmanager
    def _updating(self, trial_id: int, *, ignore_integrity_error: bool = False,
                  for_update: bool = False) -> Iterator[tuple[sqlalchemy.Connection, Any]]:
        """A transaction on an existing, unfinished trial; yields it and the trial's study id and state."""
        with self._transaction(ignore_integrity_error) as conn:
            yield conn, self._check_updatable(conn, trial_id, lock=for_update)


def ping_when_idle(engine: sqlalchemy.Engine) -> None:
    """Checks a pooled connection with ``SELECT 1`` before it is used, if it has been idle for
    `IDLE_PING_S`; a dead one is replaced (the pool retries with a new connection).

    SQLAlchemy's ``pool_pre_ping`` pings at every checkout, i.e. once per storage call: a round
    trip and a statement on the server for each of a trial's dozen calls, and 10-15 % of a
    PostgreSQL worker's CPU. A connection used a moment ago is alive but for a server restart in
    between; then its statement fails, SQLAlchemy drops the pool's connections, and the caller's
    retry (`hpo.outage`) gets a new one.
    """
    if getattr(engine.pool, "_hpo_idle_ping", False):
        return
    engine.pool._hpo_idle_ping = True  # type: ignore[attr-defined]

    @sqlalchemy.event.listens_for(engine.pool, "checkin")
    def used(dbapi_connection: Any, record: Any) -> None:
        record.info["hpo_used"] = time.monotonic()

    @sqlalchemy.event.listens_for(engine.pool, "checkout")
    def ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        last = record.info.get("hpo_used")
        if last is not None and time.monotonic() - last < IDLE_PING_S:
            return
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
            # The ping began a transaction (outside autocommit): it must not hold the connection
            # in one, which would also keep an autocommit switch from being made.
            dbapi_connection.rollback()
        except Exception as err:
            raise sqlalchemy.exc.DisconnectionError(str(err)) from err


_UNFINISHED = [TrialState.RUNNING, TrialState.WAITING]
# SQLAlchemy keeps an INSERT's row count only when asked: the writes that check a trial in the
# statement itself read it to learn whether they wrote.
_ROWCOUNT = {"preserve_rowcount": True}
# The dialects that reach this module (`hpo.storage` opens only these), each with its upsert.
_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert, "mysql": mysql.insert, "mariadb": mysql.insert}

# Each statement is built once, with named parameters, and run with their values: SQLAlchemy
# then compiles it once per dialect (its cache) and skips building the expression and its cache
# key on every call, which cost a worker on PostgreSQL 1.2-1.5 ms of CPU a statement (0.45 built once).
_STUDIES = models.StudyModel.__table__
_STUDY = sqlalchemy.select(_STUDIES.c.study_id).where(_STUDIES.c.study_id == sqlalchemy.bindparam("study_id"))
_STUDY_LOCKED = _STUDY.with_for_update()
_BY_ID = _TRIALS.c.trial_id == sqlalchemy.bindparam("id")
_STATE = sqlalchemy.select(_TRIALS.c.study_id, _TRIALS.c.state).where(_BY_ID)
_STATE_LOCKED = _STATE.with_for_update()
_NEW_TRIAL = _TRIALS.insert()  # the columns are those given
_SET_TRIAL = _TRIALS.update().where(_BY_ID)  # sets the columns given besides "id"
_FINISH = _TRIALS.update().where(_BY_ID, _TRIALS.c.state.in_(_UNFINISHED)).values(
    state=sqlalchemy.bindparam("state_", type_=_TRIALS.c.state.type),
    datetime_complete=sqlalchemy.bindparam("complete", type_=_TRIALS.c.datetime_complete.type))
_EARLIER = sqlalchemy.select(sqlalchemy.func.count(_TRIALS.c.trial_id)).where(
    _TRIALS.c.study_id == sqlalchemy.bindparam("study_id"), _TRIALS.c.trial_id < sqlalchemy.bindparam("id"))
_NEW_PARAM = _PARAMS.insert()
# A trial's row, numbered as it is made by the count of the study's trials: the study's row lock,
# which the caller holds (as Optuna's does), keeps two from counting the same (on SQLite, its one
# writer at a time).
_NEW_NUMBERED_TRIAL = _TRIALS.insert().values(
    number=sqlalchemy.select(sqlalchemy.func.count(_TRIALS.c.trial_id))
    .where(_TRIALS.c.study_id == sqlalchemy.bindparam("sid")).scalar_subquery(),
    study_id=sqlalchemy.bindparam("sid"), state=sqlalchemy.bindparam("state_", type_=_TRIALS.c.state.type),
    datetime_start=sqlalchemy.bindparam("start", type_=_TRIALS.c.datetime_start.type),
    datetime_complete=sqlalchemy.bindparam("complete", type_=_TRIALS.c.datetime_complete.type),
).returning(_TRIALS.c.trial_id, _TRIALS.c.number)


def _row_of_unfinished(table: sqlalchemy.Table, columns: Sequence[str]) -> sqlalchemy.Select:
    """The row of `columns` given as parameters, selected from the trial "trial_id"'s row: nothing
    unless that trial is unfinished."""
    return sqlalchemy.select(*(sqlalchemy.bindparam(c, type_=table.c[c].type).label(c) for c in columns)).where(
        _TRIALS.c.trial_id == sqlalchemy.bindparam("trial_id"), _TRIALS.c.state.in_(_UNFINISHED))


@functools.cache
def _upsert(table: sqlalchemy.Table, key: tuple[str, ...], values: tuple[str, ...], dialect: str,
            unfinished: bool = False) -> sqlalchemy.Executable:
    """Inserts the row "trial_id" + `key` + `values`, or updates `values` where a row with that key
    exists (each of Optuna's child tables has a unique constraint on it). `unfinished`: the row
    comes from `_row_of_unfinished`."""
    columns = ("trial_id", *key, *values)
    insert = _INSERTS[dialect](table)
    if unfinished:
        insert = insert.from_select(list(columns), _row_of_unfinished(table, columns))
    else:
        insert = insert.values({c: sqlalchemy.bindparam(c, type_=table.c[c].type) for c in columns})
    update = {c: sqlalchemy.bindparam(c, type_=table.c[c].type) for c in values}
    if dialect in ("mysql", "mariadb"):
        return insert.on_duplicate_key_update(update)
    return insert.on_conflict_do_update(index_elements=["trial_id", *key], set_=update)


@functools.cache
def _new_param(dialect: str) -> sqlalchemy.Executable:
    """A parameter's row, written only while its trial is unfinished (a duplicate fails)."""
    columns = ["trial_id", "param_name", "param_value", "distribution_json"]
    return _PARAMS.insert().from_select(columns, _row_of_unfinished(_PARAMS, columns))


# A statement's bound values stay well under SQLite's oldest limit (999).
_PARAMS_PER_STATEMENT = 100


@functools.cache
def _new_params(n: int) -> sqlalchemy.Executable:
    """`n` parameters' rows ("name0", "value0", "json0", ...) of the trial "trial_id", written only
    while it is unfinished; all or none (a duplicate fails the statement)."""
    def column(name: str, i: int) -> Any:
        return sqlalchemy.bindparam(f"{name}{i}", type_=_PARAMS.c[_PARAM_COLUMNS[name]].type).label(_PARAM_COLUMNS[name])

    given = sqlalchemy.union_all(*(sqlalchemy.select(*(column(name, i) for name in _PARAM_COLUMNS)) for i in range(n)))
    rows = given.subquery("given")
    select = sqlalchemy.select(_TRIALS.c.trial_id, *rows.c).select_from(_TRIALS.join(rows, sqlalchemy.true())).where(
        _TRIALS.c.trial_id == sqlalchemy.bindparam("trial_id"), _TRIALS.c.state.in_(_UNFINISHED))
    return _PARAMS.insert().from_select(["trial_id", *_PARAM_COLUMNS.values()], select)


_PARAM_COLUMNS = {"name": "param_name", "value": "param_value", "json": "distribution_json"}


@functools.cache
def _finish_with_value() -> sqlalchemy.Executable:
    """PostgreSQL: `_FINISH` and the upsert of its one objective's "value" and "value_type", which
    writes a row only where the update did (a data-modifying WITH)."""
    done = _FINISH.returning(_TRIALS.c.trial_id).cte("done")
    columns = ["trial_id", "objective", "value", "value_type"]
    insert = postgresql.insert(_VALUES).add_cte(done).from_select(columns, sqlalchemy.select(
        done.c.trial_id, sqlalchemy.literal(0, sqlalchemy.Integer()).label("objective"),
        *(sqlalchemy.bindparam(c, type_=_VALUES.c[c].type).label(c) for c in columns[2:])))
    return insert.on_conflict_do_update(index_elements=columns[:2],
                                        set_={c: insert.excluded[c] for c in columns[2:]})


@functools.cache
def _heartbeat(dialect: str) -> sqlalchemy.Executable:
    now = sqlalchemy.func.current_timestamp()
    insert = _INSERTS[dialect](_HEARTBEATS).values(trial_id=sqlalchemy.bindparam("trial_id"), heartbeat=now)
    if dialect in ("mysql", "mariadb"):
        return insert.on_duplicate_key_update(heartbeat=now)
    return insert.on_conflict_do_update(index_elements=["trial_id"], set_={"heartbeat": now})


@functools.cache
def _reads(study: tuple[bool, bool, bool] | None, dialect: str) -> sqlalchemy.Select:
    """The query of `_read_trials`. None: of the trial "id". Else of the study "study_id"'s trials,
    filtered by (its "states", the ids "included" or greater than "greater", the ids greater
    than "greater")."""
    if study is None:
        where = _BY_ID
    else:
        states, included, greater = study
        where = _TRIALS.c.study_id == sqlalchemy.bindparam("study_id")
        if states:
            where &= _TRIALS.c.state.in_(sqlalchemy.bindparam("states", expanding=True, type_=_TRIALS.c.state.type))
        after = _TRIALS.c.trial_id > sqlalchemy.bindparam("greater")
        if included and dialect == "postgresql":
            # One array parameter, not one per id: the statement's text stays the same, and
            # psycopg prepares it (PostgreSQL then plans it once, not at every read).
            ids = sqlalchemy.bindparam("included", type_=postgresql.ARRAY(sqlalchemy.Integer()))
            where &= sqlalchemy.or_(_TRIALS.c.trial_id == sqlalchemy.any_(ids), after)
        elif included:
            ids = sqlalchemy.bindparam("included", expanding=True, type_=sqlalchemy.Integer())
            where &= sqlalchemy.or_(_TRIALS.c.trial_id.in_(ids), after)
        elif greater:
            where &= after
    return _rows(where, dialect)


def _read_trials(conn: sqlalchemy.Connection, query: sqlalchemy.Select, params: dict[str, Any]) -> list[FrozenTrial]:
    """The trials that `query` (`_reads`) selects with `params`, with their rows from the five
    child tables, in one statement (a snapshot of them), where the ORM sent six and built an
    object per row."""
    trials: list[tuple[Any, ...]] = []
    parts: dict[int, tuple[dict, ...]] = {}
    # Fetched at once: row by row, SQLAlchemy and psycopg cost a fifth of a read's CPU.
    for kind, trial_id, number, name, value, text, start, complete in conn.execute(query, params).all():
        if kind == _ROW:
            trials.append((trial_id, number, TrialState[text], start, complete))
            parts[trial_id] = ({}, {}, {}, {}, {}, {})
            continue
        part = parts.get(trial_id)
        if part is None:  # not expected: the statement reads one snapshot of the trials and their rows
            continue
        params_, dists, values, reports, user, system = part
        if kind == _PARAM:
            dist = _distribution(text)
            params_[name], dists[name] = dist.to_external_repr(value), dist
        elif kind == _VALUE:
            values[number] = models.TrialValueModel.stored_repr_to_value(value, _VALUE_TYPES[text])
        elif kind == _REPORT:
            reports[number] = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(
                value, _REPORT_TYPES[text])
        else:
            (user if kind == _USER else system)[name] = json.loads(text)
    frozen = []
    for trial_id, number, state, start, complete in trials:
        params_, dists, values, reports, user, system = parts[trial_id]
        frozen.append(FrozenTrial(
            number=number, state=state, value=None,
            values=[values.get(i, 0) for i in range(max(values) + 1)] if values else None,
            datetime_start=_local(start), datetime_complete=_local(complete),
            params=params_, distributions=dists, user_attrs=user, system_attrs=system,
            intermediate_values=reports, trial_id=trial_id))
    return frozen


_ROW, _PARAM, _VALUE, _REPORT, _USER, _SYSTEM = range(-1, 5)
_VALUE_TYPES = {t.name: t for t in models.TrialValueModel.TrialValueType}
_REPORT_TYPES = {t.name: t for t in models.TrialIntermediateValueModel.TrialIntermediateValueType}


def _rows(where: sqlalchemy.ColumnElement[bool], dialect: str) -> sqlalchemy.Select:
    """The rows of the trials matching `where`, then every child row of theirs, as (kind, trial
    id, number: trial number, objective or step, name: parameter or attribute key, value, text:
    trial state, distribution, value type or JSON, start, complete): the trials by id, each
    table's rows in the order they were written (as the ORM lists them)."""
    ids: Any = sqlalchemy.select(_TRIALS.c.trial_id).where(where)
    if dialect == "postgresql":
        # The ids as one array, computed once: PostgreSQL then reads each table's rows of these
        # trials by its index. Given `IN (subquery)`, it hashed the trials and scanned every
        # table whole, every study's rows: 10-15 ms of the server's CPU a read, growing with the
        # database.
        ids = sqlalchemy.cast(sqlalchemy.select(sqlalchemy.func.array_agg(_TRIALS.c.trial_id)).where(where)
                              .scalar_subquery(), postgresql.ARRAY(sqlalchemy.Integer()))
    none, name = sqlalchemy.null(), sqlalchemy.String(16)

    def of_trials(table: sqlalchemy.Table) -> sqlalchemy.ColumnElement[bool]:
        return table.c.trial_id == sqlalchemy.any_(ids) if dialect == "postgresql" else table.c.trial_id.in_(ids)

    def part(kind: int, table: sqlalchemy.Table, number: Any, name: Any, value: Any, text: Any) -> sqlalchemy.Select:
        # Only the enums are cast (to their names): a cast of the floats would lose precision on
        # MySQL, whose CAST(... AS FLOAT) is single precision.
        primary = next(iter(table.primary_key.columns))
        return sqlalchemy.select(
            sqlalchemy.literal(kind, sqlalchemy.Integer()).label("kind"), table.c.trial_id, number.label("number"),
            name.label("name"), value.label("value"), text.label("text"), none.label("start"), none.label("complete"),
            primary.label("row_id"),
        ).where(of_trials(table))

    # The trials' own rows (kind _ROW) come first: a union's column types are those of its first part.
    trials = sqlalchemy.select(
        sqlalchemy.literal(_ROW, sqlalchemy.Integer()).label("kind"), _TRIALS.c.trial_id, _TRIALS.c.number,
        none.label("name"), sqlalchemy.type_coerce(none, _VALUES.c.value.type).label("value"),
        sqlalchemy.cast(_TRIALS.c.state, name).label("text"), _TRIALS.c.datetime_start.label("start"),
        _TRIALS.c.datetime_complete.label("complete"), _TRIALS.c.trial_id.label("row_id"),
    ).where(where)
    union = sqlalchemy.union_all(
        trials,
        part(_PARAM, _PARAMS, none, _PARAMS.c.param_name, _PARAMS.c.param_value, _PARAMS.c.distribution_json),
        part(_VALUE, _VALUES, _VALUES.c.objective, none, _VALUES.c.value, sqlalchemy.cast(_VALUES.c.value_type, name)),
        part(_REPORT, _REPORTS, _REPORTS.c.step, none, _REPORTS.c.intermediate_value,
             sqlalchemy.cast(_REPORTS.c.intermediate_value_type, name)),
        part(_USER, _USER_ATTRS, none, _USER_ATTRS.c.key, none, _USER_ATTRS.c.value_json),
        part(_SYSTEM, _SYSTEM_ATTRS, none, _SYSTEM_ATTRS.c.key, none, _SYSTEM_ATTRS.c.value_json),
    ).subquery()
    return sqlalchemy.select(union.c.kind, union.c.trial_id, union.c.number, union.c.name, union.c.value,
                             union.c.text, union.c.start, union.c.complete).order_by(union.c.kind, union.c.row_id)


@functools.lru_cache(maxsize=4096)
def _distribution(text: str) -> distributions.BaseDistribution:
    # A study has a handful of distinct distributions, each parsed from JSON per row by the ORM.
    return distributions.json_to_distribution(text)


def _utc(local: datetime.datetime | None) -> datetime.datetime | None:
    # How Optuna's trial model stores a datetime: naive UTC (a naive one is taken as local time).
    return None if local is None else local.astimezone(datetime.timezone.utc).replace(tzinfo=None)


def _local(stored: datetime.datetime | None) -> datetime.datetime | None:
    # Stored as naive UTC; Optuna's trials carry naive local time.
    if stored is None:
        return None
    return stored.replace(tzinfo=datetime.timezone.utc).astimezone().replace(tzinfo=None)
