"""Where each cell of a spec stands: one vocabulary, one answer, from the ledger and MLflow.

The ledger (an Optuna study) says who holds a cell and whether it is done; MLflow says how far
its run got and what it measured. :func:`survey` reads both and gives every cell of a grid (or
every trial of a search) one :class:`CellState`. ``ablate run``'s and ``ablate search``'s end,
``ablate status``, Slurm's last task (which closes the parent run) and ``ablate report`` all ask
here, so they cannot disagree. Reading writes nothing. No torch, no timm.

    ledger trial      MLflow cell run        CellState
    (none)            -                      new
    WAITING           -                      waiting (a retry resumes from its checkpoint)
    RUNNING           RUNNING                running, or interrupted when its worker is gone
    COMPLETE          FINISHED               finished
    FAIL / PRUNED     FAILED / KILLED        failed / pruned

A grid's cell is one the spec produces now. A cell the experiment holds (a ledger trial or an
MLflow run) whose key the spec no longer produces, because its value was dropped or a setting
changed, is not a cell of the grid: :func:`survey` lists it apart (``Progress.orphans``), with its
state where it ended (finished, failed, pruned) or :attr:`CellState.ORPHANED` where it was left
unfinished (running, interrupted, waiting): ``ablate run --close-orphans`` closes those
(:func:`ablate.runner.close_orphaned`). A cell that another spec file recorded in the same
experiment (two specs may share a name: :mod:`ablate.ledger`) and that this file still produces
is that spec's, not an orphan (:func:`other_specs_keys`).
"""
from __future__ import annotations

import enum
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from optuna.trial import FrozenTrial, TrialState

from ablate import liveness, names, tracking, text
from ablate.errors import AblateError
from ablate.ledger import heartbeat_settings, is_retry, retried
from ablate.spec.builder import SpecArgs


class CellState(str, enum.Enum):
    """Where a cell (or a search's trial) stands; the order is the order of counts and lists."""
    FINISHED = "finished"
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # its worker is gone; the next run (or any live worker) resumes it
    WAITING = "waiting"          # queued; an interrupted cell waits here to resume from its checkpoint
    NEW = "new"                  # not queued yet (a grid not launched; a search's trial not sampled)
    FAILED = "failed"
    PRUNED = "pruned"
    ORPHANED = "orphaned"        # no longer in the spec and left unfinished: `ablate run --close-orphans` closes it

    def __str__(self) -> str:
        return self.value

    @property
    def settled(self) -> bool:
        """Nothing more will happen to it under this spec: finished, failed, pruned, or orphaned
        (no longer in the spec: no worker of the spec trains it)."""
        return self in (CellState.FINISHED, CellState.FAILED, CellState.PRUNED, CellState.ORPHANED)


#: the reason recorded (ledger trial and MLflow run) for an orphaned cell closed by ``ablate run --close-orphans``
CLOSED_REASON = "closed: no longer in the spec"


#: the states of the ledger's words (a cell run's ``ablate.state`` tag)
_FROM_RECORD = {"COMPLETE": CellState.FINISHED, "FAIL": CellState.FAILED, "PRUNED": CellState.PRUNED,
                "RUNNING": CellState.RUNNING, "WAITING": CellState.WAITING}


def state_of_record(word: str) -> CellState:
    """The state that a ledger state name or a cell run's ``ablate.state`` tag stands for."""
    return _FROM_RECORD.get(word, CellState.RUNNING)


@dataclass
class CellProgress:
    """One cell of a grid, or one trial of a search."""
    key: str
    state: CellState
    values: dict[str, Any]              # the varied settings (a search: its space's parameters)
    trial: Optional[int] = None         # the ledger trial that stands for it now
    host: str = ""
    worker: str = ""                    # "host:pid"
    slurm_task: str = ""                # "45_1"
    epoch: Optional[int] = None         # epochs completed (running, interrupted, waiting to resume)
    epochs: Optional[int] = None
    top1: Optional[float] = None        # finished: its validation top-1
    macs: Optional[float] = None        # its model's multiply-adds per image, as its run recorded them
    reason: str = ""                    # failed / pruned: why; interrupted: what happened
    images_per_second: Optional[float] = None  # running: its last epoch's training throughput
    mfu: Optional[float] = None         # ... and model FLOPs utilisation, where the device's peak is known
    was: Optional[CellState] = None     # orphaned: the state it was left in (running, interrupted, waiting)

    @property
    def closed(self) -> bool:
        """A cell no longer in the spec that ``ablate run --close-orphans`` closed."""
        return self.state == CellState.FAILED and self.reason.startswith(CLOSED_REASON)

    def describe(self) -> str:
        """``shift=four, train.seed=0``: the cell as a person names it."""
        return ", ".join(f"{k}={text.value(v)}" for k, v in self.values.items()) or self.key


