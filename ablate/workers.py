"""The worker loops: claim a cell (or ask for a trial), train it, record it, until no work is left.

:func:`grid_worker` takes the grid's queued cells, :func:`search_worker` asks the sampler for
trials up to the search's target, and :func:`follow_cells` is every other rank of a cell that
spans several processes: it trains what its group's leader hands over. Each runs in one process,
started by :mod:`ablate.processes` (or by a Slurm task).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
from optuna.trial import TrialState

from ablate import names, text
from ablate.cell_group import StoppedByLeader
from ablate.config import CellConfig, cell_key
from ablate.context import Context
from ablate.errors import AblateError
from ablate.execute import execute
from ablate.ledger import Ledger
from ablate.quiet import quiet_known_noise
from ablate.search import make_sampler, suggest
from ablate.train import CellFailed, resolve_device, train_cell

POLL_SECONDS = 2.0
PROGRESS_SECONDS = 10.0  # a worker's "grid: n/N cells finished" line, at most this often


def _setup_worker(ctx: Context) -> None:
    quiet_known_noise()
    if ctx.threads:
        torch.set_num_threads(ctx.threads)


def _wait_for_others(ctx: Context, what: str, said: bool) -> bool:
    """Nothing to claim, but work still runs elsewhere: wait in case its worker dies."""
    if not said:
        ctx.log(f"waiting: {what} running in other workers")
    time.sleep(POLL_SECONDS)
    _keep_group(ctx)
    return True


def _keep_group(ctx: Context) -> None:
    """Tell the other ranks of this worker's group that it is still there (they wait in a broadcast)."""
    if ctx.group is not None and ctx.group.distributed:
        ctx.group.send({"idle": True})


def follow_cells(ctx: Context) -> None:
    """A rank other than 0: train every cell the group's leader hands over, until it says stop.

    Only the leader records; a cell that fails here fails there too (the checks are agreed), so
    this rank just waits for the next one."""
    _setup_worker(ctx)
    device = resolve_device(ctx.device)
    ctx.log(f"rank {ctx.rank} of {ctx.gpus_per_cell} on {device} (pid {os.getpid()}): trains the cells rank 0 hands over")
    while True:
        message = ctx.group.send()
        if message.get("stop"):
            return
        if "cell" not in message:
            continue  # the leader is waiting for work
        try:
            train_cell(CellConfig(**message["cell"]), device=device, checkpoint_dir=Path(message["checkpoint_dir"]),
                       group=ctx.group, log=lambda m: None, progress=False)
        except (CellFailed, StoppedByLeader):
            continue


def grid_worker(ctx: Context) -> None:
    """Claim and train cells until none is waiting or running anywhere."""
    _setup_worker(ctx)
    spec = ctx.load_spec()
    ledger = Ledger.for_spec(spec, ctx.storage)
    cells = {c.key: c for c in spec.cells()}
    durations, waited, said, cost = [], False, 0.0, 0.0  # this worker's seconds per cell
    while True:
        trial = ledger.claim(cells.keys())  # only this spec's cells: another spec of the same name keeps its own
        if trial is None:
            if ledger.recover_dead():
                continue  # a dead worker's cells, queued again
            running = ledger.running_keys() & cells.keys()
            if not running:
                if ledger.waiting_keys(cells.keys()):
                    continue  # handed back since the claim looked
                # a dead worker's cell is failed, then queued again, in two transactions: another
                # worker's recovery may be between them now, so look once more before leaving
                time.sleep(POLL_SECONDS)
                if ledger.waiting_keys(cells.keys()) or ledger.running_keys() & cells.keys():
                    continue
                return
            waited = _wait_for_others(ctx, f"{len(running)} cell(s)", waited)
            continue
        waited = False
        key = trial.user_attrs[names.CELL_KEY]
        began = time.time()
        execute(spec, cells[key].config, key, trial, ledger, ctx)
        durations.append(time.time() - began)
        # counting every cell's state is the one read that grows with the grid: at most every
        # PROGRESS_SECONDS, and rarely enough that it takes under 5% of a worker's time
        if time.time() - said >= max(PROGRESS_SECONDS, 20 * cost):
            said = time.time()
            # the median cell: the first one also pays for starting (imports, data, a compiled
            # model), which would make the elapsed time per cell overstate the rest by far
            _say_progress(ctx, ledger, cells, statistics.median(durations))
            cost = time.time() - said


def _say_progress(ctx: Context, ledger: Ledger, cells: dict, per_cell: float) -> None:
    counts = ledger.counts(set(cells))
    finished = counts["COMPLETE"] + counts["FAIL"]
    ctx.log(f"grid: {finished}/{len(cells)} cells finished ({counts['FAIL']} failed), "
            f"ETA {text.duration(per_cell * (len(cells) - finished) / ctx.workers)}")


def wait_for_same_config(ledger, trial, key: str, ctx: Context) -> None:
    """Another worker is training this very configuration for an earlier trial: let it finish.

    Its finished run then stands for this trial too (see :func:`execute`); were both to train,
    they would share one checkpoint folder and one MLflow run. An earlier trial that has no
    configuration yet (asked a moment ago, its key about to be set) is waited for as well, else
    both could start the same configuration. Earlier trials never wait for later ones, so two
    workers cannot wait for each other.
    """
    said = False
    while True:
        earlier = [t for t in ledger.trials(states=(TrialState.RUNNING,)) if t.number < trial.number]
        same = any(t.user_attrs.get(names.CELL_KEY) == key for t in earlier)
        if not same and all(names.CELL_KEY in t.user_attrs for t in earlier):
            return
        if same and not said:
            ctx.log(f"trial {trial.number}: same configuration as a running trial; waiting for its result")
            said = True
        time.sleep(POLL_SECONDS if same else 0.2)
        _keep_group(ctx)
        ledger.recover_dead()


def search_worker(ctx: Context) -> None:
    """Ask the sampler (or take a waiting retry), train, tell, until the study has its trials."""
    _setup_worker(ctx)
    spec = ctx.load_spec()
    ledger = Ledger.for_spec(spec, ctx.storage)
    # Seeded from the study's size and the worker's number: one worker on the same study state
    # samples the same trials again, while parallel workers and resumed searches do not propose
    # the same configurations as each other.
    ledger.study.sampler = make_sampler(spec.search, seed=ledger.size() * 100 + ctx.index)
    prune = len(spec.search.objectives) == 1 and spec.search.pruner not in (None, "none")
    waited = False
    while True:
        ledger.recover_dead()
        finished, running, waiting = ledger.search_counts()
        if not waiting and finished + running >= ctx.trials:
            if not running:
                return
            waited = _wait_for_others(ctx, f"{running} trial(s)", waited)
            continue
        waited = False
        trial = ledger.ask()
        values = suggest(trial, spec.search.space)
        try:
            cfg = spec.resolve(values)
        except AblateError as e:
            ledger.tell(trial, TrialState.FAIL, reason=f"invalid configuration: {e}")
            ctx.log(f"trial {trial.number}: invalid configuration: {e}")
            continue
        key = cell_key(cfg)
        ledger.set_cell_key(trial, key)
        with ledger.heartbeat(trial):
            wait_for_same_config(ledger, trial, key, ctx)
        execute(spec, cfg, key, trial, ledger, ctx, prune=prune)
        finished, running, _ = ledger.search_counts()
        ctx.log(f"search: {finished}/{ctx.trials} trials finished")
