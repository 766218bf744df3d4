"""Indexed reads and batched writes on the tables of Optuna's RDB storage, for the ledger.

Optuna answers "which trials wait", "is this cell queued already" and "how many trials are in
each state" by loading every unfinished trial of the study with all its parameters and
attributes (its cached storage does so on every read), and queues one trial per transaction. At
100,000 cells a claim would read 100,000 trials and queueing would take minutes. The queries
here touch only the rows they answer with, through two indexes created beside Optuna's own
(``create_indexes``: the trials of a study by state, the user attributes by value), and queue a
grid in batches of :data:`BATCH` trials per transaction.

They read and write Optuna's schema as its own models declare it (``optuna.storages._rdb.models``,
private Optuna: the tables' definitions, so a schema change shows here as a failing test in
tests/test_trial_table.py rather than as wrong rows). Every function takes the ``RDBStorage``
and runs in one transaction of its own; the caller retries (``ablate.locks.retry_busy``).
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Optional

import sqlalchemy as sa
from optuna.distributions import BaseDistribution, distribution_to_json, json_to_distribution
from optuna.storages import RDBStorage
from optuna.storages._rdb import models  # private Optuna: the tables' definitions (see above)
from optuna.trial import FrozenTrial, TrialState

BATCH = 1000  # trials queued per transaction

_TRIALS = models.TrialModel.__table__
_USER_ATTRS = models.TrialUserAttributeModel.__table__
_PARAMS = models.TrialParamModel.__table__

#: a study's trials in one state, in order: the next waiting trial, the running ones
_BY_STATE = sa.Index("ix_ablate_trials_study_state", _TRIALS.c.study_id, _TRIALS.c.state, _TRIALS.c.trial_id)
#: the trials that carry an attribute's value: the trials of one cell key
_BY_VALUE = sa.Index("ix_ablate_trial_user_attributes_value", _USER_ATTRS.c.key, _USER_ATTRS.c.value_json,
                     mysql_length={"value_json": 191})


def create_indexes(storage: RDBStorage) -> None:
    """Create the two indexes where they are missing (once per store; a no-op after that)."""
    for index in (_BY_STATE, _BY_VALUE):
        index.create(storage.engine, checkfirst=True)


def waiting(storage: RDBStorage, study_id: int, after: int = -1, limit: int = 64) -> list[tuple[int, int]]:
    """(trial id, number) of up to ``limit`` WAITING trials with an id above ``after``, oldest first."""
    query = (sa.select(_TRIALS.c.trial_id, _TRIALS.c.number)
             .where(_TRIALS.c.study_id == study_id, _TRIALS.c.state == TrialState.WAITING,
                    _TRIALS.c.trial_id > after)
             .order_by(_TRIALS.c.trial_id).limit(limit))
    with storage.engine.connect() as conn:
        return [(row.trial_id, row.number) for row in conn.execute(query)]


def user_attr(storage: RDBStorage, trial_ids: Iterable[int], key: str) -> dict[int, Any]:
    """The user attribute ``key`` of each of ``trial_ids`` that has one."""
    ids = list(trial_ids)
    if not ids:
        return {}
    query = sa.select(_USER_ATTRS.c.trial_id, _USER_ATTRS.c.value_json).where(
        _USER_ATTRS.c.key == key, _USER_ATTRS.c.trial_id.in_(ids))
    with storage.engine.connect() as conn:
        return {row.trial_id: json.loads(row.value_json) for row in conn.execute(query)}


def trials_with(storage: RDBStorage, study_id: int, key: str, value: Any,
                without: Optional[str] = None) -> list[tuple[int, TrialState]]:
    """(number, state) of the study's trials whose user attribute ``key`` is ``value`` (e.g. the
    trials of one cell), leaving out those that carry the attribute ``without``."""
    attr = _USER_ATTRS.alias("attr")
    query = (sa.select(_TRIALS.c.number, _TRIALS.c.state)
             .join(attr, attr.c.trial_id == _TRIALS.c.trial_id)
             .where(attr.c.key == key, attr.c.value_json == json.dumps(value), _TRIALS.c.study_id == study_id))
    if without is not None:
        query = query.where(~_has_attr(without))
    with storage.engine.connect() as conn:
        return [(row.number, row.state) for row in conn.execute(query)]


def values_and_states(storage: RDBStorage, study_id: int, key: str,
                      without: Optional[str] = None) -> list[tuple[Any, TrialState]]:
    """(value of the user attribute ``key``, state) of every trial of the study that has it,
    leaving out those that carry ``without``: in one query, e.g. every cell key and its states."""
    attr = _USER_ATTRS.alias("attr")
    query = (sa.select(attr.c.value_json, _TRIALS.c.state)
             .join(attr, attr.c.trial_id == _TRIALS.c.trial_id)
             .where(attr.c.key == key, _TRIALS.c.study_id == study_id))
    if without is not None:
        query = query.where(~_has_attr(without))
    with storage.engine.connect() as conn:
        return [(json.loads(row.value_json), row.state) for row in conn.execute(query)]


def state_counts(storage: RDBStorage, study_id: int, without: Optional[str] = None) -> dict[TrialState, int]:
    """How many of the study's trials are in each state (counted by the database), leaving out
    those that carry the user attribute ``without``."""
    query = (sa.select(_TRIALS.c.state, sa.func.count())
             .where(_TRIALS.c.study_id == study_id).group_by(_TRIALS.c.state))
    if without is not None:
        query = query.where(~_has_attr(without))
    with storage.engine.connect() as conn:
        return {row[0]: row[1] for row in conn.execute(query)}


def _has_attr(key: str):
    return sa.exists().where(_USER_ATTRS.c.trial_id == _TRIALS.c.trial_id, _USER_ATTRS.c.key == key)


def add_waiting(storage: RDBStorage, study_id: int,
                trials: list[tuple[dict[str, tuple[Any, BaseDistribution]], dict[str, Any]]]) -> None:
    """Queue ``trials``, each (parameters as {name: (value, distribution)}, user attributes), as
    WAITING trials numbered after the study's last, in transactions of :data:`BATCH`: what
    ``Study.add_trial`` of a WAITING trial writes, without a transaction per trial.

    The study's row is locked for each batch (as Optuna locks it to number a new trial), so
    trials created meanwhile by another process get numbers of their own."""
    studies = models.StudyModel.__table__
    for start in range(0, len(trials), BATCH):
        batch = trials[start:start + BATCH]
        with storage.engine.begin() as conn:
            conn.execute(sa.select(studies.c.study_id).where(studies.c.study_id == study_id).with_for_update())
            last = conn.execute(sa.select(sa.func.max(_TRIALS.c.number))
                                .where(_TRIALS.c.study_id == study_id)).scalar()
            first = -1 if last is None else last
            before = conn.execute(sa.select(sa.func.max(_TRIALS.c.trial_id))).scalar() or 0
            conn.execute(sa.insert(_TRIALS), [
                {"study_id": study_id, "number": first + 1 + i, "state": TrialState.WAITING, "datetime_start": None,
                 "datetime_complete": None} for i in range(len(batch))])
            # their ids, by number: the rows above the highest id before (the primary key's range), of this study
            numbered = dict(conn.execute(sa.select(_TRIALS.c.number, _TRIALS.c.trial_id).where(
                _TRIALS.c.trial_id > before, _TRIALS.c.study_id == study_id)).all())
            ids = [numbered[first + 1 + i] for i in range(len(batch))]
            params = [{"trial_id": tid, "param_name": name, "param_value": dist.to_internal_repr(value),
                       "distribution_json": distribution_to_json(dist)}
                      for tid, (ps, _) in zip(ids, batch) for name, (value, dist) in ps.items()]
            attrs = [{"trial_id": tid, "key": k, "value_json": json.dumps(v)}
                     for tid, (_, us) in zip(ids, batch) for k, v in us.items()]
            if params:
                conn.execute(sa.insert(_PARAMS), params)
            if attrs:
                conn.execute(sa.insert(_USER_ATTRS), attrs)


def first_distributions(storage: RDBStorage, study_id: int) -> dict[str, BaseDistribution]:
    """Each parameter's distribution in the study's first trial that has it (Optuna holds later
    trials of a categorical parameter to that one)."""
    first = (sa.select(sa.func.min(_PARAMS.c.param_id))
             .join(_TRIALS, _TRIALS.c.trial_id == _PARAMS.c.trial_id)
             .where(_TRIALS.c.study_id == study_id).group_by(_PARAMS.c.param_name))
    query = sa.select(_PARAMS.c.param_name, _PARAMS.c.distribution_json).where(_PARAMS.c.param_id.in_(first))
    with storage.engine.connect() as conn:
        return {row.param_name: json_to_distribution(row.distribution_json) for row in conn.execute(query)}


def system_attr_values(storage: RDBStorage, study_id: int, key: str) -> list[Any]:
    """The system attribute ``key`` of every trial of the study that has one (e.g. the retry
    histories Optuna's retry callback records)."""
    attrs = models.TrialSystemAttributeModel.__table__
    query = (sa.select(attrs.c.value_json).join(_TRIALS, _TRIALS.c.trial_id == attrs.c.trial_id)
             .where(attrs.c.key == key, _TRIALS.c.study_id == study_id))
    with storage.engine.connect() as conn:
        return [json.loads(row.value_json) for row in conn.execute(query)]


def light_trials(storage: RDBStorage, study_id: int, user_keys: Iterable[str], system_keys: Iterable[str] = (),
                 params: bool = False, states: Optional[Iterable[TrialState]] = None) -> list[FrozenTrial]:
    """Every trial of the study (in ``states``, if given), oldest first, with only the user and
    system attributes named (and its parameters where ``params``): four queries, where Optuna's
    own read loads every attribute, value and intermediate value of every trial through its
    object mapping."""
    system = models.TrialSystemAttributeModel.__table__
    where = [_TRIALS.c.study_id == study_id] + ([_TRIALS.c.state.in_(list(states))] if states is not None else [])
    of_study = sa.select(_TRIALS.c.trial_id).where(*where)
    with storage.engine.connect() as conn:
        rows = conn.execute(sa.select(_TRIALS.c.trial_id, _TRIALS.c.number, _TRIALS.c.state, _TRIALS.c.datetime_start,
                                      _TRIALS.c.datetime_complete)
                            .where(*where).order_by(_TRIALS.c.trial_id)).all()
        users, systems = _attrs(conn, _USER_ATTRS, of_study, user_keys), _attrs(conn, system, of_study, system_keys)
        found: dict[int, tuple[dict, dict]] = {}
        if params:
            for row in conn.execute(sa.select(_PARAMS).where(_PARAMS.c.trial_id.in_(of_study))):
                dist = json_to_distribution(row.distribution_json)
                values, dists = found.setdefault(row.trial_id, ({}, {}))
                values[row.param_name], dists[row.param_name] = dist.to_external_repr(row.param_value), dist
    return [FrozenTrial(number=r.number, state=r.state, value=None, datetime_start=r.datetime_start,
                        datetime_complete=r.datetime_complete, params=found.get(r.trial_id, ({}, {}))[0],
                        distributions=found.get(r.trial_id, ({}, {}))[1], user_attrs=users.get(r.trial_id, {}),
                        system_attrs=systems.get(r.trial_id, {}), intermediate_values={}, trial_id=r.trial_id)
            for r in rows]


def _attrs(conn, table, trial_ids, keys: Iterable[str]) -> dict[int, dict[str, Any]]:
    keys = list(keys)
    out: dict[int, dict[str, Any]] = {}
    if keys:
        query = sa.select(table.c.trial_id, table.c.key, table.c.value_json).where(
            table.c.key.in_(keys), table.c.trial_id.in_(trial_ids))
        for row in conn.execute(query):
            out.setdefault(row.trial_id, {})[row.key] = json.loads(row.value_json)
    return out