@dataclass
class Progress:
    kind: str                           # names.GRID or names.SEARCH
    total: int                          # cells of the grid, or the search's target number of trials
    cells: list[CellProgress]
    counts: dict[CellState, int] = field(default_factory=dict)
    trials: list[FrozenTrial] = field(default_factory=list)  # the ledger's trials it was read from
    orphans: list[CellProgress] = field(default_factory=list)  # cells no longer in the spec, never among ``cells``

    @property
    def orphaned(self) -> list[CellProgress]:
        """The cells no longer in the spec that were left unfinished (what ``--close-orphans`` closes)."""
        return [c for c in self.orphans if c.state == CellState.ORPHANED]

    @property
    def done(self) -> bool:
        """Nothing left to train: every cell (or the target number of trials) finished, failed or pruned."""
        return all(self.counts[s] == 0 for s in CellState if not s.settled)

    @property
    def ok(self) -> bool:
        """Everything trained and nothing failed."""
        return self.done and not self.counts[CellState.FAILED]

    @property
    def pending(self) -> int:
        return sum(self.counts[s] for s in CellState if not s.settled)

    def with_state(self, *states: CellState) -> list[CellProgress]:
        return [c for c in self.cells if c.state in states]


# ---- what the stores say ---------------------------------------------------------------------------

@dataclass
class _Run:
    """What progress needs of one MLflow cell run."""
    status: str                      # RUNNING, FINISHED, FAILED, KILLED
    trial: str                       # its ablate.trial_number tag
    top1: Optional[float]
    macs: Optional[float]
    epochs: Optional[int]            # train.epochs
    reached: int = 0                 # epochs logged so far
    images_per_second: Optional[float] = None  # the latest logged
    mfu: Optional[float] = None
    values: dict[str, Any] = field(default_factory=dict)  # its spec's varied settings, as its params hold them
    failure: str = ""                # its ablate.failure tag


def _run_values(run) -> dict[str, Any]:
    try:
        varied = json.loads(run.data.tags.get(names.VARIED, "[]"))
    except ValueError:
        varied = []
    params = run.data.params
    return {k: tracking.param_value(params[k]) for k in varied if isinstance(k, str) and k in params}


def _runs_by_key(runs: Iterable[Any]) -> dict[str, list[_Run]]:
    """The cell runs (oldest first) by cell key, with how far each RUNNING one got (a query each)."""
    by_key: dict[str, list[_Run]] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        epochs = run.data.params.get(names.EPOCHS)
        metrics = run.data.metrics
        item = _Run(run.info.status, run.data.tags.get(names.TRIAL_NUMBER, ""), metrics.get(names.VAL_TOP1),
                    metrics.get(names.MACS), int(epochs) if epochs and epochs.isdigit() else None,
                    images_per_second=metrics.get(names.IMAGES_PER_SECOND), mfu=metrics.get(names.MFU),
                    values=_run_values(run), failure=run.data.tags.get(names.FAILURE, ""))
        if run.info.status == "RUNNING":  # training, or interrupted: how far it got
            item.reached = tracking.epochs_logged(run.info.run_id)
        by_key.setdefault(run.data.tags.get(names.CELL_KEY, ""), []).append(item)
    return by_key


def worker_gone(trial: FrozenTrial) -> Optional[str]:
    """Why a RUNNING trial's worker is known to be gone, or None while it may still be running
    (judged only where its pid means its process: :mod:`ablate.liveness`)."""
    worker = str(trial.user_attrs.get(names.WORKER, ""))
    if liveness.worker_gone(worker, str(trial.user_attrs.get(names.WORKER_SPACE, ""))):
        return f"worker {worker} is gone; resumes from its checkpoint"
    return None


