"""The ledger: an Optuna study that is the shared queue of a grid's cells or a search's trials.

A grid enqueues one WAITING trial per unfinished cell, its varied values as the trial's
categorical parameters (``add_trial``; never GridSampler, which repeats configurations across
parallel workers). A worker claims a waiting trial with
the storage's conditional WAITING -> RUNNING update, which succeeds for exactly one worker,
trains it and tells the result. Dead workers are noticed two ways: a heartbeat that stopped
(Optuna's heartbeat, any machine) or, where the worker's process id means the same process
(:func:`ablate.liveness.process_space`), a process id that no longer exists; their trial is failed and its
cell enqueued again, to resume from its checkpoint.

A study is found by the spec's name, so two different specs that share a name share a study:
each grid worker claims only the cells of its own spec and leaves the others waiting for
their owner (a cell key is a hash of the whole configuration, so a cell both specs hold is
the same training and either may run it). A study is either a grid's or a search's, never both.

Optuna's public API has no filtered, atomic claim of a waiting trial and no heartbeat for
bare ask/tell, so the ledger uses a few private parts of Optuna; they stay in this module,
each marked "private Optuna:" with the reason, and tests/test_ledger.py exercises every one
against the installed version:
- ``FrozenTrial._trial_id``/``Trial._trial_id``: the id the storage calls below take;
- ``storage.set_trial_state_values(id, RUNNING)``: the conditional WAITING -> RUNNING update
  that ``Study.ask`` itself uses to pop a waiting trial, here restricted to our cells;
- ``optuna.Trial(study, id)``: the claimed trial as a ``Trial`` (what ``Study.ask`` returns);
- ``storage.record_heartbeat(id)``: what ``Study.optimize``'s heartbeat thread records;
- ``storage._get_stale_trial_ids(study_id)``: the trials ``fail_stale_trials`` would fail, for a
  reader (``ablate status``) that must only look;
- the system attribute ``retry_history`` that ``RetryHeartbeatStaleTrialCallback.retry_history``
  reads, counted by the store (:data:`RETRY_HISTORY`);
- Optuna's table definitions, which :mod:`ablate.trial_table` queries directly: a claim, a count
  or a queueing must not read every trial of a grid of 100,000 cells, as Optuna's own reads do
  (tests/test_trial_table.py checks that those queries agree with Optuna's API).
Everything else (attributes, tell, retries, stale-trial recovery) goes through public calls.

Default storage: ``sqlite:///ablate-ledger.db`` in the working directory, beside MLflow's
default ``mlflow.db``; ``--storage postgresql://...`` or ``ABLATE_STORAGE`` for many machines.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Collection, Iterable, Optional

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from ablate import names, trial_table
from ablate.errors import AblateError
from ablate.launch.jobs import slurm_task
from ablate.liveness import process_space, worker_gone, worker_id
from ablate.locks import (StoreUnwritable, is_transient, retry_busy, sqlite_path, store_lock, store_retry_seconds,
                          unwritable, unwritable_error)
from ablate.search import make_pruner, make_sampler
from ablate.urls import display_url, mask_text

DEFAULT_STORAGE = "sqlite:///ablate-ledger.db"
LEDGER = "the ledger"
CLAIM_PAGE = 64  # waiting trials read at a time by a claim
#: the system attribute in which Optuna's retry callback lists the trials a retry stands for
#: (what ``RetryHeartbeatStaleTrialCallback.retry_history`` reads)
RETRY_HISTORY = "retry_history"
#: the user attributes of a trial that status and reports read
SHOWN_ATTRS = (names.CELL_KEY, names.DUPLICATE, names.WORKER, names.WORKER_SPACE, names.SLURM_TASK, names.FAILURE)
#: every call to the ledger's store: a busy store and a lost connection are retried (ablate.locks)
_retry = functools.partial(retry_busy, what=LEDGER)

optuna.logging.set_verbosity(optuna.logging.WARNING)
# heartbeats, the retry callback and metric names are marked experimental; they are the
# documented way to do this (only these: any other experimental feature still warns)
for _experimental in (r"Argument ``heartbeat_interval`` is an experimental feature",
                      r".*RetryHeartbeatStaleTrialCallback.* is experimental",
                      r".*fail_stale_trials is experimental", r".*set_metric_names is experimental"):
    warnings.filterwarnings("ignore", message=_experimental, category=optuna.exceptions.ExperimentalWarning)
# we keep the heartbeat ourselves around bare ask/tell (Ledger.heartbeat), not through optimize()
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def storage_url(option: Optional[str] = None) -> str:
    return option or os.environ.get("ABLATE_STORAGE") or DEFAULT_STORAGE


HEARTBEAT_ALLOWED = ("allowed: INTERVAL or INTERVAL,GRACE in whole seconds, INTERVAL at least 1 and GRACE more "
                     "than twice INTERVAL; default 30 (a grace of 4 x INTERVAL)")


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace) in seconds; ``ABLATE_HEARTBEAT=interval[,grace]`` overrides (tests use short ones).

    A grace of two intervals or less would let one late beat (a busy store, a slow disk) hand a
    live worker's cell to another: refused, as is anything but positive whole seconds.
    """
    raw = os.environ.get("ABLATE_HEARTBEAT", "").strip() or "30"
    parts = [p.strip() for p in raw.split(",")]
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise AblateError(f"ABLATE_HEARTBEAT: {raw!r} ({HEARTBEAT_ALLOWED})")
    interval = int(parts[0])
    grace = int(parts[1]) if len(parts) > 1 else 4 * interval
    if interval < 1:
        raise AblateError(f"ABLATE_HEARTBEAT: {raw!r}: an interval of {interval} s ({HEARTBEAT_ALLOWED})")
    if grace <= 2 * interval:
        raise AblateError(f"ABLATE_HEARTBEAT: {raw!r}: a grace of {grace} s is not more than twice the "
                          f"{interval} s interval ({HEARTBEAT_ALLOWED})")
    return interval, grace


