"""`ablate search`: real Optuna studies over real (tiny) trainings, recorded in MLflow."""
from __future__ import annotations

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ablate.ledger import Ledger, storage_url
from ablate.runner import run_search
from conftest import run_ablate, write_spec

SINGLE = """\
search:
  sampler: random
  objectives: [{metric: val_top1, direction: maximize}]
  trials: 6
  pruner: median
  space:
    train.lr: {choice: [1.0e-6, 3.0e-3]}
    model.shift: {choice: [none, four]}
"""

MULTI = """\
search:
  sampler: nsga2
  objectives: [{metric: val_top1, direction: maximize}, {metric: macs, direction: minimize}]
  trials: 3
  space:
    model.width: {int: [8, 24], step: 8}
    model.shift: {choice: [none, four]}
"""


def _runs(name):
    exp = MlflowClient().get_experiment_by_name(name)
    return mlflow.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'",
                              output_format="list")


@pytest.mark.slow
def test_single_objective_search_prunes(workdir):
    spec = write_spec(workdir / "s.yaml", name="pruned-search", epochs=3, extra=SINGLE)
    counts = run_search(str(spec), progress=False).progress.counts
    study = optuna.load_study(study_name="pruned-search", storage=storage_url())
    states = [t.state for t in study.trials]
    assert len(states) == 6 and counts["finished"] + counts["pruned"] == 6
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states
    # the pruner is shown epochs 1 and 2 of 3 only: a pruned trial stopped before its last epoch
    assert all(set(t.intermediate_values) <= {1, 2} for t in study.trials)
    assert not (workdir / "checkpoints" / "pruned-search").exists()  # finished and pruned cells alike
    runs = _runs("pruned-search")
    by_state = {}
    for r in runs:
        by_state.setdefault(r.data.tags["ablate.state"], []).append(r)
        assert r.data.tags["ablate.trial_number"].isdigit()
    assert {r.info.status for r in by_state.get("PRUNED", [])} == {"KILLED"}
    assert {r.info.status for r in by_state["COMPLETE"]} == {"FINISHED"}


@pytest.mark.slow
def test_multi_objective_search_and_resume_to_larger_total(workdir):
    spec = write_spec(workdir / "m.yaml", name="pareto-search", extra=MULTI)
    run_search(str(spec), progress=False)
    study = optuna.load_study(study_name="pareto-search", storage=storage_url())
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    first = {t.number: t.values for t in study.trials}
    assert len(first) == 3 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.best_trials  # a Pareto front exists
    for t in study.trials:  # the second objective is the trial's analytic MACs, as logged in MLflow
        run = [r for r in _runs("pareto-search") if r.data.tags["ablate.trial_number"] == str(t.number)]
        assert run and run[0].data.metrics["macs"] == t.values[1]

    result = run_ablate("search", str(spec), "--trials", "5", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 trials finished of 5" in result.stdout
    study = optuna.load_study(study_name="pareto-search", storage=storage_url())
    assert len(study.trials) == 5
    assert {t.number: t.values for t in study.trials if t.number in first} == first  # never redone
    # running again with the same total trains nothing
    again = run_ablate("search", str(spec), "--trials", "5", cwd=workdir)
    assert again.returncode == 0 and "training on" not in again.stdout
    finished, running, waiting = Ledger(storage_url(), "pareto-search", ["maximize", "minimize"]).search_counts()
    assert (finished, running, waiting) == (5, 0, 0)


def test_search_refuses_a_grid_spec(workdir):
    write_spec(workdir / "g.yaml")
    result = run_ablate("search", "g.yaml", cwd=workdir)
    assert result.returncode == 2 and "no search section" in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["g.yaml"]


@pytest.mark.slow
def test_parallel_workers_train_a_repeated_configuration_once(workdir):
    """Every trial samples the same configuration: one trains, the others take its result."""
    spec = write_spec(workdir / "r.yaml", name="repeats", extra="""\
search:
  sampler: random
  objectives: [val_top1]
  trials: 3
  space:
    model.shift: {choice: [four]}
""")
    result = run_ablate("search", str(spec), "--workers", "2", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("training on") == 1, result.stdout
    study = optuna.load_study(study_name="repeats", storage=storage_url())
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert len({t.value for t in study.trials}) == 1
    runs = _runs("repeats")
    assert sorted(r.data.tags["ablate.trial_number"] for r in runs) == ["0", "1", "2"]
    assert sum("ablate.reused_from" in r.data.tags for r in runs) == 2
    # the report counts the configuration once, one seed, and says why three runs make one row
    from ablate.report import write_report
    report = write_report(str(spec), workdir / "rep")
    assert [r.seeds for r in report.rows] == [1] and report.repeats == 2
    assert "- runs: 3 complete in 1 configuration (2 of them repeats of a configuration already trained, " \
           "counted once)" in (workdir / "rep" / "report.md").read_text()


def test_a_search_resumed_past_its_total_says_so_and_trains_nothing(workdir):
    from click.testing import CliRunner

    from ablate.cli import cli
    from ablate.spec import load_spec
    spec = write_spec(workdir / "p.yaml", name="past-total", extra=MULTI)
    ledger = Ledger.for_spec(load_spec(spec), storage_url())
    for i in range(5):
        ledger.study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, values=[50.0 + i, 1000.0]))
    result = CliRunner().invoke(cli, ["search", str(spec), "--trials", "3"])
    assert result.exit_code == 0, result.output
    assert "the study already has 5 finished trials, more than --trials 3: nothing to do" in result.output
    assert "trials finished of" not in result.output and "training on" not in result.output
    assert MlflowClient().get_experiment_by_name("past-total") is None  # no parent run was started