def _or_stale(gone: Callable[[FrozenTrial], Optional[str]], stale: set[int]) -> Callable[[FrozenTrial], Optional[str]]:
    """``gone``, and else a heartbeat older than the grace period (a worker on any machine)."""
    def judged(trial: FrozenTrial) -> Optional[str]:
        why = gone(trial)
        if why is None and trial.number in stale:
            why = f"no heartbeat for over {heartbeat_settings()[1]} s; resumes from its checkpoint"
        return why
    return judged


def survey(spec, ledger=None, *, runs: Optional[list] = None, target: Optional[int] = None,
           gone: Callable[[FrozenTrial], Optional[str]] = worker_gone) -> Progress:
    """Where every cell of ``spec``'s grid (or every trial of its search) stands.

    ``ledger``: the spec's :class:`ablate.ledger.Ledger`, None where there is none yet (every cell
    is new). ``runs``: the experiment's MLflow cell runs; None reads them
    (:func:`ablate.tracking.cell_runs`), ``[]`` leaves MLflow out (states only, no epochs or top-1).
    ``target``: a search's number of trials (default: the spec's). ``gone``: why a RUNNING trial's
    worker is gone (then the cell is interrupted), or None; a trial whose heartbeat is older than
    the grace period is interrupted too, whoever ran it.

    A grid's cells no longer in the spec go to ``Progress.orphans`` (never among its cells or
    their counts but ``counts[ORPHANED]``), where MLflow is read (``runs`` not ``[]``): it tells
    which spec files recorded into the experiment."""
    trials = ledger.summaries(params=spec.search is not None) if ledger is not None else []
    gone = _or_stale(gone, ledger.stale() if ledger is not None else set())
    with_mlflow = runs != []
    if runs is None:
        runs = tracking.cell_runs(spec.name)
    by_key = _runs_by_key(runs)
    orphans: list[CellProgress] = []
    if spec.search is None:
        cells = _grid_cells(spec, trials, by_key, gone)
        total = len(cells)
        if with_mlflow:
            orphans = _orphans(spec, trials, by_key, gone, other_specs_keys(spec))
    else:
        total = target or spec.search.trials
        cells = _search_cells(spec, trials, by_key, gone)
    counts = {s: sum(c.state == s for c in cells) for s in CellState}
    if spec.search is not None:  # trials not sampled yet
        counts[CellState.NEW] = max(0, total - sum(counts.values()))
    counts[CellState.ORPHANED] = sum(c.state == CellState.ORPHANED for c in orphans)
    return Progress(spec.kind, total, cells, counts, trials, orphans)


def _grid_cells(spec, trials: list[FrozenTrial], runs: dict[str, list[_Run]], gone) -> list[CellProgress]:
    by_key: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        key = t.user_attrs.get(names.CELL_KEY)
        if key and names.DUPLICATE not in t.user_attrs:
            by_key.setdefault(key, []).append(t)
    cells = []
    for cell in spec.cells():
        mine = sorted(by_key.get(cell.key, []), key=lambda t: t.number)
        of_state: dict[TrialState, list[FrozenTrial]] = defaultdict(list)
        for t in mine:
            of_state[t.state].append(t)
        c = CellProgress(key=cell.key, state=CellState.NEW, values=dict(cell.values), epochs=cell.shared.train.epochs)
        own = runs.get(cell.key, [])
        c.macs = next((r.macs for r in reversed(own) if r.macs is not None), None)
        if of_state[TrialState.COMPLETE]:
            _finished(c, of_state[TrialState.COMPLETE][-1], own)
        elif of_state[TrialState.RUNNING]:
            _running(c, of_state[TrialState.RUNNING][-1], own, gone)
        elif of_state[TrialState.WAITING]:
            c.state, c.trial = CellState.WAITING, of_state[TrialState.WAITING][0].number
            c.epoch = _epoch_reached(own)
        elif mine:
            _ended(c, mine[-1])
        cells.append(c)
    return cells


