"""Pruning ends a search trial before its last epoch, never at it, and a cell's checkpoints end with
its definitive outcome (COMPLETE, PRUNED, FAIL) while an interrupted cell keeps them to resume."""
from __future__ import annotations

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ablate import execute as execute_module
from ablate.ledger import Ledger, storage_url
from ablate.runner import run_grid, run_search
from ablate.spec import load_spec
from ablate.train import CellFailed, train_cell
from conftest import write_spec

#: one configuration, so that each test's trial trains exactly what the test means it to
MEDIAN = """\
search:
  sampler: random
  objectives: [{metric: val_top1, direction: maximize}]
  trials: 3
  pruner: median
  space:
    model.shift: {choice: [four]}
"""


def _seeded_search(workdir, name: str, epochs: int, reported: list[int]):
    """A median-pruned search whose study already holds two finished trials that reported a top-1
    no trial reaches (101%) at the epochs ``reported`` only: the median pruner, past its two
    startup trials, prunes a new trial at the first of these epochs it is shown."""
    spec = write_spec(workdir / f"{name}.yaml", name=name, epochs=epochs, extra=MEDIAN)
    ledger = Ledger.for_spec(load_spec(spec), storage_url())
    for _ in range(2):
        ledger.study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=101.0,
                                                   intermediate_values={e: 101.0 for e in reported}))
    run_search(str(spec), progress=False)
    [trial] = [t for t in optuna.load_study(study_name=name, storage=storage_url()).trials if t.number == 2]
    return trial


def _cell_run(name: str):
    exp = MlflowClient().get_experiment_by_name(name)
    [run] = mlflow.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'",
                               output_format="list")
    return run


def test_a_trial_worse_than_the_median_only_at_its_last_epoch_completes(workdir):
    trial = _seeded_search(workdir, "last-epoch", epochs=2, reported=[2])
    assert trial.state == TrialState.COMPLETE, trial.user_attrs
    assert sorted(trial.intermediate_values) == [1]  # the pruner never saw epoch 2
    run = _cell_run("last-epoch")
    assert run.data.tags["ablate.state"] == "COMPLETE" and run.info.status == "FINISHED"
    assert trial.value == run.data.metrics["val_top1"]  # the fully trained result, kept
    assert not (workdir / "checkpoints" / "last-epoch").exists()


def test_a_pruned_trial_stops_before_its_last_epoch_and_leaves_no_checkpoint(workdir):
    trial = _seeded_search(workdir, "pruned-early", epochs=3, reported=[2, 3])
    assert trial.state == TrialState.PRUNED
    assert sorted(trial.intermediate_values) == [1, 2]  # pruned at epoch 2 of 3, after epoch 1's checkpoint
    assert not (workdir / "checkpoints" / "pruned-early").exists()  # never resumed: nothing kept
    run = _cell_run("pruned-early")
    assert run.data.tags["ablate.state"] == "PRUNED" and run.info.status == "KILLED"
    assert run.data.tags["ablate.failure"].startswith("pruned after epoch 2 of 3 ")


def _stop_at_epoch(monkeypatch, epoch: int, error: BaseException) -> None:
    """Cells train for real until ``epoch``'s end, then stop with ``error`` before its checkpoint is
    written: the checkpoint of the epoch before is on disk when the cell's outcome is decided."""
    def stopping(cfg, *, on_epoch, **kwargs):
        def hook(stats):
            if stats.epoch == epoch:
                raise error
            on_epoch(stats)
        return train_cell(cfg, on_epoch=hook, **kwargs)

    monkeypatch.setattr(execute_module, "train_cell", stopping)


def test_a_failed_cell_leaves_no_checkpoint_and_an_interrupted_one_keeps_its_own(workdir, monkeypatch):
    failing = write_spec(workdir / "failing.yaml", name="failing", epochs=2)
    _stop_at_epoch(monkeypatch, 2, CellFailed("non-finite loss after epoch 2"))
    run_grid(str(failing), progress=False)
    run = _cell_run("failing")
    assert run.data.tags["ablate.state"] == "FAIL" and run.info.status == "FAILED"
    assert not (workdir / "checkpoints" / "failing").exists()

    # an interruption is no outcome: the cell stays unfinished and resumes from its checkpoint
    stopped = write_spec(workdir / "stopped.yaml", name="stopped", epochs=2)
    _stop_at_epoch(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run_grid(str(stopped), progress=False)
    [cell] = load_spec(stopped).cells()
    assert (workdir / "checkpoints" / "stopped" / cell.key / "last.pt").exists()
    assert _cell_run("stopped").info.status == "RUNNING"
