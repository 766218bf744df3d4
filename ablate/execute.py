"""One cell (or search trial) trained and recorded: the part of a worker that touches the stores.

A worker that has claimed a trial calls :func:`execute`: it opens (or continues) the cell's MLflow
child run, trains with :func:`ablate.train.train_cell` while keeping the trial's heartbeat, then
records the outcome in MLflow first and the ledger second (:func:`record`). If a worker dies
between the two, the next worker that claims the cell finds the finished MLflow run and only
tells the ledger, so each cell ends with exactly one finished run.
"""
from __future__ import annotations

import multiprocessing as mp
import traceback
from pathlib import Path
from typing import Optional

import optuna
import torch
from optuna.trial import TrialState

from ablate import checkpoint, names, text, tracking
from ablate.cell_group import CellGroup, GroupBroken
from ablate.checkpoint import DEFAULT_ROOT
from ablate.config import flat_params
from ablate.context import CHECKPOINT_STOP_EXIT, GROUP_BROKEN_EXIT, Context
from ablate.latency import measure_objectives, objective_metric
from ablate.ledger import LEDGER, TakenOver
from ablate.locks import StoreLost, StoreUnwritable
from ablate.train import CellFailed, describe_failure, is_out_of_memory, resolve_device, train_cell
from ablate.tracking import spec_tags


def objective_values(spec, metrics: dict) -> list[float]:
    if spec.search is None:
        return [metrics[names.VAL_TOP1]]
    return [float(metrics[objective_metric(o.metric)]) for o in spec.search.objectives]


def execute(spec, cfg, key: str, trial, ledger, ctx: Context, *, prune: bool = False) -> str:
    """Train one cell (or trial) and record it. Returns the final state name, or TAKEN_OVER when
    the trial went to another worker meanwhile (this one was paused past the heartbeat's grace)."""
    try:
        return _execute(spec, cfg, key, trial, ledger, ctx, prune=prune)
    except TakenOver as e:  # the cell is the new owner's: its run and checkpoint are left to it
        ctx.log(f"cell {key}: left to another worker: {e}")
        return "TAKEN_OVER"
    except StoreUnwritable as e:
        hand_back(e, key, trial, ledger, ctx)
        raise


def hand_back(e: StoreUnwritable, key: str, trial, ledger, ctx: Context) -> None:
    """A store refused a write for good (a full disk, a read-only file): not this cell's fault, and
    every next write would meet it too, so the worker stops. Nothing more is written to the store
    that refused (no failure recorded there, no retry); the cell goes back to the ledger's queue
    where the ledger can still be written, else the next run finds this worker gone and queues it
    again. Its MLflow run stays RUNNING and its checkpoint in place: the cell resumes from it, and
    each epoch already logged is not logged again."""
    if e.what != LEDGER:
        try:
            ledger.release_gone(lambda t: t.number == trial.number)
        except StoreUnwritable:
            pass  # the ledger is on the same full disk
    ctx.log(f"cell {key}: stopped: {e}")
    e.said = True