#: Optuna's tables (its RDB schema, and alembic's record of the schema's version)
OPTUNA_TABLES = frozenset({
    "studies", "study_directions", "study_system_attributes", "study_user_attributes", "trial_heartbeats",
    "trial_intermediate_values", "trial_params", "trial_system_attributes", "trial_user_attributes",
    "trial_values", "trials", "version_info", "alembic_version"})


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    kwargs: dict = {"pool_pre_ping": True}  # a connection the server dropped is replaced, not used
    if url.startswith(("postgresql", "postgres")):  # a server cut off refuses in seconds, never hangs a worker
        kwargs["connect_args"] = {"connect_timeout": 10}
    return kwargs


def check_foreign_tables(url: str) -> set[str]:
    """Refuse a database that holds tables other than Optuna's (an MLflow store, an application's
    database): the ledger would add its tables beside them and share alembic's version table.
    Reads the table names only, and returns them; creates nothing (a missing SQLite file stays missing)."""
    path = sqlite_path(url)
    if path is not None and (not os.path.exists(path) or os.path.getsize(path) == 0):
        return set()
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **_engine_kwargs(url))
    try:
        tables = set(_retry(lambda: sqlalchemy.inspect(engine).get_table_names()))
    finally:
        engine.dispose()
    foreign = sorted(tables - OPTUNA_TABLES)
    if foreign:
        mlflow = {"experiments", "runs", "metrics"} <= tables
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise AblateError(f"ledger storage {display_url(url)}: holds another application's tables "
                          f"({'an MLflow store: ' if mlflow else ''}{shown}), not only an Optuna ledger's "
                          "(allowed: an empty database or an existing ledger, e.g. the default "
                          f"{DEFAULT_STORAGE}; MLflow's store goes in MLFLOW_TRACKING_URI)")
    return tables