# ---- cells no longer in the spec ---------------------------------------------------------------------

def parent_runs(name: str) -> list:
    """The parent runs (one per ``ablate run``/``search`` invocation or Slurm launch) of the experiment ``name``."""
    experiment = tracking.existing_experiment(name)
    if experiment is None:
        return []
    return tracking.all_runs(experiment.experiment_id, f"tags.`{names.ROLE}` = 'parent'")


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def other_specs_keys(spec, parents: Optional[list] = None) -> set[str]:
    """The cell keys that other spec files sharing ``spec``'s experiment still produce.

    Two spec files may record into one experiment (the same ``name``, or ``--name``); a cell of the
    other's is not an orphan of this one. They are the files the experiment's parent runs name
    (``ablate.spec_file``, as given on their command line, so relative to the folder they were run
    from), other than ``spec``'s own, that exist here and load (with the ``--set`` overrides their
    run recorded). A file that is gone or no longer loads names no cell: its cells are orphans."""
    parents = parent_runs(spec.name) if parents is None else parents
    keys: set[str] = set()
    seen: set[tuple[str, str]] = set()
    for run in parents:
        path, overrides = run.data.tags.get(names.SPEC_FILE, ""), run.data.tags.get(names.OVERRIDES, "")
        if not path or (path, overrides) in seen:
            continue
        seen.add((path, overrides))
        if _same_file(path, spec.path) or not Path(path).is_file():
            continue
        try:
            sets = tuple(f"{k}={json.dumps(v)}" for k, v in json.loads(overrides or "{}").items())
            other = SpecArgs(sets, spec.name).load(path, check_paths=False)
        except (AblateError, ValueError, OSError):
            continue  # no longer a spec: its cells are nobody's
        keys |= {c.key for c in other.cells()}
    return keys


