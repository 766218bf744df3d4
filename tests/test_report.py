"""Reports from a real MLflow sqlite store: tables, CSV, plots, Pareto sets, artifacts."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from ablate.cli import cli
from ablate.pareto import dominates, pareto_front
from ablate.report import report_experiment, write_report
from ablate.spec import Objective, load_spec, same_value
from ablate.spec.types import Reference, ReferenceRow, Spec
from ablate.tracking import param_value

# ---------------------------------------------------------------- pareto_front


def test_pareto_two_objectives_known_points():
    # (top-1 max, GMACs min)
    points = [(81, 2.0), (60, 1.5), (71, 2.0), (75, 0.5), (81, 3.0), (50, 0.5)]
    assert pareto_front(points, ["maximize", "minimize"]) == [0, 3]


def test_pareto_ties_are_all_kept():
    points = [(1, 1), (1, 1), (0, 0), (0, 2)]
    assert pareto_front(points, ["maximize", "maximize"]) == [0, 1, 3]
    # equal on one objective, better on the other: dominated
    assert pareto_front([(1, 1), (1, 2)], ["maximize", "maximize"]) == [1]


def test_pareto_three_objectives():
    points = [
        (0.9, 10, 5),   # best accuracy
        (0.8, 5, 5),    # cheaper
        (0.8, 5, 6),    # dominated by 1 (slower)
        (0.7, 4, 9),    # cheapest MACs
        (0.7, 11, 1),   # fastest
        (0.6, 12, 7),   # dominated by everything relevant
    ]
    assert pareto_front(points, ["maximize", "minimize", "minimize"]) == [0, 1, 3, 4]


def test_pareto_one_objective_is_the_best_and_nan_never_wins():
    assert pareto_front([(3,), (5,), (4,), (5,)], ["maximize"]) == [1, 3]
    assert pareto_front([(3,), (1,), (2,)], ["minimize"]) == [1]
    assert pareto_front([(math.nan, 0), (1, 1)], ["maximize", "minimize"]) == [1]


def test_pareto_rejects_unknown_direction():
    with pytest.raises(ValueError, match="allowed: maximize, minimize"):
        pareto_front([(1,)], ["up"])
    assert dominates((2, 1), (1, 1), ["max", "min"])
    assert not dominates((1, 1), (1, 1), ["max", "min"])


def test_cost_units_read_like_the_paper_for_big_models_and_stay_readable_for_tiny_ones():
    from ablate.plots import count_unit, metric_axis
    assert count_unit([14.1e9, 0.9e9]) == ("G", 1e9)
    assert count_unit([6.3e6, None, math.nan]) == ("M", 1e6)
    assert count_unit([27_800.0]) == ("k", 1e3)
    assert count_unit([]) == ("", 1.0)
    assert metric_axis("macs", [2e6]) == ("MMACs", 1e6)
    assert metric_axis("val_top1", [80.0]) == ("val_top1", 1.0)


def test_reference_values_compare_across_types():
    """MLflow params are strings; read back as values they match a spec's YAML values."""
    def same(param, wanted):
        return same_value(param_value(param), wanted)
    assert same("four", "four")
    assert same("16", 16) and same("4.0", 4) and not same("16", 32)
    assert same("[[0, 1], [1, 0]]", [[0, 1], [1, 0]])
    assert same("True", True) and not same("True", 1) and same("None", None) and not same("None", "four")


# ---------------------------------------------------------------- a real MLflow store

VARIED = ["model.patch_size", "model.shift"]
FIGURES = ["learning_curves.png", "learning_curves.svg", "top1_vs_macs.png", "top1_vs_macs.svg"]


