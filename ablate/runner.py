"""``ablate run`` and ``ablate search``: check, queue in the ledger, train with workers, say where it stands.

A command checks everything it can refuse (:mod:`ablate.preflight`) before it writes anything,
queues the grid's cells in the ledger (longest first), opens the invocation's MLflow parent
run, and runs the workers (:mod:`ablate.processes`, :mod:`ablate.workers`), which train and
record each cell (:mod:`ablate.execute`). It ends by asking :mod:`ablate.progress` where every
cell stands.

Before it trains, ``ablate run`` looks for orphans: cells of the experiment that the spec no
longer produces and that were left unfinished (a value dropped from the grid while its cell was
interrupted). No worker of this spec trains them. It closes them where asked to
(``--close-orphans``, or yes at the question a terminal gets): :func:`close_orphaned`. Otherwise
it says in one line how, and goes on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from optuna.trial import TrialState

from ablate import checkpoint, names, tracking
from ablate.cell_group import dist_timeout
from ablate.config import num_classes
from ablate.context import Context, checkpoint_root
from ablate.devices import peak_from_setting
from ablate.errors import AblateError
from ablate.ledger import Ledger, is_retry, storage_url
from ablate.lifecycle import sigterm_as_interrupt
from ablate.models.zoo import model_cost
from ablate.preflight import check_batches, check_kind, check_trials, worker_count
from ablate.processes import run_workers
from ablate.progress import CLOSED_REASON, CellProgress, CellState, Progress, survey
from ablate.quiet import quiet_known_noise
from ablate.spec.builder import SpecArgs
from ablate.spec.types import Spec
from ablate.stores import check_stores
from ablate.tracking import spec_tags
from ablate.urls import display_url, storage_option
from ablate.workers import grid_worker, search_worker


def overrides_note(spec) -> str:
    """`` (spec quickstart, --set train.epochs=1)`` after an experiment name that is not the spec's own."""
    return f" ({spec.origin()})" if spec.origin() else ""


def estimated_cost(config) -> float:
    """Training MACs of a configuration. Workers claim cells in queue order, so queueing the
    longest first keeps the last cell from starting late on one GPU while the others sit idle."""
    return model_cost(config.model, num_classes(config.data)).macs * config.train.epochs


def queue_grid(spec, ledger: Ledger) -> tuple[int, int]:
    """Queue every cell of the grid that is not finished, waiting or running, longest first.
    Returns (enqueued, already finished)."""
    cost = {id(config): estimated_cost(config) for config in spec.configurations()}  # a seed costs the same
    return ledger.enqueue_cells(sorted(spec.cells(), key=lambda c: cost[id(c.shared)], reverse=True))


def _run_under_parent(target: Callable[[Context], None], ctx: Context, workers: int, devices: list[str],
                      outcome: Callable[[], str] = lambda: "FINISHED") -> None:
    """Run the workers and end the parent run once: ``outcome()`` (FINISHED or FAILED) when they
    return, KILLED when interrupted (Ctrl-C or SIGTERM), FAILED when this process crashes."""
    status = "FAILED"
    try:
        with sigterm_as_interrupt():
            run_workers(target, ctx, workers, devices)
        status = outcome()
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.finish_run(ctx.parent_run_id, status)


def _close_gone_parents(experiment_id: str) -> None:
    closed = tracking.close_gone_parents(experiment_id)
    if closed:
        print(f"marked {len(closed)} parent run(s) KILLED: their ablate process on this machine is gone", flush=True)


def _checkpoints_ours(option: Optional[str]) -> bool:
    """Whether the checkpoint root is ablate's own default (./checkpoints), not a folder a user named."""
    return not option and not os.environ.get("ABLATE_CHECKPOINTS")


def _remove_empty_checkpoints(root: str, spec, with_root: bool) -> None:
    """The spec's checkpoint folder where nothing is left in it, and the root too when ``with_root``
    (ours, or made by this run)."""
    checkpoint.remove_empty(Path(root) / spec.slug, Path(root), remove_root=with_root)


@dataclass
class Outcome:
    """What a command leaves: its spec (loaded once, passed down) and where each cell stands."""
    spec: Spec
    progress: Progress
    ledger: Ledger

    @property
    def ok(self) -> bool:
        return self.progress.ok