def _orphans(spec, trials: list[FrozenTrial], runs: dict[str, list[_Run]], gone,
             others: set[str]) -> list[CellProgress]:
    """Every cell the ledger or MLflow holds for this experiment that neither ``spec`` nor another
    spec file of the experiment (``others``) produces, in the order it was first queued or run."""
    mine = {c.key for c in spec.cells()} | others
    by_key: dict[str, list[FrozenTrial]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        key = t.user_attrs.get(names.CELL_KEY)
        if key and key not in mine and names.DUPLICATE not in t.user_attrs:
            by_key.setdefault(key, []).append(t)
    keys = list(by_key) + [k for k in runs if k and k not in mine and k not in by_key]
    return [_orphan(key, by_key.get(key, []), runs.get(key, []), gone) for key in keys]


def _orphan(key: str, trials: list[FrozenTrial], runs: list[_Run], gone) -> CellProgress:
    values = {}
    if trials and names.VALUES in trials[-1].user_attrs:
        try:
            values = json.loads(trials[-1].user_attrs[names.VALUES])
        except ValueError:
            pass
    if not values and runs:
        values = runs[-1].values
    c = CellProgress(key=key, state=CellState.NEW, values=values, epochs=next(
        (r.epochs for r in reversed(runs) if r.epochs), None))
    c.macs = next((r.macs for r in reversed(runs) if r.macs is not None), None)
    of_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    finished_run = any(r.status == "FINISHED" and r.top1 is not None for r in runs)
    if of_state[TrialState.COMPLETE] or finished_run:
        c.state, c.epoch = CellState.FINISHED, c.epochs
        if of_state[TrialState.COMPLETE]:
            _held_by(c, of_state[TrialState.COMPLETE][-1])
        done = [r for r in runs if r.status == "FINISHED" and r.top1 is not None]
        c.top1 = done[-1].top1 if done else None
    elif of_state[TrialState.RUNNING]:
        _running(c, of_state[TrialState.RUNNING][-1], runs, gone)
        c.was, c.state = c.state, CellState.ORPHANED
        c.reason = (f"left interrupted: {c.reason.split('; resumes')[0]}" if c.was == CellState.INTERRUPTED
                    else f"running in worker {c.worker} (a worker of the spec as it was)")
    elif of_state[TrialState.WAITING] or any(r.status == "RUNNING" for r in runs):
        c.was, c.state = CellState.WAITING, CellState.ORPHANED
        c.trial = of_state[TrialState.WAITING][0].number if of_state[TrialState.WAITING] else None
        c.epoch = _epoch_reached(runs)
        waiting = of_state[TrialState.WAITING]
        c.reason = ("its MLflow run is still RUNNING" if not waiting else
                    "interrupted, queued again in the ledger" if any(is_retry(t) for t in waiting) else
                    "queued in the ledger") + (f"; reached epoch {c.epoch}, its checkpoint kept" if c.epoch else "")
    elif trials:
        _ended(c, trials[-1])
    else:  # MLflow alone: how its latest run ended
        c.state = CellState.PRUNED if runs[-1].status == "KILLED" and not runs[-1].failure else CellState.FAILED
        c.reason = runs[-1].failure or "unknown"
    return c


def _search_cells(spec, trials: list[FrozenTrial], runs: dict[str, list[_Run]], gone) -> list[CellProgress]:
    superseded = retried(trials)
    cells = []
    for t in sorted(trials, key=lambda t: t.number):
        if names.DUPLICATE in t.user_attrs or t.number in superseded:
            continue
        key = t.user_attrs.get(names.CELL_KEY, "")
        values = {k: t.params[k] for k in spec.search.space if k in t.params}
        c = CellProgress(key=key, state=CellState.NEW, values=values, trial=t.number, epochs=spec.base.train.epochs)
        own = [r for r in runs.get(key, []) if r.trial == str(t.number)] or runs.get(key, [])
        if own and own[-1].epochs:
            c.epochs = own[-1].epochs
        c.macs = next((r.macs for r in reversed(own) if r.macs is not None), None)
        if t.state == TrialState.COMPLETE:
            _finished(c, t, own)
        elif t.state == TrialState.RUNNING:
            _running(c, t, own, gone)
        elif t.state == TrialState.WAITING:
            c.state, c.epoch = CellState.WAITING, _epoch_reached(own)
        else:
            _ended(c, t)
        cells.append(c)
    return cells


def _held_by(c: CellProgress, trial: FrozenTrial) -> None:
    c.trial = trial.number
    c.worker = str(trial.user_attrs.get(names.WORKER, ""))
    c.host = c.worker.rpartition(":")[0]
    c.slurm_task = str(trial.user_attrs.get(names.SLURM_TASK) or "")


def _finished(c: CellProgress, trial: FrozenTrial, runs: list[_Run]) -> None:
    _held_by(c, trial)  # who finished it
    c.state, c.epoch = CellState.FINISHED, c.epochs
    done = [r for r in runs if r.status == "FINISHED" and r.top1 is not None]
    if done:
        c.top1 = done[-1].top1


def _running(c: CellProgress, trial: FrozenTrial, runs: list[_Run], gone) -> None:
    _held_by(c, trial)
    c.epoch = _epoch_reached(runs)
    if runs:
        c.images_per_second, c.mfu = runs[-1].images_per_second, runs[-1].mfu
    why = gone(trial)
    c.state, c.reason = (CellState.INTERRUPTED, why) if why else (CellState.RUNNING, "")


def _ended(c: CellProgress, trial: FrozenTrial) -> None:
    c.trial = trial.number
    c.state = CellState.PRUNED if trial.state == TrialState.PRUNED else CellState.FAILED
    c.reason = str(trial.user_attrs.get(names.FAILURE, "")) or "unknown"


def _epoch_reached(runs: list[_Run]) -> Optional[int]:
    running = [r for r in runs if r.status == "RUNNING"]
    return running[-1].reached if running else None


# ---- from MLflow alone -------------------------------------------------------------------------------

def states_from_runs(runs: Iterable[tuple[str, str]]) -> dict[str, CellState]:
    """Each cell's state from its runs alone, ``(cell key, ablate.state tag)`` oldest first (a report
    may read an MLflow store without its ledger): finished once any run finished, else as its
    latest run ended. A cell that failed twice is one failed cell."""
    states: dict[str, CellState] = {}
    for key, word in runs:
        if states.get(key) != CellState.FINISHED:
            states[key] = state_of_record(word)
    return states