def _child(c: MlflowClient, exp: str, parent: str, *, params: dict, metrics: dict, state: str = "COMPLETE",
           trial: int | None = None, key: str | None = None, varied=VARIED, epochs: int = 0) -> str:
    """A finished cell run; with ``epochs``, per-epoch val_top1 rising to its final value and
    train_loss falling, as the runner logs them (step = epoch)."""
    tags = {"ablate.role": "cell", "ablate.state": state, "mlflow.parentRunId": parent,
            "ablate.varied": json.dumps(sorted(varied)), "ablate.cell_key": key or json.dumps(params)}
    if trial is not None:
        tags["ablate.trial_number"] = str(trial)
    run = c.create_run(exp, tags=tags)
    c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                metrics=[Metric(k, float(v), 0, epochs) for k, v in metrics.items()])  # as the runner: step = epochs
    if epochs:
        top1 = metrics["val_top1"]
        c.log_batch(run.info.run_id, metrics=[
            m for e in range(1, epochs + 1) for m in (Metric("val_top1", top1 - 10 * (epochs - e), 0, e),
                                                      Metric("train_loss", 2.0 / e, 0, e))])
    c.set_terminated(run.info.run_id, {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED"))
    return run.info.run_id


def _metrics(top1, top5, gmacs, seconds=10.0, params_m=1.0):
    return {"val_top1": top1, "val_top5": top5, "macs": gmacs * 1e9, "flops": 2 * gmacs * 1e9,
            "params_paper": params_m * 1e6, "params": params_m * 1e6 + 5000, "train_seconds": seconds}


def _grid(c: MlflowClient, folder: Path) -> str:
    """The runs of GRID_SPEC's cells (tagged with their real keys, as a worker tags them), one failed
    cell of a value it does not have."""
    (folder / "grid.yaml").write_text(GRID_SPEC)
    keys = {(cell.values["model.shift"], cell.values["model.patch_size"], cell.seed): cell.key
            for cell in load_spec(folder / "grid.yaml", check_paths=False).cells()}
    exp = c.create_experiment("shift-grid")
    old = c.create_run(exp, tags={"ablate.role": "parent", "ablate.kind": "grid"})
    c.set_terminated(old.info.run_id)
    parent = c.create_run(exp, tags={"ablate.role": "parent", "ablate.kind": "grid"}).info.run_id
    cells = [  # shift, patch, seed, top1, top5, GMACs, seconds
        ("four", 16, 0, 80.0, 95.0, 2.0, 10.0),
        ("four", 16, 1, 82.0, 96.0, 2.0, 12.0),
        ("none", 16, 0, 60.0, 85.0, 1.5, 8.0),
        ("up", 16, 0, 70.0, 90.0, 2.0, 9.0),
        ("up", 16, 1, 73.0, 91.0, 2.0, 11.0),
        ("four", 32, 0, 75.0, 93.0, 0.5, 4.0),
    ]
    for n, (shift, patch, seed, t1, t5, g, s) in enumerate(cells):
        _child(c, exp, parent, params={"model.shift": shift, "model.patch_size": patch, "train.seed": seed,
                                       "model.width": 64, "data.name": "digits", "train.epochs": 3},
               metrics=_metrics(t1, t5, g, s), trial=n, epochs=3, key=keys[(shift, patch, seed)])
    # a failed cell with a (bogus) accuracy: must not appear anywhere
    _child(c, exp, parent, params={"model.shift": "eight", "model.patch_size": 16, "train.seed": 0,
                                   "model.width": 64, "data.name": "digits", "train.epochs": 3},
           metrics={"val_top1": 99.0, "macs": 1e8},
           state="FAIL", trial=len(cells))
    c.set_terminated(parent)
    return parent


def _search(c: MlflowClient) -> tuple[str, dict]:
    exp = c.create_experiment("width-search")
    parent = c.create_run(exp, tags={"ablate.role": "parent", "ablate.kind": "search"}).info.run_id
    trials = {  # trial: (width, shift, top1, GMACs)
        0: (64, "four", 70.0, 1.0),
        1: (128, "four", 80.0, 4.0),
        2: (96, "none", 65.0, 2.0),   # dominated by 0
        3: (32, "four", 60.0, 0.3),
        4: (128, "eight", 80.0, 4.0),  # ties trial 1: both on the front
        7: (192, "four", 84.0, 9.0),
    }
    for n, (width, shift, t1, g) in trials.items():
        _child(c, exp, parent, params={"model.width": width, "model.shift": shift, "train.seed": 0},
               metrics=_metrics(t1, t1 + 10, g), trial=n, varied=["model.width", "model.shift"])
    _child(c, exp, parent, params={"model.width": 160, "model.shift": "four", "train.seed": 0},
           metrics={"val_top1": 99.0}, state="PRUNED", trial=5, varied=["model.width", "model.shift"])
    _child(c, exp, parent, params={"model.width": 256, "model.shift": "four", "train.seed": 0},
           metrics={}, state="FAIL", trial=6, varied=["model.width", "model.shift"])
    return parent, trials


def _edited(c: MlflowClient) -> None:
    """A spec run, then edited (train.epochs 2 -> 3) and run again into the same experiment:
    the same seed twice, in two configurations."""
    exp = c.create_experiment("edited-spec")
    parent = c.create_run(exp, tags={"ablate.role": "parent", "ablate.kind": "grid"}).info.run_id
    for n, (shift, epochs, top1) in enumerate([("four", 2, 40.0), ("none", 2, 30.0),
                                               ("four", 3, 55.0), ("none", 3, 45.0)]):
        _child(c, exp, parent, params={"model.shift": shift, "train.epochs": epochs, "train.seed": 0,
                                       "data.name": "digits"},
               metrics=_metrics(top1, top1 + 20, 0.5), trial=n % 2, varied=["model.shift"])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlstore")
    uri = f"sqlite:///{root}/mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    c = MlflowClient(uri)
    grid_parent = _grid(c, root)
    search_parent, _ = _search(c)
    c.create_experiment("nothing-finished")
    _edited(c)
    yield SimpleNamespace(uri=uri, root=root, client=c, grid_parent=grid_parent, search_parent=search_parent)
    mp.undo()


class _Spec(SimpleNamespace):
    identity_overrides = property(Spec.identity_overrides.fget)  # the loaded spec's own reading of its overrides


def _spec(**parts) -> SimpleNamespace:
    """What a report reads of a loaded spec (:class:`ablate.spec.Spec`): no search, reference,
    baseline or overrides unless given."""
    return _Spec(**{"search": None, "reference": None, "baseline": {}, "overrides": {}, **parts})


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_report_table_csv_png_and_artifacts(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["report", "shift-grid"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "reports" / "shift-grid"  # the default: git-ignored, never the committed results/
    assert not (tmp_path / "results").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURES + ["report.csv", "report.md"])

    rows = _read_csv(out / "report.csv")
    by = {(r["model.patch_size"], r["model.shift"]): r for r in rows}
    assert list(by) == [("16", "four"), ("16", "none"), ("16", "up"), ("32", "four")]  # grid order
    four = by[("16", "four")]
    assert four["seeds"] == "2"
    assert float(four["top1_mean"]) == pytest.approx(81.0)
    assert float(four["top1_std"]) == pytest.approx(math.sqrt(2), abs=1e-4)  # sample std of 80, 82
    assert float(four["top5_mean"]) == pytest.approx(95.5)
    assert float(four["gmacs"]) == pytest.approx(2.0)
    assert float(four["params_m"]) == pytest.approx(1.0)
    assert float(four["train_seconds"]) == pytest.approx(11.0)
    assert by[("16", "none")]["seeds"] == "1" and by[("16", "none")]["top1_std"] == ""
    assert "eight" not in (out / "report.csv").read_text()  # the failed run is ignored

    md = (out / "report.md").read_text()
    assert ("| seeds | top-1 (%) | Δ top-1 (95% CI) | CI method | top-5 (%) | params (M) | GMACs | train (s) |"
            in md)
    # the first configuration is the baseline; "up" has its seeds: paired differences 10, 9
    assert "| 16 | four | 2 | 81.00 ± 1.41 | baseline |  | 95.50 ± 0.71 | 1 | 2 | 11.0 |" in md
    assert "| 16 | none | 1 | 60.00 | -21.00 | one seed: no interval can be given | 85.00 |" in md
    assert "| 16 | up | 2 | 71.50 ± 2.12 | -9.50 [-15.85, -3.15] * | paired t, 2 seeds |" in md
    assert "6 complete in 4 configurations; 1 failed" in md
    assert "baseline: the first configuration, model.patch_size=16, model.shift=four" in md
    assert "digits, 3 epochs, top-1 on the validation split" in md
    assert "generated by `ablate report shift-grid`" in md
    assert "eight" not in md and "Pareto front" not in md  # a grid has no search section
    # the store, never as the absolute path of this machine
    assert str(store.root) not in md and str(store.root) not in (out / "report.csv").read_text()
    assert "`sqlite:///<outside the working directory>/mlflow.db`" in md
    assert str(store.root) not in result.output

    for name in FIGURES:
        if name.endswith(".png"):
            with Image.open(out / name) as im:
                im.verify()
                assert im.format == "PNG"
        else:
            assert (out / name).read_text().lstrip().startswith("<?xml")
    # logged on the most recent parent run, not the older one
    logged = {Path(a.path).name for a in store.client.list_artifacts(store.grid_parent, "report")}
    assert {"report.md", "report.csv", *FIGURES} <= logged


def test_reference_column_from_the_spec(store, tmp_path):
    spec = _spec(
        name="shift-grid", varied=["model.shift", "model.patch_size", "train.seed"],
        reference=Reference("S2-MLP paper, Table 7", (
            ReferenceRow({"model.shift": "four", "model.patch_size": 16}, top1=87.1, top5=97.1, gmacs=2.5),
            ReferenceRow({"model.shift": "none"}, top1=56.7, top5=81.0))))
    report = report_experiment("shift-grid", spec=spec, out=tmp_path, log_artifacts=False)
    assert report.varied == ["model.shift", "model.patch_size"]  # spec order, seed pooled
    rows = {r["model.shift"] + "/" + r["model.patch_size"]: r for r in _read_csv(tmp_path / "report.csv")}
    assert rows["four/16"]["paper_top1"] == "87.1" and rows["four/16"]["paper_top5"] == "97.1"
    assert rows["none/16"]["paper_top1"] == "56.7"
    assert rows["up/16"]["paper_top1"] == "" and rows["four/32"]["paper_top1"] == ""
    md = (tmp_path / "report.md").read_text()
    assert "| top-1 (%) | paper top-1 | Δ top-1 (95% CI) |" in md  # the paper's number beside ours
    assert "| four | 16 | 2 | 81.00 ± 1.41 | 87.1 | baseline |  | 95.50 ± 0.71 | 97.1 |" in md
    assert "Paper numbers: S2-MLP paper, Table 7." in md
    four = next(r for r in report.rows if r.values == {"model.shift": "four", "model.patch_size": "16"})
    assert four.paper_macs == pytest.approx(2.5e9)  # the hollow marker sits at the paper's cost

    # runs shrunk with --set: the paper's rows stay, with what makes them a different model
    spec.overrides = {"model.width": 64, "train.epochs": 1, "data.workers": 2}
    report_experiment("shift-grid", spec=spec, out=tmp_path, log_artifacts=False)
    assert ("Paper numbers: S2-MLP paper, Table 7. They are for the spec as written: these runs changed "
            "model.width, train.epochs with --set, so") in (tmp_path / "report.md").read_text()
    # machine-local settings alone (where the data is, how a batch is split) change no model
    spec.overrides = {"data.workers": 2, "train.micro_batch": 16}
    report_experiment("shift-grid", spec=spec, out=tmp_path, log_artifacts=False)
    assert "Paper numbers: S2-MLP paper, Table 7.\n" in (tmp_path / "report.md").read_text()


def test_search_report_pareto_table_and_history(store, tmp_path):
    spec = _spec(name="width-search", varied=["model.width", "model.shift"],
                 search=SimpleNamespace(objectives=[Objective("val_top1", "maximize"), Objective("macs", "minimize")]))
    report = report_experiment("width-search", spec=spec, out=tmp_path)
    s = report.search
    assert [t.trial_number for t in s.trials] == [0, 1, 2, 3, 4, 7]  # COMPLETE trials only
    assert sorted(s.trials[i].trial_number for i in s.front) == [0, 1, 3, 4, 7]
    assert report.counts == {"finished": 6, "pruned": 1, "failed": 1, "running": 0}
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "report.csv", *FIGURES, "pareto.png",
                                                    "pareto.svg", "history.png", "history.svg"}
    for name in ("pareto.png", "history.png", "top1_vs_macs.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()
    md = (tmp_path / "report.md").read_text()
    assert "1 pruned, 1 failed" in md
    assert "## Pareto front" in md and "5 non-dominated trials of 6 complete trials" in md
    table = md.split("## Pareto front")[1]
    assert "| trial | model.width | model.shift | val_top1 ↑ | GMACs ↓ |" in table
    assert "| 7 | 192 | four | 84.00 | 9 |" in table and "| 3 | 32 | four | 60.00 | 0.3 |" in table
    assert "| 2 | 96 |" not in table  # dominated
    logged = {Path(a.path).name for a in store.client.list_artifacts(store.search_parent, "report")}
    assert {"history.png", "pareto.png"} <= logged


def test_single_objective_search_from_the_experiment_name(store, tmp_path):
    # No spec: the varied keys come from the runs' tags; the objective defaults to top-1.
    report = write_report("width-search", out=tmp_path, log_artifacts=False)
    assert report.varied == ["model.shift", "model.width"]
    assert sorted(report.search.trials[i].trial_number for i in report.search.front) == [7]
    assert not (tmp_path / "pareto.png").exists() and (tmp_path / "history.png").exists()
    assert "## Best trial" in (tmp_path / "report.md").read_text()


def test_no_finished_runs_is_a_user_error_naming_the_store(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["report", "nothing-finished"])
    assert result.exit_code == 2
    assert "no finished runs" in result.output and store.uri in result.output
    assert not (tmp_path / "results").exists() and not (tmp_path / "reports").exists()
    result = CliRunner().invoke(cli, ["report", "no-such-experiment"])
    assert result.exit_code == 2 and "no MLflow experiment named 'no-such-experiment'" in result.output
    assert "shift-grid" in result.output
    result = CliRunner().invoke(cli, ["report", "missing.yaml"])
    assert result.exit_code == 2 and "missing.yaml: spec file not found" in result.output


def test_a_failure_while_rendering_leaves_no_partial_files(store, tmp_path, monkeypatch):
    import ablate.plots

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ablate.plots, "plot_history", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report("width-search", out=tmp_path / "out", log_artifacts=False)
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- real spec files

GRID_SPEC = """\
name: shift-grid
data: {name: digits}
model: {image_size: 32, patch_size: 16, width: 64, depth: 1, shift: four}
grid:
  model.shift: [four, none, up]
  model.patch_size: [16, 32]
seeds: [0, 1]
reference:
  source: "S2-MLP paper, Table 7 (ImageNet100)"
  rows:
    - {when: {model.shift: four, model.patch_size: 16}, top1: 87.1, top5: 97.1, params_m: 71, gmacs: 14.0}
    - {when: {model.shift: none, model.patch_size: 16}, top1: 56.7, top5: 81.0, params_m: 71, gmacs: 14.0}
report:
  baseline: {model.shift: up}
"""

SEARCH_SPEC = """\
name: width-search
data: {name: digits}
model: {image_size: 16, patch_size: 4, width: 64, depth: 1, shift: four}
search:
  sampler: nsga2
  objectives: [{metric: val_top1, direction: maximize}, {metric: macs, direction: minimize}]
  trials: 8
  space:
    model.width: {int: [32, 192], step: 32}
    model.shift: {choice: [none, four, eight]}
"""


def test_report_of_a_spec_file_with_a_reference(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.yaml").write_text(GRID_SPEC)
    result = CliRunner().invoke(cli, ["report", "grid.yaml", "--out", "out"])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "out" / "report.md").read_text()
    assert "generated by `ablate report grid.yaml --out out`" in md and "spec `grid.yaml`" in md
    assert "| model.shift | model.patch_size | seeds |" in md  # the spec's order, seeds pooled
    # report.baseline: up, at each row's patch size where it was run (16), else the first up (16)
    assert "- baseline: model.shift=up (the spec's report.baseline)" in md
    assert "| four | 16 | 2 | 81.00 ± 1.41 | 87.1 | +9.50 [+3.15, +15.85] * | paired t, 2 seeds | 95.50 ± 0.71 |" in md
    assert "| up | 16 | 2 | 71.50 ± 2.12 |  | baseline |  | 90.50 ± 0.71 |  |" in md
    assert "| none | 16 | 1 | 60.00 | 56.7 | -11.50 | one seed: no interval can be given |" in md
    assert "| four | 32 | 1 | 75.00 |  | +3.50 | one seed: no interval can be given |" in md
    assert "Paper numbers: S2-MLP paper, Table 7 (ImageNet100)." in md
    # the failed cell's value is not in the spec: set apart, not counted as a failure of its grid
    assert "- runs: 6 complete in 4 configurations\n" in md
    assert "Ended without a result, not shown: model.shift=eight, model.patch_size=16 (failed)." in md


def test_search_objectives_from_the_spec_file_or_the_parent_tag(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "search.yaml"
    spec.write_text(SEARCH_SPEC)
    by_spec = write_report(str(spec), out=tmp_path / "a", log_artifacts=False)
    assert by_spec.search.objectives == [("val_top1", "maximize"), ("macs", "minimize")]
    assert len(by_spec.search.front) == 5 and (tmp_path / "a" / "pareto.png").exists()
    # Given only the experiment name, the parent run's spec_file tag leads to the same spec.
    store.client.set_tag(store.search_parent, "ablate.spec_file", str(spec))
    try:
        by_name = write_report("width-search", out=tmp_path / "b", log_artifacts=False)
    finally:
        store.client.delete_tag(store.search_parent, "ablate.spec_file")
    assert by_name.search.objectives == by_spec.search.objectives
    assert by_name.search.front == by_spec.search.front


# ---------------------------------------------------------------- grouping, statistics, stores


def test_runs_differing_in_a_setting_the_spec_does_not_vary_are_separate_rows(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["report", "edited-spec", "--out", "out"])
    assert result.exit_code == 0, result.output
    assert "edited-spec: 4 runs in 4 configurations" in result.output  # not 2 configurations of 2 seeds
    rows = _read_csv(tmp_path / "out" / "report.csv")
    assert [(r["model.shift"], r["train.epochs"], r["seeds"], r["top1_mean"]) for r in rows] == [
        ("four", "2", "1", "40.0000"), ("four", "3", "1", "55.0000"),
        ("none", "2", "1", "30.0000"), ("none", "3", "1", "45.0000")]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| model.shift | train.epochs | seeds |" in md
    assert "differ in settings the spec does not vary: train.epochs" in md
    assert "2–3 epochs" in md


def test_grouping_is_by_the_whole_configuration_but_the_seed():
    from ablate.report import CellResult, group_by_config

    def run(i, **params):
        return CellResult(f"r{i}", {k.replace("_", "."): str(v) for k, v in params.items()}, {}, {}, i)
    cells = [run(0, model_shift="four", train_seed=0, train_epochs=2, data_root="/a"),
             run(1, model_shift="four", train_seed=1, train_epochs=2, data_root="/b"),  # a seed; paths are local
             run(2, model_shift="four", train_seed=0, train_epochs=3, data_root="/a")]
    rows, differing = group_by_config(cells, ["model.shift"])
    assert [[c.run_id for c in r.runs] for r in rows] == [["r0", "r1"], ["r2"]]
    assert differing == ["train.epochs"]
    assert rows[1].values == {"model.shift": "four", "train.epochs": "3"}


def test_each_mixer_is_compared_with_no_mixing_at_its_own_patch_size():
    """Rows whose models have different settings (the shift's pattern, the token MLP's hidden size)
    are matched on the settings both have: mlp at patch 4 against none at patch 4, not at patch 2."""
    from ablate.report import CellResult, group_by_config
    from ablate.report.compare import compare_with_baseline

    def run(i, top1, **params):
        return CellResult(f"r{i}", {k.replace("_", ".", 1): str(v) for k, v in params.items()},
                          {"val_top1": top1}, {}, i)
    cells = [run(0, 95.0, model_token_mixing="shift", model_shift="four", model_patch_size=2),
             run(1, 50.0, model_token_mixing="none", model_patch_size=2),
             run(2, 97.0, model_token_mixing="mlp", model_patch_size=2),
             run(3, 96.0, model_token_mixing="mlp", model_patch_size=4),
             run(4, 70.0, model_token_mixing="none", model_patch_size=4)]
    rows, _ = group_by_config(cells, ["model.patch_size", "model.token_mixing", "model.shift"])
    compare_with_baseline(rows, {"model.token_mixing": "none"})
    base = {(r.values["model.patch_size"], r.values["model.token_mixing"]): r.baseline.values["model.patch_size"]
            for r in rows}
    assert base == {("2", "shift"): "2", ("2", "none"): "2", ("2", "mlp"): "2", ("4", "mlp"): "4", ("4", "none"): "4"}
    assert next(r for r in rows if r.values["model.patch_size"] == "4" and r.values["model.token_mixing"] == "mlp"
                ).delta.mean == pytest.approx(26.0)
    assert rows[1].values["model.shift"] == "-"  # none has no shift pattern


def test_paired_and_welch_intervals_match_scipy():
    from scipy import stats

    from ablate.report.stats import NO_INTERVAL, PAIRED, WELCH, difference, format_difference
    a, b = {0: 95.0, 1: 96.5, 2: 95.8}, {0: 80.1, 1: 82.0, 2: 79.5}
    d = difference(a, b)
    ci = stats.ttest_rel(list(a.values()), list(b.values())).confidence_interval(0.95)
    assert d.method == PAIRED and d.seeds == "3"
    assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert d.excludes_zero and format_difference(d).endswith(" *")
    c = {3: 81.0, 4: 79.0}  # other seeds: not paired
    d = difference(a, c)
    ci = stats.ttest_ind(list(a.values()), list(c.values()), equal_var=False).confidence_interval(0.95)
    assert d.method == WELCH and d.seeds == "3 vs 2"
    assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    close = difference({0: 80.0, 1: 82.0}, {0: 81.0, 1: 80.0})
    assert close.has_interval and not close.excludes_zero and "*" not in format_difference(close)
    one = difference({0: 80.0}, {0: 75.0})
    assert one.method == NO_INTERVAL and not one.has_interval and format_difference(one) == "+5.00"


def test_baseline_from_the_spec_per_row_and_when_nothing_has_it(store, tmp_path):
    spec = _spec(name="shift-grid", varied=["model.shift", "model.patch_size"], baseline={"model.shift": "up"})
    report = report_experiment("shift-grid", spec=spec, out=tmp_path, log_artifacts=False)
    base = {tuple(r.values.values()): tuple(r.baseline.values.values()) for r in report.rows}
    assert base == {("four", "16"): ("up", "16"), ("none", "16"): ("up", "16"), ("up", "16"): ("up", "16"),
                    ("four", "32"): ("up", "16")}  # no up at patch size 32: the first up
    rows = {r["model.shift"] + "/" + r["model.patch_size"]: r for r in _read_csv(tmp_path / "report.csv")}
    assert rows["four/16"]["delta_method"] == "paired t" and rows["four/16"]["delta_excludes_zero"] == "true"
    assert float(rows["four/16"]["delta_top1"]) == pytest.approx(9.5)
    assert rows["up/16"]["baseline"] == "self" and rows["up/16"]["delta_top1"] == ""
    spec.baseline = {"model.shift": "eight"}  # only a failed run has it
    report = report_experiment("shift-grid", spec=spec, out=tmp_path, log_artifacts=False)
    assert all(r.baseline is report.rows[0] for r in report.rows)
    assert "no finished configuration has model.shift=eight" in (tmp_path / "report.md").read_text()


def test_learning_curves_come_from_the_per_epoch_history(store, tmp_path):
    report = write_report("shift-grid", out=tmp_path, log_artifacts=False)
    four = report.rows[0]
    assert four.values == {"model.patch_size": "16", "model.shift": "four"}
    assert four.history["val_top1"] == [{1: 60.0, 2: 70.0, 3: 80.0}, {1: 62.0, 2: 72.0, 3: 82.0}]
    assert four.history["train_loss"][0] == {1: 2.0, 2: 1.0, 3: pytest.approx(2 / 3)}
    assert "![learning curves](learning_curves.png)" in (tmp_path / "report.md").read_text()


def test_the_store_is_shown_relative_or_masked_never_absolute(tmp_path):
    from ablate.report import shown_store
    inside = tmp_path / "runs" / "mlflow.db"
    assert shown_store(f"sqlite:///{inside}", cwd=str(tmp_path)) == "sqlite:///runs/mlflow.db"
    assert shown_store("sqlite:////srv/lab/alice/mlflow.db", cwd=str(tmp_path)) == \
        "sqlite:///<outside the working directory>/mlflow.db"
    assert shown_store("/srv/lab/alice/mlruns", cwd=str(tmp_path)) == "<outside the working directory>/mlruns"
    assert shown_store("postgresql://alice:s3cret@db.lab:5432/mlflow") == "postgresql://alice:***@db.lab:5432/mlflow"
    assert shown_store("http://mlflow.lab:5000") == "http://mlflow.lab:5000"


def test_absolute_paths_in_the_command_are_not_written(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.yaml").write_text(GRID_SPEC)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-out"
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "grid.yaml"), "--out", str(elsewhere)])
    assert result.exit_code == 0, result.output
    md = (elsewhere / "report.md").read_text()
    assert str(tmp_path) not in md
    # --out outside the working directory: relative to it, so that the command runs again there
    assert (f"generated by `ablate report grid.yaml --out ../{elsewhere.name}`, run in `../{tmp_path.name}` "
            "from this report's folder") in md
    assert "spec `grid.yaml`" in md


def test_the_command_of_a_report_of_a_spec_outside_the_working_directory_runs_again(store, tmp_path, monkeypatch):
    """It said `ablate report <outside the working directory>/grid.yaml`, which no one could run."""
    specs, cwd = tmp_path / "specs", tmp_path / "cwd"
    specs.mkdir()
    cwd.mkdir()
    (specs / "grid.yaml").write_text(GRID_SPEC)
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(cli, ["report", str(specs / "grid.yaml")])
    assert result.exit_code == 0, result.output
    out = cwd / "reports" / "shift-grid"
    md = (out / "report.md").read_text()
    assert str(tmp_path) not in md and "<outside the working directory>/grid.yaml" not in md
    assert ("generated by `ablate report ../specs/grid.yaml`, run in `../..` from this report's folder "
            "(the working directory it ran in)") in md
    assert "spec `../specs/grid.yaml`" in md
    # run again where it says, as it says: the same report
    monkeypatch.chdir(out / "../..")
    again = CliRunner().invoke(cli, ["report", "../specs/grid.yaml"])
    assert again.exit_code == 0, again.output


def test_a_folder_without_runs_is_one_line_and_creates_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(cli, ["report", "quickstart"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/, no reports/


def test_the_report_shows_what_training_cost(workdir):
    """Runs that recorded their training cost (ablate/train.py) get img/s, MFU, GPU-h and peak memory
    columns, mean over seeds; a report of runs without them has none (see the test above)."""
    from conftest import write_spec

    from ablate.report import write_report
    from ablate.runner import run_grid
    spec = write_spec(workdir / "c.yaml", name="costed", epochs=1, extra="grid:\n  model.shift: [none, four]\n")
    assert run_grid(str(spec), device="cpu").ok
    write_report(str(spec), out=str(workdir / "out"))
    md = (workdir / "out" / "report.md").read_text()
    # trained on a CPU: CPU-hours, never GPU-hours; a CPU has no known peak, so no MFU
    assert "| train (s) | img/s | CPU-h | peak mem (GB) |" in md and "MFU" not in md and "GPU-h" not in md
    rows = list(csv.DictReader(io.StringIO((workdir / "out" / "report.csv").read_text())))
    assert all(float(r["images_per_second"]) > 0 and float(r["cpu_hours"]) > 0 for r in rows)
    assert "gpu_hours" not in rows[0]


def _device_runs(c: MlflowClient, name: str, runs: list[tuple[str, int, str, float]]) -> None:
    """Finished cell runs of experiment ``name``: (shift, seed, the device it recorded, its device-hours)."""
    exp = c.create_experiment(name)
    parent = c.create_run(exp, tags={"ablate.role": "parent", "ablate.kind": "grid"}).info.run_id
    for n, (shift, seed, device, hours) in enumerate(runs):
        run = _child(c, exp, parent, params={"model.shift": shift, "train.seed": seed, "data.name": "digits"},
                     metrics={**_metrics(70.0 + n, 90.0, 0.5), "gpu_hours": hours}, trial=n,
                     varied=["model.shift"])
        c.set_tag(run, "ablate.device_name", device)
        c.set_tag(run, "ablate.device", "cpu" if device == "cpu" else "cuda:0")


def test_device_hours_are_labelled_by_what_the_runs_trained_on(workdir):
    """The GPU-h column was filled for runs that trained on a CPU: each kind of device has its own
    column (CPU-h, GPU-h), in the table, the CSV and the --cost gpu_hours figure."""
    c = MlflowClient()
    _device_runs(c, "on-cpu", [("none", 0, "cpu", 0.01), ("four", 0, "cpu", 0.02)])
    _device_runs(c, "on-both", [("none", 0, "cpu", 0.5), ("none", 1, "NVIDIA H100 80GB HBM3", 0.1),
                                ("four", 0, "NVIDIA H100 80GB HBM3", 0.2)])

    write_report("on-cpu", out=str(workdir / "cpu"), cost="gpu_hours")
    md = (workdir / "cpu" / "report.md").read_text()
    assert "| train (s) | CPU-h |" in md and "GPU-h" not in md and "GPU-hours" not in md
    assert "CPU-h: device-hours of training" in md
    assert "![top-1 against CPU-hours](top1_vs_gpu_hours.png)" in md
    assert "CPU-hours of training" in (workdir / "cpu" / "top1_vs_gpu_hours.svg").read_text()
    assert "cpu_hours" in _read_csv(workdir / "cpu" / "report.csv")[0]

    # a configuration whose seeds ran on a CPU and a GPU: each kind's hours in its own column, never one mean
    write_report("on-both", out=str(workdir / "both"), cost="gpu_hours")
    md = (workdir / "both" / "report.md").read_text()
    assert "| train (s) | CPU-h | GPU-h |" in md
    assert "| none | 2 | 70.50 ± 0.71 | baseline |" in md and "| 0.5 | 0.1 |" in md
    assert "| four | 1 |" in md and "|  | 0.2 |" in md
    rows = {r["model.shift"]: r for r in _read_csv(workdir / "both" / "report.csv")}
    assert (rows["none"]["cpu_hours"], rows["none"]["gpu_hours"]) == ("0.5", "0.1")
    assert (rows["four"]["cpu_hours"], rows["four"]["gpu_hours"]) == ("", "0.2")
    svg = (workdir / "both" / "top1_vs_gpu_hours.svg").read_text()
    assert "device-hours (CPU and GPU runs mixed) of training" in svg


def test_failures_are_counted_per_cell_not_per_run():
    """Three cells that each failed twice are three failed cells (the report said 6); a cell that
    failed and then finished is not failed."""
    from ablate.report import CellResult, outcome_counts

    def run(key, state, t):
        return CellResult(f"{key}-{t}", {}, {}, {"ablate.cell_key": key, "ablate.state": state}, t)
    children = [run(k, "FAIL", t) for t, k in enumerate(["a", "b", "c", "a", "b", "c"])]
    children += [run("d", "FAIL", 10), run("d", "COMPLETE", 11), run("e", "COMPLETE", 12), run("f", "RUNNING", 13)]
    assert outcome_counts(children) == {"finished": 2, "pruned": 0, "failed": 3, "running": 1}


def test_the_gap_column_is_train_minus_val_top1_with_its_interval_and_empty_for_older_runs(store, tmp_path):
    """Runs that measured train_top1 (ablate/train.py) give a gap column: mean and 95% t interval over
    seeds; a row whose runs were recorded before it was measured shows "–" there; a report of such
    runs alone has no gap column at all (the shift-grid report)."""
    from scipy import stats

    c = store.client
    exp = c.create_experiment("gap-grid")
    parent = c.create_run(exp, tags={"ablate.role": "parent", "ablate.kind": "grid"}).info.run_id
    base = {"model.patch_size": 16, "model.width": 64, "data.name": "digits", "train.epochs": 3}
    new = {"model.token_mixing": "shift", "train.eval_train_images": 10000}  # settings the older runs lack
    for n, (shift, seed, top1, train_top1) in enumerate([("four", 0, 80.0, 90.0), ("four", 1, 82.0, 94.0),
                                                         ("four", 2, 81.0, 88.0), ("none", 0, 60.0, None),
                                                         ("up", 0, 70.0, None), ("up", 1, 72.0, 77.0)]):
        metrics = _metrics(top1, 95.0, 1.0)
        if train_top1 is not None:
            metrics.update(train_top1=train_top1, train_loss_eval=0.5, gap_top1=train_top1 - top1)
        _child(c, exp, parent, params={**base, "model.shift": shift, "train.seed": seed,
                                       **(new if train_top1 is not None else {})},
               metrics=metrics, trial=n, varied=["model.shift"], epochs=3)
    report = write_report("gap-grid", out=tmp_path, log_artifacts=False)
    assert [r.seeds for r in report.rows] == [3, 1, 2]  # an older run and a newer one of "up" are one row
    gaps = [10.0, 12.0, 7.0]
    ci = stats.t.interval(0.95, len(gaps) - 1, loc=sum(gaps) / 3, scale=stats.sem(gaps))
    four = report.rows[0].gap
    assert (four.mean, four.low, four.high) == (pytest.approx(29 / 3), pytest.approx(ci[0]), pytest.approx(ci[1]))
    md = (tmp_path / "report.md").read_text()
    assert "| top-5 (%) | gap (pp, 95% CI) | params (M) |" in md
    assert f"| +9.67 [{ci[0]:+.2f}, {ci[1]:+.2f}] | 1 |" in md
    assert "| none | 1 | 60.00 |" in md and "| 95.00 | – | 1 |" in md  # recorded before train_top1
    assert "| 95.00 ± 0.00 | +5.00 | 1 |" in md  # up: the one run that measured it, no interval
    assert "gap: train top-1 minus validation top-1" in md
    rows = {r["model.shift"]: r for r in _read_csv(tmp_path / "report.csv")}
    assert float(rows["four"]["gap_mean"]) == pytest.approx(29 / 3, abs=1e-4)
    assert float(rows["four"]["gap_low"]) == pytest.approx(ci[0], abs=1e-4)
    assert float(rows["four"]["train_top1_mean"]) == pytest.approx(272 / 3, abs=1e-4)
    assert (rows["none"]["gap_mean"], rows["none"]["gap_low"], rows["none"]["train_top1_mean"]) == ("", "", "")
    assert (float(rows["up"]["gap_mean"]), rows["up"]["gap_low"]) == (5.0, "")
    assert report.rows[0].history["train_top1"] == [{3: 90.0}, {3: 94.0}, {3: 88.0}]  # for the learning curves
    assert report.rows[1].history["train_top1"] == []

    old = write_report("shift-grid", out=tmp_path / "old", log_artifacts=False)
    assert all(r.gap is None for r in old.rows)
    old_md = (tmp_path / "old" / "report.md").read_text()  # (its paths hold the test's name, "gap" among it)
    assert "gap (pp" not in old_md and "gap: train top-1" not in old_md
    assert "gap" not in (tmp_path / "old" / "report.csv").read_text().splitlines()[0]
