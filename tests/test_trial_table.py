"""The ledger's own queries on Optuna's tables: they read and write what Optuna's API would, and a
claim costs the same number of queries whatever the grid's size."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from ablate import trial_table
from ablate.ledger import Ledger
from ablate.names import CELL_KEY, DUPLICATE, VALUES
from test_postgres import pg_databases  # noqa: F401  (a fixture)


@dataclass
class FakeCell:
    key: str
    values: dict


def _cells(n: int, offset: int = 0) -> list[FakeCell]:
    return [FakeCell(f"k{i:06d}", {"model.shift": ["none", "four"][i % 2], "train.lr": 1e-3 * (i + 1)})
            for i in range(offset, offset + n)]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, workdir):
    if request.param == "sqlite":
        return f"sqlite:///{workdir / 'ledger.db'}"
    return request.getfixturevalue("pg_databases")[0]


class Work(list):
    """The statements a store ran, and how much it did for them (:func:`counted`)."""
    done = 0


@contextlib.contextmanager
def counted(ledger: Ledger):
    """The SQL statements the ledger's store runs inside the block, and the work they take: rows
    returned on PostgreSQL, and on SQLite its virtual machine's steps (in hundreds), which grow
    with every row a query scans even when it returns none."""
    work = Work()

    def tick():
        work.done += 1
        return 0

    def before(conn, cursor, statement, parameters, context, executemany):
        work.append(statement)
        raw = conn.connection.dbapi_connection
        if hasattr(raw, "set_progress_handler"):  # sqlite3
            raw.set_progress_handler(tick, 100)

    def after(conn, cursor, statement, parameters, context, executemany):
        raw = conn.connection.dbapi_connection
        if hasattr(raw, "set_progress_handler"):
            raw.set_progress_handler(None, 100)  # the rows are read in the step functions, before this
        elif cursor.rowcount and cursor.rowcount > 0:
            work.done += cursor.rowcount

    sqlalchemy.event.listen(ledger.storage.engine, "before_cursor_execute", before)
    sqlalchemy.event.listen(ledger.storage.engine, "after_cursor_execute", after)
    try:
        yield work
    finally:
        sqlalchemy.event.remove(ledger.storage.engine, "before_cursor_execute", before)
        sqlalchemy.event.remove(ledger.storage.engine, "after_cursor_execute", after)


def test_batched_queueing_writes_the_trials_optunas_add_trial_writes(url):
    """The same cells queued by Optuna's add_trial (one per transaction) and in batches read back the same."""
    ledger = Ledger(url, "batched")
    ledger.enqueue_cells(_cells(5))
    reference = optuna.create_study(storage=ledger.storage, study_name="by-optuna")
    dists = {"model.shift": optuna.distributions.CategoricalDistribution(["none", "four"])}
    for cell in _cells(5):
        params, pd = {"model.shift": cell.values["model.shift"], "train.lr": cell.values["train.lr"]}, dict(dists)
        pd["train.lr"] = optuna.distributions.FloatDistribution(cell.values["train.lr"], cell.values["train.lr"])
        reference.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=params, distributions=pd,
            user_attrs={CELL_KEY: cell.key, VALUES: json.dumps(cell.values)}))
    ours = ledger.study.get_trials(deepcopy=False)
    theirs = reference.get_trials(deepcopy=False)
    assert [t.number for t in ours] == [t.number for t in theirs] == list(range(5))
    for a, b in zip(ours, theirs):
        assert (a.state, a.params, a.distributions, a.user_attrs) == (b.state, b.params, b.distributions, b.user_attrs)
    # queued after Optuna numbered some itself: numbers go on from there
    ledger.enqueue_cells(_cells(2, offset=5))
    assert [t.number for t in ledger.trials()] == list(range(7))