def open_storage(url: str) -> RDBStorage:
    interval, grace = heartbeat_settings()
    store_retry_seconds()  # refused here, before anything is written, rather than at the first lost connection
    try:
        with store_lock(url):  # two processes creating the schema at once collide
            check_foreign_tables(url)
            storage = RDBStorage(url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=interval,
                                 grace_period=grace, heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
            trial_table.create_indexes(storage)
            return storage
    except AblateError:
        raise
    except Exception as e:  # bad URL, server down, missing driver, a full or read-only disk
        if unwritable(e) is not None:
            raise unwritable_error(e, LEDGER, url, "its tables") from None
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise AblateError(f"ledger storage {display_url(url)}: cannot open ({mask_text(first, url)})") from None


class TakenOver(Exception):
    """This worker's trial went to another worker (see :meth:`Ledger.check_owner`): stop writing."""


class NoLedger(AblateError):
    """The ledger store, or the spec's study in it, does not exist (nothing was launched there yet)."""


def open_existing_storage(url: str) -> RDBStorage:
    """The ledger store at ``url`` if it exists, for readers: creates no file, no table and no lock file."""
    path = sqlite_path(url)
    if path is not None and not os.path.exists(path):
        raise NoLedger(f"no ledger at {display_url(url)}")
    interval, grace = heartbeat_settings()
    try:
        if "studies" not in check_foreign_tables(url):  # an empty database: no ledger yet, not a broken one
            raise NoLedger(f"no ledger at {display_url(url)}")
        # no pool: a reader (status, its --follow every few seconds) holds no idle connection, which
        # would otherwise stay open until the garbage collector finds the storage's reference cycles
        return RDBStorage(url, engine_kwargs={**_engine_kwargs(url), "poolclass": sqlalchemy.pool.NullPool},
                          skip_table_creation=True, heartbeat_interval=interval, grace_period=grace,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
    except AblateError:
        raise
    except Exception as e:  # bad URL, server down, missing driver, not a ledger
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise AblateError(f"ledger storage {display_url(url)}: cannot open ({mask_text(first, url)})") from None


def param_label(value: Any) -> Any:
    """A setting's value as an Optuna categorical choice: scalars as they are, lists (explicit
    shift offsets) and the like as JSON text, as :func:`ablate.search.suggest` does."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def grid_distributions(cells: Iterable[Any]) -> dict[str, optuna.distributions.CategoricalDistribution]:
    """For each varied setting with values other than numbers, the categorical distribution of
    the values the grid gives it (numbers need none: see :func:`grid_params`)."""
    choices: dict[str, dict[str, Any]] = {}
    categorical: set[str] = set()
    for cell in cells:
        for k, v in cell.values.items():
            label = param_label(v)
            choices.setdefault(k, {}).setdefault(json.dumps(label), label)  # 1 and True stay apart
            if not _is_number(v):
                categorical.add(k)  # e.g. [null, 2]: the numbers are choices too
    return {k: optuna.distributions.CategoricalDistribution(list(choices[k].values())) for k in categorical}


def grid_params(values: dict[str, Any], distributions: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A grid cell's varied values as Optuna parameters and their distributions.

    A number is a one-point FloatDistribution: Optuna lets ranges differ from trial to trial,
    so a grid given more values later still records them. Any other value is a choice of the
    setting's categorical distribution, which Optuna fixes at its first use in a study: a value
    added to the grid after that is left out of the parameters (it stays in the trial's
    ``ablate.values`` attribute), rather than refused.
    """
    params, dists = {}, {}
    for k, v in values.items():
        known = distributions.get(k)
        if _is_number(v) and not isinstance(known, optuna.distributions.CategoricalDistribution):
            params[k], dists[k] = float(v), optuna.distributions.FloatDistribution(float(v), float(v))
        elif isinstance(known, optuna.distributions.CategoricalDistribution) and any(
                json.dumps(c) == json.dumps(param_label(v)) for c in known.choices):  # not 1 == True
            params[k], dists[k] = param_label(v), known
    return params, dists


def retried(trials: Iterable[optuna.trial.FrozenTrial]) -> set[int]:
    """The numbers of trials that a retry stands for now: a dead worker's trial, failed and enqueued again."""
    return {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}


def is_retry(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether ``trial`` is the retry of an interrupted one (it resumes a cell, it is not new work)."""
    return bool(RetryHeartbeatStaleTrialCallback.retry_history(trial))


def _once(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _trial_id(trial) -> int:
    # private Optuna: storage calls take the trial's id, which only this attribute exposes
    return trial._trial_id


class Ledger:
    """One study: the queue and record of a grid or a search."""

    def __init__(self, url: str, study_name: str, directions: Iterable[str] = ("maximize",),
                 sampler: Optional[optuna.samplers.BaseSampler] = None,
                 pruner: Optional[optuna.pruners.BasePruner] = None, kind: Optional[str] = None, *,
                 create: bool = True, metric_names: Optional[list[str]] = None):
        """``create=False`` opens only an existing store and study (raising :class:`NoLedger`) and writes nothing.
        ``metric_names`` name the objectives (the MLflow metrics) for optuna-dashboard, which
        otherwise calls them 0 and 1."""
        #: every call to the store: retried where a later attempt may mend it, said in one line where
        #: not (ablate.locks: a lost store, a full or read-only one, named by its file)
        self._retry = functools.partial(retry_busy, what=LEDGER, where=url)
        self.url, self.storage = url, open_storage(url) if create else open_existing_storage(url)
        self._taken: dict[int, str] = {}  # trial number -> why it is no longer this worker's
        self._full: dict[int, StoreUnwritable] = {}  # trial number -> its heartbeat found the store unwritable
        directions = list(directions)
        try:
            if not create:
                self.study = self._retry(optuna.load_study, study_name=study_name, storage=self.storage,
                                         sampler=sampler, pruner=pruner)
            else:
                self.study = self._retry(optuna.create_study, storage=self.storage, study_name=study_name,
                                         directions=directions, sampler=sampler, pruner=pruner, load_if_exists=True,
                                         writing=f"the study {study_name!r}")
        except optuna.exceptions.DuplicatedStudyError:  # created by a racing worker just now
            self.study = optuna.load_study(study_name=study_name, storage=self.storage, sampler=sampler, pruner=pruner)
        except KeyError:  # load_study: no such study
            raise NoLedger(f"no study {study_name!r} in the ledger at {display_url(url)}") from None
        self._study_id = self._retry(self.storage.get_study_id_from_name, study_name)
        got = [d.name.lower() for d in self.study.directions]
        if got != directions:
            raise AblateError(f"ledger {display_url(url)}: study {study_name!r} exists with objectives {got}, "
                              f"the spec asks for {directions} (allowed: rename the spec or use another --storage)")
        if kind is not None:
            self._check_kind(kind, record=create)
        if create and metric_names and self._retry(lambda: self.study.metric_names) != list(metric_names):
            self._retry(self.study.set_metric_names, list(metric_names), writing="the study's metric names")

    def _check_kind(self, kind: str, record: bool = True) -> None:
        """A grid's study holds cells, a search's trials: a search worker would take a grid's
        waiting cell for a retry of its own, so one name cannot serve both. ``record=False``
        (readers) checks without recording the kind of a study that has none yet."""
        if not record:
            found = self._retry(lambda: self.study.user_attrs).get(names.STUDY_KIND)
        else:
            with store_lock(self.url):  # a grid and a search opening a new study at once: one kind wins
                found = self._retry(lambda: self.study.user_attrs).get(names.STUDY_KIND)
                if found is None:
                    self._retry(self.study.set_user_attr, names.STUDY_KIND, kind, writing="the study's kind")
        if found not in (None, kind):
            raise AblateError(f"ledger {display_url(self.url)}: study {self.study.study_name!r} is a {found}'s, "
                              f"this spec describes a {kind} (allowed: another spec name, or another --storage)")

    # ---- reading -------------------------------------------------------------------------------
    @classmethod
    def for_spec(cls, spec, url: str, *, create: bool = True) -> "Ledger":
        """``spec``'s ledger at ``url``: a grid's queue, or a search's study with its sampler and pruner.
        ``create=False`` for readers: only an existing one (else :class:`NoLedger`), nothing written."""
        if spec.search is None:
            return cls(url, spec.name, kind=names.GRID, create=create, metric_names=[names.VAL_TOP1])
        objectives = spec.search.objectives
        return cls(url, spec.name, [o.direction for o in objectives], sampler=make_sampler(spec.search),
                   pruner=make_pruner(spec.search, spec.base.train.epochs), kind=names.SEARCH, create=create,
                   metric_names=[o.metric for o in objectives])

    def trials(self, states=None) -> list[optuna.trial.FrozenTrial]:
        """The study's trials in ``states`` (all by default), read from the store itself: Optuna's
        cached reads load every unfinished trial whatever the states asked for, so the running
        trials of a grid with 100,000 waiting cells cost as much as all of them."""
        return self._retry(self.storage.get_all_trials, self._study_id, deepcopy=False, states=states)

    def summaries(self, params: bool = False, states=None) -> list[optuna.trial.FrozenTrial]:
        """Every trial (in ``states``, if given) with what a reader shows of it: its cell, worker,
        failure and retries (and its parameters where ``params``), read in a few queries rather
        than as whole trials."""
        return self._retry(trial_table.light_trials, self.storage, self._study_id, SHOWN_ATTRS, (RETRY_HISTORY,),
                           params=params, states=states)

    def size(self) -> int:
        """How many trials the study holds, duplicates and retries included (counted by the store)."""
        return sum(self._retry(trial_table.state_counts, self.storage, self._study_id).values())

    def states_by_key(self) -> dict[str, set[TrialState]]:
        """Every cell key of the study and the states of its trials (duplicates left out), in one query."""
        out: dict[str, set[TrialState]] = {}
        for key, state in self._retry(trial_table.values_and_states, self.storage, self._study_id, names.CELL_KEY,
                                      without=names.DUPLICATE):
            out.setdefault(key, set()).add(state)
        return out

    # ---- a grid's queue ------------------------------------------------------------------------
    def enqueue_cells(self, cells: Iterable[Any]) -> tuple[int, int]:
        """Enqueue every cell that is neither finished nor waiting/running. Returns (enqueued, done)."""
        self.recover_dead()
        with store_lock(self.url):
            return self._enqueue_cells(cells)

    def _enqueue_cells(self, cells) -> tuple[int, int]:
        cells = list(cells)
        states = self.states_by_key()
        # a parameter's distribution is the study's: Optuna refuses another one later
        recorded = self._retry(trial_table.first_distributions, self.storage, self._study_id)
        distributions = {**grid_distributions(cells), **recorded}
        queued, done = [], 0
        for cell in cells:
            seen = states.get(cell.key, set())
            if TrialState.COMPLETE in seen:
                done += 1
            elif not seen & {TrialState.WAITING, TrialState.RUNNING}:
                # A waiting trial that already holds the cell's varied values as its parameters
                # (Study.enqueue_trial would hold them aside until a sampler's suggest call,
                # which a grid never makes): optuna-dashboard's pages need parameters.
                params, dists = grid_params(cell.values, distributions)
                queued.append(({k: (v, dists[k]) for k, v in params.items()},
                               {names.CELL_KEY: cell.key, names.VALUES: json.dumps(cell.values, default=str)}))
        self._retry(trial_table.add_waiting, self.storage, self._study_id, queued,
                    writing=f"{len(queued)} cell(s) into the queue")
        return len(queued), done

    def claim(self, keys: Optional[Collection[str]] = None) -> Optional[optuna.Trial]:
        """Atomically take one WAITING trial (RUNNING for exactly one worker), or None.

        With ``keys``, only a trial of one of those cells: a worker takes the cells of its own
        spec and leaves any other's waiting for its owner. The store lock makes the claim atomic
        on SQLite, which ignores Optuna's SELECT ... FOR UPDATE, and keeps two runners from
        enqueueing the same cell at once on any database.
        """
        with store_lock(self.url):
            return self._claim(keys)

    def _claim(self, keys: Optional[Collection[str]]) -> Optional[optuna.Trial]:
        after = -1  # waiting trials in pages, oldest first: a claim reads the first page, not the queue
        while page := self._retry(trial_table.waiting, self.storage, self._study_id, after, CLAIM_PAGE):
            after = page[-1][0]
            trial = self._claim_one_of(page, keys)
            if trial is not None:
                return trial
        return None

    def _claim_one_of(self, page: list[tuple[int, int]], keys: Optional[Collection[str]]) -> Optional[optuna.Trial]:
        cell_keys = self._retry(trial_table.user_attr, self.storage, [i for i, _ in page], names.CELL_KEY)
        for trial_id, number in page:
            key = cell_keys.get(trial_id)
            if keys is not None and key not in keys:
                continue
            # private Optuna: the trial as Study.ask would return it
            trial = optuna.Trial(self.study, trial_id)
            # marked before it is claimed: a worker killed in between (scancel, preemption, kill -9)
            # leaves a waiting trial whose stale mark the next claim overwrites, never a running
            # trial with no worker and no heartbeat, which nothing would ever take back
            self._mark_mine(trial)
            try:
                # private Optuna: the conditional update Study.ask pops a waiting trial with; its
                # public form pops any waiting trial, and we must pick ours
                if not self._retry(self.storage.set_trial_state_values, trial_id, TrialState.RUNNING,
                                   writing=f"the claim of trial {number}"):
                    continue  # another worker took it first
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # ... and has already finished it
            winner = self._first_claim(number, key)
            if winner is not None:  # two runners enqueued the same cell at once: keep the first
                self._retry(trial.set_user_attr, names.DUPLICATE, winner)
                self._retry(self.study.tell, trial, state=TrialState.FAIL)
                continue
            return trial
        return None

    def waiting_keys(self, keys: Collection[str]) -> bool:
        """Whether a trial of one of ``keys`` waits (read in pages, as a claim reads them)."""
        after = -1
        while page := self._retry(trial_table.waiting, self.storage, self._study_id, after, CLAIM_PAGE):
            after = page[-1][0]
            found = self._retry(trial_table.user_attr, self.storage, [i for i, _ in page], names.CELL_KEY)
            if any(k in keys for k in found.values()):
                return True
        return False

    def running_keys(self) -> set[str]:
        """The cell keys of the running trials (as many as there are workers)."""
        return {t.user_attrs[names.CELL_KEY] for t in self.trials(states=(TrialState.RUNNING,))
                if names.CELL_KEY in t.user_attrs}

    def ask(self) -> optuna.Trial:
        """A search's next trial: a waiting retry if there is one, else the sampler's proposal."""
        trial = self._retry(self.study.ask)
        self._mark_mine(trial)
        return trial

    def set_cell_key(self, trial: optuna.Trial, key: str) -> None:
        self._retry(trial.set_user_attr, names.CELL_KEY, key, writing=f"the cell of trial {trial.number}")

    def _mark_mine(self, trial: optuna.Trial) -> None:
        """Record which worker runs the trial and start its heartbeat record."""
        mine = f"the worker of trial {trial.number}"
        self._retry(trial.set_user_attr, names.WORKER, worker_id(), writing=mine)
        self._retry(trial.set_user_attr, names.WORKER_SPACE, process_space(), writing=mine)
        # always written: a retried trial inherits its dead worker's attributes
        self._retry(trial.set_user_attr, names.SLURM_TASK, slurm_task() or "", writing=mine)
        self._retry(self._record_heartbeat, trial, writing=f"the heartbeat of trial {trial.number}")

    def _record_heartbeat(self, trial: optuna.Trial) -> None:
        # private Optuna: Study.optimize keeps heartbeats with this call; bare ask/tell have none
        self.storage.record_heartbeat(_trial_id(trial))

    def _first_claim(self, number: int, key: Optional[str]) -> Optional[int]:
        """Number of an earlier live trial of the same cell, if any (then ours is the duplicate)."""
        if key is None:
            return None
        for other, state in self._retry(trial_table.trials_with, self.storage, self._study_id, names.CELL_KEY, key,
                                        without=names.DUPLICATE):
            if other != number and (state == TrialState.COMPLETE or (
                    other < number and state in (TrialState.WAITING, TrialState.RUNNING))):
                return other
        return None

    # ---- dead workers ----------------------------------------------------------------------------
    def recover_dead(self) -> list[int]:
        """Fail trials whose worker is gone and enqueue them again. Returns the failed numbers.

        A stale heartbeat tells a dead worker on any machine. A worker's process id is checked
        only where it names the same process (:func:`process_space`), which notices a dead
        worker of this machine at once instead of after the heartbeat's grace period.
        """
        before = {t.number: _trial_id(t) for t in self.trials(states=(TrialState.RUNNING,))}
        self._retry(optuna.storages.fail_stale_trials, self.study,  # heartbeat: any machine
                    writing="the cells of workers whose heartbeat stopped, queued again")
        for t in self.trials(states=(TrialState.RUNNING,)):
            space = t.user_attrs.get(names.WORKER_SPACE)  # a worker that recorded none is left to its heartbeat
            if space and worker_gone(str(t.user_attrs.get(names.WORKER, "")), space):
                try:
                    failed = self._retry(self.study.tell, t.number, state=TrialState.FAIL,
                                         writing=f"trial {t.number} of a worker that is gone")
                except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                    continue  # finished, or failed by another worker's recovery, since we read it
                self._retry(RetryHeartbeatStaleTrialCallback(), self.study, failed,
                            writing=f"the retry of trial {t.number}")
        # those no longer running, unless they finished meanwhile: a bounded read, one trial each
        return sorted(n for n, trial_id in before.items()
                      if self._retry(self.storage.get_trial, trial_id).state == TrialState.FAIL)

    def stale(self) -> set[int]:
        """Numbers of the RUNNING trials whose heartbeat is older than the grace period: their worker
        is gone, wherever it ran. Only reads (:meth:`recover_dead` is what fails and requeues them)."""
        # private Optuna: the query fail_stale_trials makes before it fails what it finds
        ids = set(self._retry(self.storage._get_stale_trial_ids, self._study_id))
        return {t.number for t in self.trials(states=(TrialState.RUNNING,)) if _trial_id(t) in ids}

    def release_gone(self, gone: Callable[[optuna.trial.FrozenTrial], bool]) -> list[int]:
        """Fail the RUNNING trials whose worker is known to be gone (``gone(trial)``, e.g. its Slurm
        task was cancelled or requeued) and enqueue them again, to resume from their checkpoints
        without waiting for their heartbeats to go stale. Returns the released trial numbers."""
        released = []
        for t in self.trials(states=(TrialState.RUNNING,)):
            if not gone(t):
                continue
            try:
                failed = self._retry(self.study.tell, t.number, state=TrialState.FAIL,
                                     writing=f"trial {t.number}, handed back to the queue")
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # finished, or failed by another worker's recovery, since we read it
            self._retry(RetryHeartbeatStaleTrialCallback(), self.study, failed,
                        writing=f"the retry of trial {t.number}")
            released.append(t.number)
        return released

    # ---- fencing: is the trial still this worker's? ---------------------------------------------
    def check_owner(self, trial: optuna.Trial, *, retry: bool = True) -> None:
        """Raise :class:`TakenOver` unless ``trial`` is still RUNNING and marked as this worker's.

        A heartbeat proves a worker was alive, not that it still owns its trial: a worker paused
        past the grace period (SIGSTOP, a suspended VM, a long network cut) finds its trial
        failed as stale and its cell queued again, maybe trained by another worker by now. It
        calls this before every write (an epoch's metrics, a checkpoint, the final record) and
        stops at the first refusal, so a cell's run and checkpoint only ever have one writer.
        """
        number = trial.number
        if number in self._taken:  # the heartbeat thread saw it already
            raise TakenOver(self._taken[number])
        if number in self._full:  # ... or that the store refuses writes: stop at this write, not at the cell's end
            raise self._full[number]
        frozen = (self._retry if retry else _once)(self.storage.get_trial, _trial_id(trial))
        worker = frozen.user_attrs.get(names.WORKER)
        mine = worker == worker_id() and frozen.user_attrs.get(names.WORKER_SPACE) == process_space()
        if frozen.state == TrialState.RUNNING and mine:
            return
        interval, grace = heartbeat_settings()
        why = (f"it is marked as worker {worker}'s" if frozen.state == TrialState.RUNNING else
               f"its heartbeat got older than the {grace} s grace period, as when this worker is paused or cut "
               "off from the ledger, so the cell was queued again for any worker")
        self._taken[number] = f"trial {number} is no longer this worker's: {why}; nothing more is written for it"
        raise TakenOver(self._taken[number])

    @contextmanager
    def heartbeat(self, trial: optuna.Trial):
        """Keep the trial's heartbeat while the body runs (bare ask/tell get none from Optuna).

        Each beat first checks that the trial is still this worker's (:meth:`check_owner`); once it
        is not, the beats stop and the next check raises :class:`TakenOver` without asking the store.
        A beat is one attempt: one that fails is said by :class:`Heartbeat` (past the grace period,
        for a lost connection), and the next beat tries again.
        """
        interval, grace = heartbeat_settings()

        def record():
            try:
                self.check_owner(trial, retry=False)
            except (TakenOver, StoreUnwritable):
                stop.set()  # not ours: no heartbeat either
                return
            try:
                self._record_heartbeat(trial)
            except Exception as e:
                if unwritable(e) is None:
                    raise
                # a full or read-only store: said once, by the worker's next write (check_owner)
                self._full[trial.number] = unwritable_error(e, LEDGER, self.url,
                                                            f"the heartbeat of trial {trial.number}")
                stop.set()

        beat = Heartbeat(record, trial.number, grace)
        stop = threading.Event()

        def beats():
            while not stop.wait(interval):
                beat()

        thread = threading.Thread(target=beats, name="ablate-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # ---- results ---------------------------------------------------------------------------------
    def tell(self, trial: optuna.Trial, state: TrialState, values=None, reason: Optional[str] = None) -> None:
        doing = f"the result ({state.name}) of trial {trial.number}"
        if reason:
            self._retry(trial.set_user_attr, names.FAILURE, reason[:2000], writing=doing)
        self._retry(self.study.tell, trial, values if state == TrialState.COMPLETE else None, state=state,
                    skip_if_finished=True, writing=doing)

    def search_counts(self) -> tuple[int, int, int]:
        """(finished, running, waiting) trials of a search: what its workers count against the target.

        Failed trials that were retried (a dead worker's trial, re-enqueued) and duplicates are not
        counted: their retry stands for them. Counted by the store, not by reading the trials.
        """
        counts = self.counts()
        superseded = {n for history in self._retry(trial_table.system_attr_values, self.storage, self._study_id,
                                                   RETRY_HISTORY) for n in history}
        running, waiting = counts.get("RUNNING", 0), counts.get("WAITING", 0)
        return sum(counts.values()) - running - waiting - len(superseded), running, waiting

    def counts(self, keys: Optional[set[str]] = None) -> dict[str, int]:
        """Cells (grid: by key) or trials (search) per state, duplicates left out."""
        if keys is not None:
            states = self.states_by_key()
            out = {"COMPLETE": 0, "RUNNING": 0, "WAITING": 0, "FAIL": 0}
            for key in keys:
                seen = states.get(key, set())
                for name in out:
                    if TrialState[name] in seen:
                        out[name] += 1
                        break
            return out
        return {state.name: n for state, n in self._retry(trial_table.state_counts, self.storage, self._study_id,
                                                          without=names.DUPLICATE).items()}


class Heartbeat:
    """One trial's heartbeat records, each call one attempt; a failure is said once, not swallowed.

    A busy or briefly lost database is expected and the next beat retries; it is reported only
    when beats keep failing past the grace period, after which other workers take the cell
    over. Any other error (a broken schema, a bug) is reported the first time.
    """

    def __init__(self, record: Callable[[], None], number: int, grace: float,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)):
        self.record, self.number, self.grace, self.log = record, number, grace, log
        self.failing_since: Optional[float] = None
        self.said: set[str] = set()

    def __call__(self) -> None:
        try:
            self.record()
        except Exception as e:
            self._failed(e)
        else:
            self.failing_since = None

    def _failed(self, e: Exception) -> None:
        now = time.monotonic()
        self.failing_since = self.failing_since if self.failing_since is not None else now
        kind = "transient" if is_transient(e) else "error"
        if kind in self.said or (kind == "transient" and now - self.failing_since <= self.grace):
            return
        self.said.add(kind)
        while e.__cause__ is not None:  # Optuna wraps the database's error, which names the problem
            e = e.__cause__
        text = (str(e).strip() or type(e).__name__).splitlines()[0]
        self.log(f"warning: trial {self.number}: heartbeat not recorded ({type(e).__name__}: {text}); "
                 f"other workers take its cell over once the heartbeat is {self.grace:g} s old")
