"""The ledger on a real Optuna RDB storage: atomic claims, duplicate enqueues, dead workers."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from dataclasses import dataclass

from optuna.trial import TrialState

from ablate.ledger import Ledger
from ablate.names import CELL_KEY as KEY, DUPLICATE, WORKER


@dataclass
class FakeCell:
    key: str
    values: dict


def _cells(n):
    return [FakeCell(key=f"k{i:03d}", values={"i": i}) for i in range(n)]


def _claim_all(url, out):
    ledger = Ledger(url, "claims")
    got = []
    while (trial := ledger.claim()) is not None:
        got.append(trial.user_attrs[KEY])
        ledger.tell(trial, TrialState.COMPLETE, [1.0])
    out.put(got)


def test_enqueue_skips_finished_and_waiting(workdir):
    url = f"sqlite:///{workdir / 'l.db'}"
    ledger = Ledger(url, "s")
    assert ledger.enqueue_cells(_cells(3)) == (3, 0)
    assert ledger.enqueue_cells(_cells(3)) == (0, 0)  # still waiting: not enqueued twice
    trial = ledger.claim()
    ledger.tell(trial, TrialState.COMPLETE, [50.0])
    ledger2 = Ledger(url, "s")
    assert ledger2.enqueue_cells(_cells(4)) == (1, 1)
    assert ledger2.counts({c.key for c in _cells(4)}) == {"COMPLETE": 1, "RUNNING": 0, "WAITING": 3, "FAIL": 0}


def test_failed_cell_is_enqueued_again(workdir):
    url = f"sqlite:///{workdir / 'l.db'}"
    ledger = Ledger(url, "s")
    ledger.enqueue_cells(_cells(1))
    ledger.tell(ledger.claim(), TrialState.FAIL, reason="boom")
    assert ledger.enqueue_cells(_cells(1)) == (1, 0)
    assert ledger.claim().user_attrs[KEY] == "k000"


def test_three_processes_claim_each_trial_once(workdir):
    url = f"sqlite:///{workdir / 'l.db'}"
    Ledger(url, "claims").enqueue_cells(_cells(40))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, out)) for _ in range(3)]
    for p in procs:
        p.start()
    claimed = [k for _ in procs for k in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    assert sorted(claimed) == sorted(c.key for c in _cells(40))


def test_duplicate_enqueue_is_trained_once(workdir):
    """Two runners that enqueue the same cell at once: only the first-numbered trial runs."""
    url = f"sqlite:///{workdir / 'l.db'}"
    a, b = Ledger(url, "s"), Ledger(url, "s")
    a.study.enqueue_trial({}, user_attrs={KEY: "same", "ablate.values": "{}"})
    b.study.enqueue_trial({}, user_attrs={KEY: "same", "ablate.values": "{}"})
    first = b.claim()
    assert first is not None and first.number == 0
    assert a.claim() is None  # the second copy is marked a duplicate, not handed out
    dup = [t for t in a.trials() if DUPLICATE in t.user_attrs]
    assert len(dup) == 1 and dup[0].state == TrialState.FAIL and dup[0].user_attrs[DUPLICATE] == 0


def test_dead_local_worker_is_recovered(workdir):
    url = f"sqlite:///{workdir / 'l.db'}"
    ledger = Ledger(url, "s")
    ledger.enqueue_cells(_cells(1))
    trial = ledger.claim()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = ledger.storage.get_trial(trial._trial_id).user_attrs[WORKER].rpartition(":")[0]
    ledger.storage.set_trial_user_attr(trial._trial_id, WORKER, f"{host}:{dead.pid}")
    assert ledger.recover_dead() == [trial.number]
    again = ledger.claim()
    assert again.user_attrs[KEY] == "k000" and again.number != trial.number
    # a live worker (this process) is left alone
    assert ledger.recover_dead() == []


def test_stale_heartbeat_is_recovered(workdir, monkeypatch):
    monkeypatch.setenv("ABLATE_HEARTBEAT", "1,2")
    url = f"sqlite:///{workdir / 'l.db'}"
    ledger = Ledger(url, "s")
    ledger.enqueue_cells(_cells(1))
    trial = ledger.claim()
    # pretend the worker lives on another machine: only its heartbeat can tell it died
    ledger.storage.set_trial_user_attr(trial._trial_id, WORKER, f"elsewhere:{os.getpid()}")
    import time
    time.sleep(3.5)
    assert ledger.recover_dead() == [trial.number]
    assert ledger.claim().user_attrs[KEY] == "k000"
