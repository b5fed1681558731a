"""Optuna's RDB storage with its hot statements in SQLAlchemy Core: the same tables, the same rows.

A worker on PostgreSQL spent most of its CPU in SQLAlchemy's ORM: reading a trial built a
model object per row of six tables (6-10 ms a read on the 2-core machine, three reads a trial),
and each report, parameter, attribute and state change loaded the trial's ORM object first
(3-5 ms each). `FastRDBStorage` overrides exactly those calls with Core statements on Optuna's
own table objects (`optuna.storages._rdb.models`), so column names, types and enums are
Optuna's, and Optuna's CLI, dashboard and `RDBStorage` read what it writes. It keeps Optuna's
semantics: the trial must exist (`KeyError`) and be unfinished (`UpdateFinishedTrialError`); a
duplicate parameter, report or attribute write that loses a race is ignored as Optuna ignores
it; database errors become `StorageInternalError`; datetimes are stored as naive UTC and read
as naive local time. A heartbeat is one upsert of Optuna's row; everything else (studies, the
stale-trial query) is Optuna's.
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
        ping_when_idle(self.engine)

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)  # a new engine
        ping_when_idle(self.engine)

    # Reads ---------------------------------------------------------------------------------

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._transaction(single=True) as conn:
            trials = _read_trials(conn, _TRIALS.c.trial_id == trial_id)
        if not trials:
            raise KeyError(models.NOT_FOUND_MSG)
        return trials[0]

    def _get_trials(self, study_id: int, states: Container[TrialState] | None, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[FrozenTrial]:
        included = [i for i in included_trial_ids if i <= trial_id_greater_than]
        where = _TRIALS.c.study_id == study_id
        if states is not None:
            where &= _TRIALS.c.state.in_(list(states))  # type: ignore[call-overload]
        if included and trial_id_greater_than > -1:
            where &= sqlalchemy.or_(_TRIALS.c.trial_id.in_(included), _TRIALS.c.trial_id > trial_id_greater_than)
        elif trial_id_greater_than > -1:
            where &= _TRIALS.c.trial_id > trial_id_greater_than
        with self._transaction(single=True) as conn:
            trials = _read_trials(conn, where)
            if not trials and conn.execute(sqlalchemy.select(models.StudyModel.__table__.c.study_id).where(
                    models.StudyModel.__table__.c.study_id == study_id)).first() is None:
                raise KeyError(models.NOT_FOUND_MSG)
        return trials

    # Writes --------------------------------------------------------------------------------

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        studies = models.StudyModel.__table__
        for attempt in range(5):  # as Optuna: the study's row lock may deadlock under load (retried)
            try:
                with self._transaction() as conn:
                    # The study's row is locked while the trial's number is counted, as Optuna does.
                    if conn.execute(sqlalchemy.select(studies.c.study_id).where(studies.c.study_id == study_id)
                                    .with_for_update()).first() is None:
                        raise KeyError(models.NOT_FOUND_MSG)
                    return self._insert_trial(conn, study_id, template_trial)
            except StorageInternalError as err:
                # A lost connection is not retried here: its commit may have gone through, and a
                # second trial would be made. The caller's outage handling (`hpo.outage`) decides.
                if attempt == 4 or getattr(err.__cause__, "connection_invalidated", False):
                    raise
                time.sleep(random.random() * 2.0)
        raise AssertionError("unreachable")

    def _insert_trial(self, conn: sqlalchemy.Connection, study_id: int, template: FrozenTrial | None) -> FrozenTrial:
        """The new trial's row and, from `template`, its child rows; its number counted last."""
        start = _utc(template.datetime_start) if template is not None else _utc(datetime.datetime.now())
        complete = _utc(template.datetime_complete) if template is not None else None
        trial_id = conn.execute(_TRIALS.insert().values(
            study_id=study_id, number=None, state=TrialState.RUNNING, datetime_start=start,
            datetime_complete=complete)).inserted_primary_key[0]
        state = TrialState.RUNNING
        if template is not None:
            values = template.values if template.values is not None and len(template.values) > 1 else (
                [template.value] if template.value is not None else [])
            for objective, value in enumerate(values):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                conn.execute(_VALUES.insert().values(trial_id=trial_id, objective=objective, value=stored, value_type=kind))
            for name, value in template.params.items():
                dist = template.distributions[name]
                self._check_distribution(conn, study_id, name, dist, None)
                conn.execute(_PARAMS.insert().values(trial_id=trial_id, param_name=name, param_value=dist.to_internal_repr(value),
                                                     distribution_json=distributions.distribution_to_json(dist)))
            for table, attrs in ((_USER_ATTRS, template.user_attrs), (_SYSTEM_ATTRS, template.system_attrs)):
                if attrs:
                    conn.execute(table.insert(), [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                                                  for k, v in attrs.items()])
            for step, value in template.intermediate_values.items():
                stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
                conn.execute(_REPORTS.insert().values(trial_id=trial_id, step=step, intermediate_value=stored,
                                                      intermediate_value_type=kind))
            state = template.state
        number = conn.execute(sqlalchemy.select(sqlalchemy.func.count(_TRIALS.c.trial_id)).where(
            _TRIALS.c.study_id == study_id, _TRIALS.c.trial_id < trial_id)).scalar_one()
        conn.execute(_TRIALS.update().where(_TRIALS.c.trial_id == trial_id).values(number=number, state=state))
        if template is not None:
            frozen = copy.deepcopy(template)
            frozen.number, frozen.datetime_start, frozen._trial_id = number, _local(start), trial_id
            return frozen
        return FrozenTrial(number=number, state=state, value=None, values=None, datetime_start=_local(start),
                           datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
                           intermediate_values={}, trial_id=trial_id)

    def _check_distribution(self, conn: sqlalchemy.Connection, study_id: int, name: str,
                            distribution: distributions.BaseDistribution,
                            previous: distributions.BaseDistribution | None) -> None:
        """Raises where `distribution` cannot share parameter `name` with the study's earlier trials."""
        if previous is None:
            previous = self._distributions.get((study_id, name))
        if previous is None:
            row = conn.execute(
                sqlalchemy.select(_PARAMS.c.distribution_json)
                .select_from(_PARAMS.join(_TRIALS, _PARAMS.c.trial_id == _TRIALS.c.trial_id))
                .where(_TRIALS.c.study_id == study_id, _PARAMS.c.param_name == name).limit(1)
            ).first()
            if row is not None:
                previous = _distribution(row[0])
        if previous is not None:
            distributions.check_distribution_compatibility(previous, distribution)
        self._distributions.setdefault((study_id, name), previous or distribution)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        value, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(intermediate_value)
        self._upsert_unfinished(_REPORTS, trial_id, {"step": step},
                                {"intermediate_value": value, "intermediate_value_type": kind})

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(_USER_ATTRS, trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(_SYSTEM_ATTRS, trial_id, key, value)

    def _set_attr(self, table: sqlalchemy.Table, trial_id: int, key: str, value: Any) -> None:
        self._upsert_unfinished(table, trial_id, {"key": key}, {"value_json": json.dumps(value)})

    def _upsert_unfinished(self, table: sqlalchemy.Table, trial_id: int, key: dict[str, Any],
                           values: dict[str, Any]) -> None:
        """`_upsert` of a child row of a trial, made only while the trial is unfinished: Optuna's
        check, which `_updating` makes with a statement of its own first, is the write's own
        condition. A write that touched no row reads the trial to raise what Optuna raises; if it
        is unfinished after all, the row already held these values (MySQL counts a row updated to
        its own values as unchanged)."""
        with self._transaction(ignore_integrity_error=True, single=True) as conn:
            statement = _upsert(table, {"trial_id": trial_id, **key}, values, conn.dialect.name, unfinished=trial_id)
            # SQLAlchemy keeps an INSERT's row count only when asked.
            if conn.execute(statement, execution_options={"preserve_rowcount": True}).rowcount > 0:
                return
            row = conn.execute(sqlalchemy.select(_TRIALS.c.state).where(_TRIALS.c.trial_id == trial_id)).first()
            if row is None:
                raise KeyError(models.NOT_FOUND_MSG)
            self.check_trial_is_updatable(trial_id, row.state)

    def _set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                         distribution: distributions.BaseDistribution,
                         previous_distribution: distributions.BaseDistribution | None) -> None:
        with self._updating(trial_id, ignore_integrity_error=True) as (conn, trial):
            self._check_distribution(conn, trial.study_id, param_name, distribution, previous_distribution)
            conn.execute(_PARAMS.insert().values(
                trial_id=trial_id, param_name=param_name, param_value=param_value_internal,
                distribution_json=distributions.distribution_to_json(distribution)))

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        try:
            with self._updating(trial_id, for_update=True) as (conn, trial):
                if values is not None:
                    for objective, v in enumerate(values):
                        value, kind = models.TrialValueModel.value_to_stored_repr(v)
                        conn.execute(_upsert(_VALUES, {"trial_id": trial_id, "objective": objective},
                                             {"value": value, "value_type": kind}, conn.dialect.name))
                if state == TrialState.RUNNING and trial.state != TrialState.WAITING:
                    return False  # as Optuna: the values above are still committed
                change: dict[str, Any] = {"state": state}
                now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
                if state == TrialState.RUNNING:
                    change["datetime_start"] = now
                if state.is_finished():
                    change["datetime_complete"] = now
                conn.execute(_TRIALS.update().where(_TRIALS.c.trial_id == trial_id).values(**change))
        except sqlalchemy.exc.IntegrityError:
            return False
        return True

    def record_heartbeat(self, trial_id: int) -> None:
        # Optuna's reads the row, then the server's clock, then writes it: one upsert here, dated
        # by the server's clock as Optuna's stale-trial query expects.
        with self._transaction(single=True) as conn:
            conn.execute(_upsert(_HEARTBEATS, {"trial_id": trial_id}, {"heartbeat": sqlalchemy.func.current_timestamp()},
                                 conn.dialect.name))

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
            query = sqlalchemy.select(_TRIALS.c.study_id, _TRIALS.c.state).where(_TRIALS.c.trial_id == trial_id)
            row = conn.execute(query.with_for_update() if for_update else query).first()
            if row is None:
                raise KeyError(models.NOT_FOUND_MSG)
            self.check_trial_is_updatable(trial_id, row.state)
            yield conn, row


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
# The dialects that reach this module (`hpo.storage` opens only these), each with its upsert.
_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert, "mysql": mysql.insert, "mariadb": mysql.insert}