def _prepare(spec_path: str, spec_args: SpecArgs, kind: str, device: str, devices: Optional[list[str]],
             workers: int, storage: Optional[str], gpus_per_cell: int = 1, checkpoints: Optional[str] = None):
    """What ``run`` and ``search`` check before anything is written: the spec (of this ``kind``),
    the devices and workers, and both stores. Returns (spec, devices, workers, ledger URL)."""
    quiet_known_noise()
    spec = spec_args.load(spec_path)  # raises SpecError before anything is written
    check_kind(spec, spec_path, kind)
    devices = devices or []
    if gpus_per_cell < 1:
        raise AblateError(f"--gpus-per-cell: {gpus_per_cell} (allowed: a positive integer)")
    workers = worker_count(device, devices, workers, gpus_per_cell)
    check_batches(spec, gpus_per_cell)
    peak_from_setting()  # ABLATE_PEAK_TFLOPS and ABLATE_DIST_TIMEOUT, if set, are numbers: refused now, not in a cell
    dist_timeout()
    checkpoint.check_root(checkpoint_root(checkpoints), "--checkpoints" if checkpoints else
                          "ABLATE_CHECKPOINTS" if os.environ.get("ABLATE_CHECKPOINTS") else "checkpoint folder")
    url = storage_url(storage)
    check_stores(url)  # both stores usable, before either is written
    return spec, devices, workers, url


# ---- cells no longer in the spec ---------------------------------------------------------------------

CLOSING = "its MLflow run marked KILLED, its ledger trial failed, its checkpoint removed"


def _orphans_text(orphans: Sequence[CellProgress]) -> str:
    """``1 cell no longer in the spec was left unfinished (orphaned: model.shift=four: interrupted, ...)``."""
    described = "; ".join(f"{c.describe()}: {c.reason}" for c in orphans[:5]) + (
        f"; and {len(orphans) - 5} more" if len(orphans) > 5 else "")
    many = len(orphans) != 1
    return (f"{len(orphans)} cell{'s' * many} no longer in the spec {'were' if many else 'was'} left unfinished "
            f"(orphaned: {described})")


def close_orphaned(spec, ledger: Ledger, orphans: Sequence[CellProgress], experiment_id: str,
                  checkpoints: str) -> tuple[list[CellProgress], list[CellProgress]]:
    """Close cells no longer in the spec that were left unfinished (:attr:`Progress.orphaned`), so that
    no worker, of this spec or of the spec as it was, trains them again. Returns (closed, left).

    For each: its ledger trials are failed (a waiting one is claimed first, then told FAIL, with
    :data:`ablate.progress.CLOSED_REASON`), its RUNNING MLflow runs marked KILLED and tagged with
    the reason (``ablate.state`` FAIL, ``ablate.failure``), and its checkpoint folder removed as a
    finished cell's is (:func:`ablate.checkpoint.remove`: the spec's folder too once empty; the root
    is left to the end of the run, under the run's own rule). A cell that a live worker is
    training (a worker of the spec as it was) is left alone: it comes back as left."""
    closed, left = [], []
    root = Path(checkpoints)
    for c in orphans:
        if c.was == CellState.RUNNING:  # its worker is alive: it would go on writing whatever we mark
            left.append(c)
            continue
        ledger.release_gone(lambda t, key=c.key: t.user_attrs.get(names.CELL_KEY) == key)  # interrupted: waits
        while (trial := ledger.claim([c.key])) is not None:
            ledger.tell(trial, TrialState.FAIL, reason=CLOSED_REASON)
        if any(t.user_attrs.get(names.CELL_KEY) == c.key and names.DUPLICATE not in t.user_attrs
               for t in ledger.trials(states=(TrialState.RUNNING,))):
            left.append(c)  # claimed meanwhile by a worker of the spec as it was
            continue
        for run in tracking.find_cell_runs(experiment_id, c.key):
            if run.info.status == "RUNNING":
                tracking.CellRun(run.info.run_id, resumed=True).set_tags(
                    {names.STATE: "FAIL", names.FAILURE: CLOSED_REASON})
                tracking.finish_run(run.info.run_id, "KILLED")
        checkpoint.remove(root / spec.slug / c.key, root, remove_root=False)
        closed.append(c)
    return closed, left


