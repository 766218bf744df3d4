"""The ledger: an Optuna study that is the shared queue of a grid's cells or a search's trials.

A grid enqueues one WAITING trial per unfinished cell (``enqueue_trial``; never GridSampler,
which repeats configurations across parallel workers). A worker claims a waiting trial with
the storage's conditional WAITING -> RUNNING update, which succeeds for exactly one worker,
trains it and tells the result. Dead workers are noticed two ways: a heartbeat that stopped
(Optuna's heartbeat, any machine) or, on the same host, a process id that no longer exists;
their trial is failed and its cell enqueued again, to resume from its checkpoint.

Default storage: ``sqlite:///ablate-ledger.db`` in the working directory, beside MLflow's
default ``mlflow.db``; ``--storage postgresql://...`` or ``ABLATE_STORAGE`` for many machines.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Optional

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from ablate import names
from ablate.errors import AblateError
from ablate.locks import pid_alive, retry_busy as _retry, store_lock

DEFAULT_STORAGE = "sqlite:///ablate-ledger.db"

optuna.logging.set_verbosity(optuna.logging.WARNING)
# heartbeats and the retry callback are marked experimental; they are the documented way to do this
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# we keep the heartbeat ourselves around bare ask/tell (Ledger.heartbeat), not through optimize()
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def storage_url(option: Optional[str] = None) -> str:
    return option or os.environ.get("ABLATE_STORAGE") or DEFAULT_STORAGE


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace) in seconds; ``ABLATE_HEARTBEAT=interval[,grace]`` overrides (tests use short ones)."""
    raw = os.environ.get("ABLATE_HEARTBEAT", "30")
    parts = [int(p) for p in raw.split(",")]
    interval = parts[0]
    return interval, parts[1] if len(parts) > 1 else 4 * interval