def _upsert(table: sqlalchemy.Table, key: dict[str, Any], values: dict[str, Any], dialect: str,
            unfinished: int | None = None) -> sqlalchemy.Executable:
    """Inserts the row `key` + `values`, or updates `values` where a row with `key` exists (each
    of Optuna's child tables has a unique constraint on its key). With `unfinished` (a trial id),
    the row comes from a select of that trial's row, which yields nothing unless it is unfinished."""
    columns = {**key, **values}
    insert = _INSERTS[dialect](table)
    if unfinished is None:
        insert = insert.values(**columns)
    else:
        insert = insert.from_select(list(columns), sqlalchemy.select(
            *(sqlalchemy.literal(v, table.c[c].type).label(c) for c, v in columns.items())
        ).select_from(_TRIALS).where(_TRIALS.c.trial_id == unfinished, _TRIALS.c.state.in_(_UNFINISHED)))
    if dialect in ("mysql", "mariadb"):
        return insert.on_duplicate_key_update(**values)
    return insert.on_conflict_do_update(index_elements=list(key), set_=values)


def _read_trials(conn: sqlalchemy.Connection, where: sqlalchemy.ColumnElement[bool]) -> list[FrozenTrial]:
    """The trials matching `where`, with their rows from the five child tables: two queries,
    the second a union of the five, where the ORM sent six and built an object per row."""
    rows = conn.execute(sqlalchemy.select(
        _TRIALS.c.trial_id, _TRIALS.c.number, _TRIALS.c.state, _TRIALS.c.datetime_start,
        _TRIALS.c.datetime_complete).where(where).order_by(_TRIALS.c.trial_id)).all()
    if not rows:
        return []
    parts: dict[int, tuple[dict, ...]] = {row.trial_id: ({}, {}, {}, {}, {}, {}) for row in rows}
    # A trial created after the first query is not in `parts`: its rows are skipped.
    for kind, trial_id, number, name, value, text in conn.execute(_children(where)):
        part = parts.get(trial_id)
        if part is None:
            continue
        params, dists, values, reports, user, system = part
        if kind == _PARAM:
            dist = _distribution(text)
            params[name], dists[name] = dist.to_external_repr(value), dist
        elif kind == _VALUE:
            values[number] = models.TrialValueModel.stored_repr_to_value(value, _VALUE_TYPES[text])
        elif kind == _REPORT:
            reports[number] = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(
                value, _REPORT_TYPES[text])
        else:
            (user if kind == _USER else system)[name] = json.loads(text)
    trials = []
    for row in rows:
        params, dists, values, reports, user, system = parts[row.trial_id]
        trials.append(FrozenTrial(
            number=row.number, state=row.state, value=None,
            values=[values.get(i, 0) for i in range(max(values) + 1)] if values else None,
            datetime_start=_local(row.datetime_start), datetime_complete=_local(row.datetime_complete),
            params=params, distributions=dists, user_attrs=user, system_attrs=system,
            intermediate_values=reports, trial_id=row.trial_id))
    return trials