def test_light_reads_agree_with_optunas(url):
    ledger = Ledger(url, "light")
    ledger.enqueue_cells(_cells(6))
    first = ledger.claim()
    ledger.tell(first, TrialState.FAIL, reason="boom")
    ledger.tell(ledger.claim(), TrialState.COMPLETE, [1.0])
    ledger.study.enqueue_trial({}, user_attrs={CELL_KEY: "k000002", VALUES: "{}"})  # a duplicate, claimed later
    whole = {t.number: t for t in ledger.study.get_trials(deepcopy=False)}
    light = ledger.summaries(params=True)
    assert [t.number for t in light] == sorted(whole)
    for t in light:
        w = whole[t.number]
        assert t.state == w.state and t.params == w.params
        assert t.user_attrs == {k: v for k, v in w.user_attrs.items() if k in t.user_attrs}
        assert CELL_KEY in t.user_attrs
    assert light[first.number].user_attrs["ablate.failure"] == "boom"
    assert ledger.counts() == {"WAITING": 5, "FAIL": 1, "COMPLETE": 1}
    assert ledger.counts({c.key for c in _cells(6)}) == {"COMPLETE": 1, "RUNNING": 0, "WAITING": 4, "FAIL": 1}
    assert ledger.search_counts() == (2, 0, 5)
    # the duplicate is claimed as one, and left out of every count
    while ledger.claim() is not None:
        pass
    assert sum(DUPLICATE in t.user_attrs for t in ledger.summaries()) == 1
    assert ledger.counts()["RUNNING"] == 4


def _claim_and_tell(ledger: Ledger, keys) -> Work:
    with counted(ledger) as work:
        trial = ledger.claim(keys)
        ledger.tell(trial, TrialState.COMPLETE, [1.0])
    return work


def test_a_claim_costs_the_same_at_any_grid_size(url):
    """A claim and its record run a fixed number of statements that touch a bounded number of
    rows: the same at 60 cells and at 3,000 (when every claim read every waiting trial, grids
    cost time quadratic in their size)."""
    small, big = Ledger(url, "small"), Ledger(url, "big")
    small.enqueue_cells(_cells(60))
    with counted(big) as queueing:
        big.enqueue_cells(_cells(3_000))
    assert len(queueing) < 40  # in batches of trial_table.BATCH, not a transaction per cell
    keys = {c.key for c in _cells(3_000)}
    for _ in range(2):
        _claim_and_tell(small, keys), _claim_and_tell(big, keys)  # the first claims open connections
    for _ in range(3):
        a, b = _claim_and_tell(small, keys), _claim_and_tell(big, keys)
        assert len(a) == len(b) and b.done <= 1.5 * a.done + 10, (a.done, b.done)
    # the grid's end: a worker asks what still runs, never reading every cell
    ends = []
    for ledger in (small, big):
        with counted(ledger) as work:
            ledger.running_keys()
            ledger.recover_dead()
        ends.append(work)
    assert len(ends[0]) == len(ends[1]) and ends[1].done <= 1.5 * ends[0].done + 10


def test_a_claim_passes_over_another_specs_waiting_cells(url):
    """A worker claims only its spec's cells: more of another spec's than one page waits before its own."""
    ledger = Ledger(url, "shared")
    ledger.enqueue_cells(_cells(150, offset=1000))  # another spec's
    ledger.enqueue_cells(_cells(2))
    mine = {c.key for c in _cells(2)}
    got = [ledger.claim(mine).user_attrs[CELL_KEY] for _ in range(2)]
    assert sorted(got) == sorted(mine) and ledger.claim(mine) is None
    assert ledger.waiting_keys({c.key for c in _cells(1, offset=1100)}) and not ledger.waiting_keys(mine)


def test_the_indexes_exist_once(url):
    Ledger(url, "a")
    Ledger(url, "b")  # opening again creates nothing twice
    engine = sqlalchemy.create_engine(url)
    try:
        inspector = sqlalchemy.inspect(engine)
        trials = {i["name"] for i in inspector.get_indexes("trials")}
        attrs = {i["name"] for i in inspector.get_indexes("trial_user_attributes")}
    finally:
        engine.dispose()
    assert "ix_ablate_trials_study_state" in trials and "ix_ablate_trial_user_attributes_value" in attrs


def test_readers_hold_no_idle_connection(pg_databases):  # noqa: F811
    """`ablate status --follow` opens a reader every few seconds: each one's pooled connection
    stayed open until the garbage collector found it, and a long follow ran PostgreSQL out of
    connections ("sorry, too many clients already")."""
    import psycopg
    url = pg_databases[0]
    Ledger(url, "readers").enqueue_cells(_cells(3))
    database = url.rsplit("/", 1)[1]

    def held() -> int:
        with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres") as admin:
            return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)).fetchone()[0]

    before = held()  # the writer's own pool
    for _ in range(20):
        assert Ledger(url, "readers", create=False).counts()["WAITING"] == 3
    assert held() <= before, (held(), before)