def test_a_grid_sampler_study_can_be_told_its_last_trial(workdir):
    """Optuna's GridSampler calls Study.stop after the last grid point, which Optuna allows only
    inside Study.optimize: our workers ask and tell, and must be able to tell that trial."""
    from ablate.search import suggest
    from ablate.spec import load_spec
    spec = load_spec(write_spec(workdir / "g.yaml", name="grid-sampled", extra="""\
search:
  sampler: grid
  objectives: [val_top1]
  trials: 2
  space:
    model.shift: {choice: [none, four]}
"""))
    ledger = Ledger.for_spec(spec, storage_url())
    seen = []
    for _ in range(2):
        trial = ledger.ask()
        seen.append(suggest(trial, spec.search.space)["model.shift"])
        ledger.tell(trial, TrialState.COMPLETE, [50.0])
    assert sorted(seen) == ["four", "none"]
    assert [t.state for t in ledger.trials()] == [TrialState.COMPLETE] * 2


def test_a_trial_waits_for_an_earlier_one_whose_configuration_is_not_set_yet(workdir):
    """Asked, not yet keyed: the earlier trial may be about to train this very configuration."""
    import threading
    import time

    from ablate.context import Context
    from ablate.workers import wait_for_same_config
    from ablate.spec import load_spec
    ledger = Ledger.for_spec(load_spec(write_spec(workdir / "k.yaml", name="keyless", extra=MULTI)), storage_url())
    first, second = ledger.ask(), ledger.ask()
    ledger.set_cell_key(second, "abc")
    said = []
    ctx = Context(spec_path="k.yaml", storage=storage_url(), experiment_id="0", parent_run_id="", checkpoints="c")
    ctx.log = said.append
    timer = threading.Timer(1.0, ledger.set_cell_key, (first, "other"))
    timer.start()
    started = time.monotonic()
    wait_for_same_config(ledger, second, "abc", ctx)  # returns once the first has its own key
    assert time.monotonic() - started >= 0.9 and not said
    timer.join()
    ledger.set_cell_key(second, "same")
    third = ledger.ask()
    ledger.set_cell_key(third, "same")
    timer = threading.Timer(1.0, ledger.tell, (second, TrialState.COMPLETE, [1.0, 1.0]))
    timer.start()
    wait_for_same_config(ledger, third, "same", ctx)  # the same key: waits for its result, says so
    timer.join()
    assert said == [f"trial {third.number}: same configuration as a running trial; waiting for its result"]