def open_storage(url: str) -> RDBStorage:
    interval, grace = heartbeat_settings()
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with store_lock(url):  # two processes creating the schema at once collide
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=interval,
                              grace_period=grace,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
    except Exception as e:  # bad URL, server down, missing driver
        raise AblateError(f"ledger storage {url}: cannot open ({str(e).splitlines()[0]})") from None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Ledger:
    """One study: the queue and record of a grid or a search."""

    def __init__(self, url: str, study_name: str, directions: Iterable[str] = ("maximize",),
                 sampler: Optional[optuna.samplers.BaseSampler] = None,
                 pruner: Optional[optuna.pruners.BasePruner] = None):
        self.url, self.storage = url, open_storage(url)
        directions = list(directions)
        try:
            self.study = _retry(optuna.create_study, storage=self.storage, study_name=study_name,
                                directions=directions, sampler=sampler, pruner=pruner, load_if_exists=True)
        except optuna.exceptions.DuplicatedStudyError:  # created by a racing worker just now
            self.study = optuna.load_study(study_name=study_name, storage=self.storage, sampler=sampler, pruner=pruner)
        got = [d.name.lower() for d in self.study.directions]
        if got != directions:
            raise AblateError(f"ledger {url}: study {study_name!r} exists with objectives {got}, the spec asks "
                              f"for {directions} (allowed: rename the spec or use another --storage)")

    # ---- reading -------------------------------------------------------------------------------
    def trials(self, states=None) -> list[optuna.trial.FrozenTrial]:
        return _retry(self.study.get_trials, deepcopy=False, states=states)

    def states_by_key(self) -> dict[str, set[TrialState]]:
        out: dict[str, set[TrialState]] = {}
        for t in self.trials():
            if names.CELL_KEY in t.user_attrs and names.DUPLICATE not in t.user_attrs:
                out.setdefault(t.user_attrs[names.CELL_KEY], set()).add(t.state)
        return out

    # ---- a grid's queue ------------------------------------------------------------------------
    def enqueue_cells(self, cells: Iterable[Any]) -> tuple[int, int]:
        """Enqueue every cell that is neither finished nor waiting/running. Returns (enqueued, done)."""
        self.recover_dead()
        with store_lock(self.url):
            return self._enqueue_cells(cells)

    def _enqueue_cells(self, cells) -> tuple[int, int]:
        states = self.states_by_key()
        enqueued = done = 0
        for cell in cells:
            seen = states.get(cell.key, set())
            if TrialState.COMPLETE in seen:
                done += 1
            elif not seen & {TrialState.WAITING, TrialState.RUNNING}:
                _retry(self.study.enqueue_trial, {}, user_attrs={
                    names.CELL_KEY: cell.key, names.VALUES: json.dumps(cell.values, default=str)})
                enqueued += 1
        return enqueued, done

    def claim(self) -> Optional[optuna.Trial]:
        """Atomically take one WAITING trial (RUNNING for exactly one worker), or None.

        The store lock makes the claim atomic on SQLite, which ignores Optuna's SELECT ... FOR
        UPDATE, and keeps two runners from enqueueing the same cell at once on any database.
        """
        with store_lock(self.url):
            return self._claim()

    def _claim(self) -> Optional[optuna.Trial]:
        for frozen in self.trials(states=(TrialState.WAITING,)):
            try:
                if not _retry(self.storage.set_trial_state_values, frozen._trial_id, TrialState.RUNNING):
                    continue  # another worker took it first
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # ... and has already finished it
            self._mark_mine(frozen._trial_id)
            winner = self._first_claim(frozen)
            if winner is not None:  # two runners enqueued the same cell at once: keep the first
                _retry(self.storage.set_trial_user_attr, frozen._trial_id, names.DUPLICATE, winner)
                _retry(self.storage.set_trial_state_values, frozen._trial_id, TrialState.FAIL)
                continue
            return optuna.Trial(self.study, frozen._trial_id)
        return None

    def ask(self) -> optuna.Trial:
        """A search's next trial: a waiting retry if there is one, else the sampler's proposal."""
        trial = _retry(self.study.ask)
        self._mark_mine(trial._trial_id)
        return trial

    def set_cell_key(self, trial: optuna.Trial, key: str) -> None:
        _retry(self.storage.set_trial_user_attr, trial._trial_id, names.CELL_KEY, key)

    def _mark_mine(self, trial_id: int) -> None:
        """Record which worker runs the trial and start its heartbeat record."""
        _retry(self.storage.set_trial_user_attr, trial_id, names.WORKER, worker_id())
        _retry(self.storage.record_heartbeat, trial_id)

    def _first_claim(self, frozen) -> Optional[int]:
        """Number of an earlier live trial of the same cell, if any (then ours is the duplicate)."""
        key = frozen.user_attrs.get(names.CELL_KEY)
        if key is None:
            return None
        for t in self.trials(states=(TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)):
            if (t.number != frozen.number and t.user_attrs.get(names.CELL_KEY) == key and names.DUPLICATE not in t.user_attrs
                    and (t.state == TrialState.COMPLETE or t.number < frozen.number)):
                return t.number
        return None

    # ---- dead workers ----------------------------------------------------------------------------
    def recover_dead(self) -> list[int]:
        """Fail trials whose worker is gone and enqueue them again. Returns the failed numbers."""
        before = {t.number for t in self.trials(states=(TrialState.RUNNING,))}
        _retry(optuna.storages.fail_stale_trials, self.study)  # heartbeat: any machine
        host = socket.gethostname()
        for t in self.trials(states=(TrialState.RUNNING,)):
            w_host, _, pid = str(t.user_attrs.get(names.WORKER, "")).rpartition(":")
            if w_host == host and pid.isdigit() and not pid_alive(int(pid)):
                if _retry(self.storage.set_trial_state_values, t._trial_id, TrialState.FAIL):
                    RetryHeartbeatStaleTrialCallback()(self.study, self.storage.get_trial(t._trial_id))
        after = {t.number for t in self.trials(states=(TrialState.RUNNING,))}
        return sorted(before - after - {t.number for t in self.trials(states=(TrialState.COMPLETE,))})

    @contextmanager
    def heartbeat(self, trial: optuna.Trial):
        """Keep the trial's heartbeat while the body runs (bare ask/tell get none from Optuna)."""
        interval, _ = heartbeat_settings()
        stop = threading.Event()

        def beat():
            while not stop.wait(interval):
                try:
                    self.storage.record_heartbeat(trial._trial_id)
                except Exception:  # a missed beat is retried at the next interval
                    pass

        thread = threading.Thread(target=beat, name="ablate-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # ---- results ---------------------------------------------------------------------------------
    def tell(self, trial: optuna.Trial, state: TrialState, values=None, reason: Optional[str] = None) -> None:
        if reason:
            _retry(self.storage.set_trial_user_attr, trial._trial_id, names.FAILURE, reason[:2000])
        _retry(self.study.tell, trial, values if state == TrialState.COMPLETE else None, state=state,
               skip_if_finished=True)

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
        out: dict[str, int] = {}
        for t in self.trials():
            if names.DUPLICATE not in t.user_attrs:
                out[t.state.name] = out.get(t.state.name, 0) + 1
        return out