_PARAM, _VALUE, _REPORT, _USER, _SYSTEM = range(5)
_VALUE_TYPES = {t.name: t for t in models.TrialValueModel.TrialValueType}
_REPORT_TYPES = {t.name: t for t in models.TrialIntermediateValueModel.TrialIntermediateValueType}


def _children(where: sqlalchemy.ColumnElement[bool]) -> sqlalchemy.CompoundSelect:
    """Every child row of the trials matching `where`, as (kind, trial id, number: objective or
    step, name: parameter or attribute key, value, text: distribution, value type or JSON), each
    table's rows in the order they were written (as the ORM lists them)."""
    ids = sqlalchemy.select(_TRIALS.c.trial_id).where(where)

    def part(kind: int, table: sqlalchemy.Table, number: Any, name: Any, value: Any, text: Any) -> sqlalchemy.Select:
        # Only the enums are cast (to their names): a cast of the floats would lose precision on
        # MySQL, whose CAST(... AS FLOAT) is single precision.
        primary = next(iter(table.primary_key.columns))
        return sqlalchemy.select(
            sqlalchemy.literal(kind, sqlalchemy.Integer()).label("kind"), table.c.trial_id, number.label("number"),
            name.label("name"), value.label("value"), text.label("text"), primary.label("row_id"),
        ).where(table.c.trial_id.in_(ids))

    none, name = sqlalchemy.null(), sqlalchemy.String(16)
    union = sqlalchemy.union_all(
        part(_PARAM, _PARAMS, none, _PARAMS.c.param_name, _PARAMS.c.param_value, _PARAMS.c.distribution_json),
        part(_VALUE, _VALUES, _VALUES.c.objective, none, _VALUES.c.value, sqlalchemy.cast(_VALUES.c.value_type, name)),
        part(_REPORT, _REPORTS, _REPORTS.c.step, none, _REPORTS.c.intermediate_value,
             sqlalchemy.cast(_REPORTS.c.intermediate_value_type, name)),
        part(_USER, _USER_ATTRS, none, _USER_ATTRS.c.key, none, _USER_ATTRS.c.value_json),
        part(_SYSTEM, _SYSTEM_ATTRS, none, _SYSTEM_ATTRS.c.key, none, _SYSTEM_ATTRS.c.value_json),
    ).subquery()
    return sqlalchemy.select(union.c.kind, union.c.trial_id, union.c.number, union.c.name, union.c.value,
                             union.c.text).order_by(union.c.kind, union.c.row_id)


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