def _execute(spec, cfg, key: str, trial, ledger, ctx: Context, *, prune: bool = False) -> str:
    ckpt_dir = Path(ctx.checkpoints) / spec.slug / key
    done = tracking.finished_run(ctx.experiment_id, key)
    if done is not None:
        # A grid: the worker that trained it died before telling the ledger. A search: the sampler
        # proposed a configuration already trained; training is deterministic, so its result is
        # this trial's result too, recorded as this trial's own run that says where it came from.
        if spec.search is not None and done.data.tags.get(names.TRIAL_NUMBER) != str(trial.number):
            tracking.CellRun.copy_of(done, ctx.parent_run_id, trial.number)
        metrics = done.data.metrics
        record(None, ledger, trial, "COMPLETE", objective_values(spec, metrics))  # MLflow has it already
        remove_checkpoints(ckpt_dir, ctx)
        ctx.log(f"cell {key}: already finished in MLflow (top-1 {metrics.get('val_top1', float('nan')):.2f})")
        return "COMPLETE"

    source = tracking.finished_elsewhere(ctx.experiment_id, key) if key in ctx.reusable else None
    if source is not None:
        # another spec trained this very configuration in these stores (the paper's tables share
        # their baseline): its result is this cell's, recorded here as a run that names its source
        tracking.CellRun.reused(source, ctx.experiment_id, ctx.parent_run_id, cfg, key, varied=spec.varied,
                                spec_file=ctx.spec_path, trial_number=trial.number,
                                run_name=run_name(spec, cfg, trial.number), tags=spec_tags(spec))
        metrics = source.data.metrics
        record(None, ledger, trial, "COMPLETE", objective_values(spec, metrics))
        remove_checkpoints(ckpt_dir, ctx)
        ctx.log(f"cell {key}: reused, finished under another spec (experiment {source.info.experiment_id}, "
                f"top-1 {metrics.get('val_top1', float('nan')):.2f}); --no-reuse trains it again")
        return "COMPLETE"

    device = resolve_device(ctx.device)
    run = tracking.CellRun.open(ctx.experiment_id, ctx.parent_run_id, cfg, key, varied=spec.varied,
                                spec_file=ctx.spec_path, device=str(device),
                                trial_number=trial.number,
                                run_name=run_name(spec, cfg, trial.number), tags=spec_tags(spec))
    ctx.log(f"cell {key} ({run_name(spec, cfg, trial.number)}): "
            f"{'resuming' if run.resumed else 'training'} on {device}")

    last_epoch = []  # the last epoch's metrics, logged with the run's own (one value per metric and step)

    def on_epoch(stats):
        step = stats.epoch
        if step < cfg.train.epochs:
            run.log_metrics(stats.metrics(), step=step)
        else:
            last_epoch.append(stats.metrics())
        if prune and step < cfg.train.epochs:
            # The last epoch is never shown to the pruner: a trial that has trained all its epochs
            # has its result, and pruning it then would only throw that result away.
            trial.report(stats.val_top1, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {step} of {cfg.train.epochs} "
                                         f"(top-1 {stats.val_top1:.2f})")

    group = ctx.group or CellGroup()
    try:
        with ledger.heartbeat(trial):
            measured = measure_objectives(spec, cfg, device, run)  # latency:* objectives: built, not trained yet
            group.send({"cell": cfg.model_dump(mode="json"), "checkpoint_dir": str(ckpt_dir)})
            metrics = train_cell(cfg, device=device, checkpoint_dir=ckpt_dir, on_epoch=on_epoch,
                                 before_write=lambda: ledger.check_owner(trial),
                                 on_start=run.set_tags, group=group, log=lambda m: ctx.log(f"  {m}"),
                                 progress=ctx.progress)
    except optuna.TrialPruned as e:
        record(run, ledger, trial, "PRUNED", reason=str(e))
        remove_checkpoints(ckpt_dir, ctx)  # a pruned trial never resumes
        ctx.log(f"cell {key}: {e}")
        return "PRUNED"
    except (KeyboardInterrupt, SystemExit, TakenOver, StoreLost, StoreUnwritable):
        raise  # leave the cell RUNNING: the next run notices the dead worker and resumes it
    except checkpoint.CheckpointWriteFailed as e:
        # not this cell's fault and every next cell would meet it too: stop, and hand the cell
        # back to the queue (its MLflow run stays RUNNING) to resume once the disk has room
        try:
            ledger.release_gone(lambda t: t.number == trial.number)
        except StoreUnwritable:
            pass  # the ledger is on the same full disk: the next run finds this worker gone
        ctx.log(f"cell {key}: stopped: {e}")
        if mp.parent_process() is not None:
            raise SystemExit(CHECKPOINT_STOP_EXIT) from None  # a spawned worker: its parent says the rest
        raise
    except Exception as e:
        if group.distributed and (isinstance(e, GroupBroken) or is_out_of_memory(e)):
            # not the cell's fault: the attempt ends, the group with it, and the cell resumes
            ledger.release_gone(lambda t: t.number == trial.number)
            ctx.log(f"cell {key}: stopped: {describe_failure(e)}; it resumes from its last checkpoint at the next run")
            raise SystemExit(GROUP_BROKEN_EXIT) from None
        reason = describe_failure(e)
        if is_out_of_memory(e) and device.type == "cuda":
            torch.cuda.empty_cache()
        if not isinstance(e, CellFailed) and not is_out_of_memory(e):
            traceback.print_exc()
        record(run, ledger, trial, "FAIL", reason=reason)
        remove_checkpoints(ckpt_dir, ctx)  # a failed cell is not resumed: its checkpoint would only take space
        ctx.log(f"cell {key}: FAILED: {reason}")
        if group.distributed and not isinstance(e, CellFailed):
            # the other ranks may be waiting in a collective this rank never reaches: end the group
            raise SystemExit(GROUP_BROKEN_EXIT) from None
        return "FAIL"
    # the last epoch's metrics and the run's own at that step, in one batch: a metric of both (the
    # throughput, the peak memory) holds the run's value there, and no step is logged twice
    ledger.check_owner(trial)
    run.log_metrics({**(last_epoch[-1] if last_epoch else {}), **{k: v for k, v in metrics.items() if k != "epochs"}},
                    step=metrics["epochs"])
    record(run, ledger, trial, "COMPLETE", objective_values(spec, {**metrics, **measured}))
    remove_checkpoints(ckpt_dir, ctx)  # finished: the MLflow run is the record now
    ctx.log(f"cell {key}: done, top-1 {metrics['val_top1']:.2f}  top-5 {metrics['val_top5']:.2f}  "
            f"{metrics['train_seconds']:.0f}s")
    return "COMPLETE"


def remove_checkpoints(ckpt_dir: Path, ctx: Context) -> None:
    """A cell's checkpoint folder once its outcome is recorded for good (COMPLETE, PRUNED or FAIL),
    and the folders above it once empty (the root only where it is the default one in the working
    directory, which a run creates).

    Only a recorded outcome removes it, and only after :func:`record` succeeded: a cell stopped
    any other way (Ctrl-C or SIGTERM, taken over, a lost or full store, a checkpoint that cannot be
    written, a broken group) is resumed from it, and one whose record raised :class:`TakenOver`
    belongs to its new owner."""
    checkpoint.remove(ckpt_dir, Path(ctx.checkpoints), remove_root=ctx.checkpoints == DEFAULT_ROOT)


def record(run, ledger, trial, state: str, values: Optional[list[float]] = None,
            reason: Optional[str] = None) -> None:
    """Record a cell's outcome (``state``: COMPLETE, PRUNED or FAIL): in MLflow first, the ledger second.

    Every exit of :func:`execute` goes through here. A worker that dies between the two leaves a
    finished MLflow run and a RUNNING trial; the next worker to claim the cell finds the run and
    only tells the ledger (``run`` None: MLflow holds the outcome already).
    """
    ledger.check_owner(trial)  # TakenOver: another worker owns the cell now and records it
    if run is not None:
        run.close(state, reason)
    ledger.tell(trial, TrialState[state], values if state == "COMPLETE" else None, reason=reason)


def run_name(spec, cfg, number: int) -> str:
    flat = flat_params(cfg)
    parts = [f"{k.split('.')[-1]}={text.value(flat[k])}" for k in spec.varied if k in flat]
    return " ".join(parts) or f"trial {number}"