def _handle_orphans(spec, spec_path: str, spec_args: SpecArgs, ledger: Ledger, experiment_id: str, root: str,
                    close: bool, ask: Optional[Callable[[str], bool]], storage: Optional[str],
                    checkpoints: Optional[str]) -> None:
    """Say what was left unfinished of cells no longer in the spec, and close them where asked to."""
    orphans = survey(spec, ledger).orphaned
    if not orphans:
        return
    said = _orphans_text(orphans)
    if not close and ask is not None:
        print(said, flush=True)
        close = ask(f"close {'them' if len(orphans) > 1 else 'it'} now ({CLOSING})?")
        said = ""
    if not close:
        how = spec_args.command("run", spec_path, "--close-orphans", *storage_option(storage),
                                *(("--checkpoints", checkpoints) if checkpoints else ()))
        print(f"{said + '; ' if said else ''}no worker of this spec trains "
              f"{'them' if len(orphans) > 1 else 'it'}; to close {'them' if len(orphans) > 1 else 'it'} "
              f"({CLOSING}): {how}", flush=True)
        return
    closed, left = close_orphaned(spec, ledger, orphans, experiment_id, root)
    if closed:
        print(f"closed {len(closed)} cell{'s' * (len(closed) != 1)} no longer in the spec "
              f"({', '.join(c.describe() for c in closed)}): {CLOSING}", flush=True)
    for c in left:
        print(f"left alone: {c.describe()} (no longer in the spec) is held by a live worker, {c.worker}; "
              "close it once that worker has stopped", flush=True)


def run_grid(spec_path: str, *, workers: int = 1, storage: Optional[str] = None, device: str = "auto",
             devices: Optional[list[str]] = None, checkpoints: Optional[str] = None,
             progress: Optional[bool] = None, spec_args: SpecArgs = SpecArgs(), gpus_per_cell: int = 1,
             close_orphans: bool = False, ask: Optional[Callable[[str], bool]] = None, reuse: bool = True) -> Outcome:
    """``ablate run``: every cell of the spec's grid trained once, recorded in MLflow.

    Cells no longer in the spec that were left unfinished are closed (:func:`close_orphaned`) with
    ``close_orphans``, or where ``ask(question)`` (a terminal's yes/no, default no) says yes; else
    one line says how."""
    spec, devices, workers, url = _prepare(spec_path, spec_args, names.GRID, device, devices, workers, storage,
                                           gpus_per_cell, checkpoints)
    cells = spec.cells()
    ledger = Ledger.for_spec(spec, url)
    enqueued, done = queue_grid(spec, ledger)
    keys = {c.key for c in cells}
    counts = ledger.counts(keys)
    resume = _to_resume(ledger, keys)
    queue = f"{done} already finished, " + (f"{resume} to resume, " if resume else "") + \
        f"{max(0, counts['WAITING'] - resume)} queued" + \
        (f", {counts['RUNNING']} running elsewhere" if counts["RUNNING"] else "")
    experiment_id = tracking.ensure_experiment(spec.name, spec)
    _close_gone_parents(experiment_id)
    reusable = reusable_keys(experiment_id, reuse)
    # read again only where another spec finished some of these cells (a second read of every cell's state)
    reused = reusable and {k for k, s in ledger.states_by_key().items() if TrialState.WAITING in s} & keys & reusable
    if reused:
        queue += f" ({len(reused)} of them reused from other specs, not trained: --no-reuse trains them)"
    print(f"{spec.name}{overrides_note(spec)}: {len(cells)} cells, {queue}; "
          f"ledger {display_url(url)}; MLflow {display_url(tracking.tracking_uri())}", flush=True)
    root = checkpoint_root(checkpoints)
    with_root = _checkpoints_ours(checkpoints) or not Path(root).exists()
    _handle_orphans(spec, spec_path, spec_args, ledger, experiment_id, root, close_orphans, ask, storage, checkpoints)
    if not counts["WAITING"] and not counts["RUNNING"]:  # nothing to train: no parent run for it
        _remove_empty_checkpoints(root, spec, with_root)
        return Outcome(spec, survey(spec, ledger), ledger)
    parent = tracking.start_parent(experiment_id, names.GRID, str(spec_path), tags=spec_tags(spec))
    ctx = Context(spec_path=str(spec_path), storage=url, experiment_id=experiment_id, parent_run_id=parent,
                  checkpoints=root, device=device, progress=progress, workers=workers, spec_args=spec_args,
                  gpus_per_cell=gpus_per_cell, spec=spec, reusable=reusable)
    _run_under_parent(grid_worker, ctx, workers, devices,
                      outcome=lambda: "FINISHED" if survey(spec, ledger, runs=[]).ok else "FAILED")
    where = survey(spec, ledger)
    if where.done:
        _remove_empty_checkpoints(root, spec, with_root)
    return Outcome(spec, where, ledger)


def reusable_keys(experiment_id: str, reuse: bool = True) -> frozenset:
    """The cell keys other specs finished in these stores, which this invocation's workers record
    rather than train (none with ``reuse=False``, ``--no-reuse``)."""
    return frozenset(tracking.keys_finished_elsewhere(experiment_id)) if reuse else frozenset()


def _to_resume(ledger: Ledger, keys: set[str]) -> int:
    """Cells of ``keys`` waiting as the retry of an interrupted run (a dead worker's trial), not as new work."""
    return len({t.user_attrs.get(names.CELL_KEY) for t in ledger.summaries(states=(TrialState.WAITING,))
                if t.user_attrs.get(names.CELL_KEY) in keys and is_retry(t)})


def run_search(spec_path: str, *, trials: Optional[int] = None, workers: int = 1, storage: Optional[str] = None,
               device: str = "auto", devices: Optional[list[str]] = None, checkpoints: Optional[str] = None,
               progress: Optional[bool] = None, spec_args: SpecArgs = SpecArgs(),
               gpus_per_cell: int = 1, reuse: bool = True) -> Outcome:
    """``ablate search``: continue the spec's study until it holds ``trials`` finished trials."""
    check_trials(trials)
    spec, devices, workers, url = _prepare(spec_path, spec_args, names.SEARCH, device, devices, workers, storage,
                                           gpus_per_cell, checkpoints)
    target = trials or spec.search.trials
    ledger = Ledger.for_spec(spec, url)
    ledger.recover_dead()
    finished, running, waiting = ledger.search_counts()
    if finished >= target and not running and not waiting:
        asked = f"--trials {target}" if trials else f"the {target} of the spec's search.trials"
        print(f"{spec.name}: the study already has {finished} finished trials"
              f"{', more than' if finished > target else ', as many as'} {asked}: nothing to do", flush=True)
        _remove_empty_checkpoints(checkpoint_root(checkpoints), spec, _checkpoints_ours(checkpoints))
        return Outcome(spec, survey(spec, ledger, target=target), ledger)
    experiment_id = tracking.ensure_experiment(spec.name, spec)
    _close_gone_parents(experiment_id)
    root = checkpoint_root(checkpoints)
    with_root = _checkpoints_ours(checkpoints) or not Path(root).exists()
    parent = tracking.start_parent(experiment_id, names.SEARCH, str(spec_path), tags=spec_tags(spec))
    resume = f", {waiting} to resume" if waiting else ""  # a search waits only on retries of interrupted trials
    print(f"{spec.name}{overrides_note(spec)}: {finished} trials finished of {target}{resume}; "
          f"sampler {spec.search.sampler}; "
          f"ledger {display_url(url)}; MLflow {display_url(tracking.tracking_uri())}", flush=True)
    ctx = Context(spec_path=str(spec_path), storage=url, experiment_id=experiment_id, parent_run_id=parent,
                  checkpoints=root, device=device, progress=progress, trials=target,
                  workers=workers, spec_args=spec_args, gpus_per_cell=gpus_per_cell, spec=spec,
                  reusable=reusable_keys(experiment_id, reuse))
    _run_under_parent(search_worker, ctx, workers, devices)
    _, running, waiting = ledger.search_counts()
    if not running and not waiting:
        _remove_empty_checkpoints(root, spec, with_root)
    return Outcome(spec, survey(spec, ledger, target=target), ledger)
