"""Where results are looked at: MLflow experiments that open on their runs, the URLs `ablate ui`
prints, ledgers that optuna-dashboard can show, and the table `ablate run` / `ablate search` end with."""
from __future__ import annotations

import json
import os
import re
import socket
import wsgiref.util
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ablate import names, tracking
from ablate.cli import cli
from ablate.ledger import Ledger, storage_url
from ablate.progress import survey
from ablate.runner import Outcome
from ablate.summary import print_search_summary, report_command
from ablate.spec import SpecArgs, load_spec
from conftest import write_spec

GRID = "grid:\n  model.shift: [none, four]\n  model.patch_size: [2, 4]\nseeds: [0, 1]\n"
SEARCH = """\
search:
  sampler: random
  objectives: [{metric: val_top1, direction: maximize}, {metric: macs, direction: minimize}]
  trials: 4
  space:
    model.width: {int: [8, 32], step: 8}
    model.shift: {choice: [none, four]}
"""
# The fields of MLflow's saved runs view: its UI state and search facets (MLflow 3.17's bundle)
UI_STATE = {"selectedColumns", "columnOrder", "columnWidths", "runsExpanded", "runsPinned", "runsHidden",
            "runsVisibilityMap", "runsHiddenMode", "compareRunCharts", "compareRunSections", "viewMaximized",
            "runListHidden", "isAccordionReordered", "groupBy", "groupsExpanded", "autoRefreshEnabled",
            "useGroupedValuesInCharts", "hideEmptyCharts", "globalLineChartConfig", "chartsSearchFilter"}
FACETS = {"searchFilter", "orderByKey", "orderByAsc", "startTime", "lifecycleFilter", "modelVersionFilter",
          "datasetsFilter"}


def _view(experiment) -> dict:
    envelope = json.loads(experiment.tags[names.SHARED_VIEW + names.VIEW_KEY])
    assert set(envelope) == {"name", "createdAt", "updatedAt", "state"} and isinstance(envelope["createdAt"], int)
    return json.loads(envelope["state"])


# ---- MLflow ------------------------------------------------------------------------------------

def test_a_grid_experiment_opens_on_its_runs_grouped_by_configuration(workdir):
    spec = load_spec(write_spec(workdir / "g.yaml", name="views-grid", extra=GRID))
    experiment_id = tracking.ensure_experiment(spec.name, spec)
    exp = MlflowClient().get_experiment(experiment_id)
    assert exp.tags[names.EXPERIMENT_KIND] == "custom_model_development"  # MLflow's "Machine learning" kind
    state = _view(exp)
    assert set(state) <= UI_STATE | FACETS, set(state) - UI_STATE - FACETS
    assert state["searchFilter"] == "tags.`ablate.role` = 'cell'"  # the children, not the empty parents
    assert state["selectedColumns"][:3] == ["params.`model.shift`", "params.`model.patch_size`", "params.`train.seed`"]
    assert {"metrics.`val_top1`", "metrics.`macs`"} <= set(state["selectedColumns"])
    # one group per configuration (the seeds of one are averaged), one colour each in the charts
    assert state["groupBy"] == {"aggregateFunction": "average", "groupByKeys": [
        {"mode": "param", "groupByData": "model.shift"}, {"mode": "param", "groupByData": "model.patch_size"}]}
    assert state["useGroupedValuesInCharts"] and state["runsHiddenMode"] == "SHOW_ALL"
    scatter, curve = state["compareRunCharts"]
    assert scatter["type"] == "SCATTER" and scatter["xaxis"] == {"key": "macs", "type": "METRIC"}
    assert scatter["yaxis"] == {"key": "val_top1", "type": "METRIC"}
    assert curve["type"] == "LINE" and curve["metricKey"] == "val_top1"
    [section] = state["compareRunSections"]
    assert scatter["metricSectionId"] == curve["metricSectionId"] == section["uuid"]
    # the view's filter is one MLflow's search accepts
    MlflowClient().search_runs([experiment_id], filter_string=state["searchFilter"])


def test_an_experiment_made_before_gets_the_tags_and_keeps_a_kind_chosen_since(workdir):
    spec = load_spec(write_spec(workdir / "s.yaml", name="views-search", extra=SEARCH))
    c = MlflowClient()
    old = c.create_experiment("views-search")
    assert tracking.ensure_experiment(spec.name, spec) == old
    state = _view(c.get_experiment(old))
    assert state["groupBy"] is None  # a search's trials are each their own configuration
    assert state["selectedColumns"][:2] == ["params.`model.width`", "params.`model.shift`"]
    c.set_experiment_tag(old, names.EXPERIMENT_KIND, "genai_development")
    tracking.ensure_experiment(spec.name, spec)
    assert c.get_experiment(old).tags[names.EXPERIMENT_KIND] == "genai_development"


def _mlflow_ui_bundle() -> str:
    import mlflow
    root = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    if not root.is_dir():
        pytest.skip("this MLflow has no UI bundle")
    return "".join(p.read_text(errors="replace") for p in root.glob("*.js"))


def test_the_installed_mlflow_ui_reads_what_ablate_writes():
    """The view and the URLs rely on names of MLflow's UI: fail when an upgrade renames one."""
    bundle = _mlflow_ui_bundle()
    for name in ["mlflow.sharedViewState.", "viewStateShareKey", "workflowType", "machine_learning",
                 "compareRunsMode", "custom_model_development", "mlflow.experimentKind", "groupByKeys",
                 "useGroupedValuesInCharts", "runsHiddenMode", "compareRunSections", "SHOW_ALL"]:
        assert name in bundle, name
    for field in UI_STATE | FACETS:
        assert f'"{field}"' in bundle or f"{field}:" in bundle, field


# ---- ablate ui -----------------------------------------------------------------------------------

def test_experiment_urls_open_the_saved_view_as_a_table_and_as_charts():
    from ablate.ui import experiment_urls
    runs, charts = experiment_urls("http://127.0.0.1:5000/", "7")
    assert runs == ("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
                    "&viewStateShareKey=ablate")
    assert charts == runs + "&compareRunsMode=CHART"


@pytest.fixture
def mlflow_server(workdir, monkeypatch):
    """MLflow's own tracking server (its Flask app) on the test's store, served from this process."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from mlflow.server import app, handlers
    from mlflow.server.constants import BACKEND_STORE_URI_ENV_VAR

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    monkeypatch.setenv(BACKEND_STORE_URI_ENV_VAR, os.environ["MLFLOW_TRACKING_URI"])
    monkeypatch.setattr(handlers, "_tracking_store", None)  # opened again on this test's store
    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    thread.join()
    server.server_close()
    # the server's store lookup set MLflow's process-wide tracking URI; later tests in this
    # process must read theirs from the environment again
    import mlflow
    mlflow.set_tracking_uri(None)


def test_ui_prints_where_each_experiment_opens(workdir, monkeypatch, mlflow_server):
    """`ablate ui` on a server that answers at once (MLflow's own app, in this process): once it
    answers, the links of ablate's experiments, read through its REST API; then Ctrl-C."""
    import ablate.ui as ui
    spec = load_spec(write_spec(workdir / "g.yaml", name="views-ui", extra=GRID))
    experiment_id = tracking.ensure_experiment(spec.name, spec)
    MlflowClient().create_experiment("not-ablates")
    started = []

    class Clock:  # the first wait after the server answered is a Ctrl-C
        monotonic = staticmethod(lambda: 0.0)

        @staticmethod
        def sleep(seconds):
            raise KeyboardInterrupt

    monkeypatch.setattr(ui.Server, "start", lambda self: started.append(self.name))
    monkeypatch.setattr(ui, "url", lambda host, port: mlflow_server)
    monkeypatch.setattr(ui, "time", Clock)
    result = CliRunner().invoke(cli, ["ui", "--port", "5999"])
    assert result.exit_code == 0, result.output
    assert started == ["MLflow UI"]
    runs, charts = ui.experiment_urls(mlflow_server, experiment_id)
    lines = result.output.splitlines()
    at = lines.index(f"MLflow UI: {mlflow_server}")
    assert lines[at + 1:at + 3] == [f"  views-ui: runs   {runs}", f"            charts {charts}"]
    assert "not-ablates" not in result.output and "stopping" in result.output


def test_ui_lists_no_experiment_of_a_server_that_does_not_answer():
    from ablate.ui import experiment_links
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert experiment_links(f"http://127.0.0.1:{port}/") == []


# ---- optuna-dashboard --------------------------------------------------------------------------

@dataclass
class Cell:
    key: str
    values: dict


def _get(app, path: str):
    """GET ``path`` from a WSGI app in this process: (status, JSON body)."""
    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": BytesIO()}
    wsgiref.util.setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    return int(status[0].split()[0]), json.loads(body or b"{}")


# a tiny grid has one trial per value: the importance page warns that its estimate is rough
@pytest.mark.filterwarnings("ignore:Some regimes for parameter:UserWarning")
def test_optuna_dashboard_shows_a_grid_ledger_and_names_a_searchs_objectives(workdir):
    pytest.importorskip("optuna_dashboard")
    from optuna_dashboard._app import create_app
    url = storage_url()
    grid = Ledger(url, "views-grid", kind="grid", metric_names=["val_top1"])
    cells = [Cell(f"k{i}", {"model.shift": s, "model.patch_size": p, "model.shift_offsets": [[0, p]]})
             for i, (s, p) in enumerate([("none", 2), ("four", 2), ("none", 4), ("four", 4)])]
    assert grid.enqueue_cells(cells) == (4, 0)
    for value in (40.0, 60.0, 50.0):
        grid.tell(grid.claim(), TrialState.COMPLETE, [value])
    # a grid given more values later: a new number is recorded, a new choice is left out, neither refused
    assert grid.enqueue_cells(cells + [Cell("k9", {"model.shift": "eight", "model.patch_size": 8,
                                                   "model.shift_offsets": [[0, 8]]})]) == (1, 3)
    trials = {t.user_attrs[names.CELL_KEY]: t for t in grid.trials()}
    assert trials["k1"].params == {"model.shift": "four", "model.patch_size": 2.0, "model.shift_offsets": "[[0, 2]]"}
    assert trials["k9"].params == {"model.patch_size": 8.0}
    assert json.loads(trials["k9"].user_attrs[names.VALUES])["model.shift"] == "eight"

    search = Ledger(url, "views-search", ["maximize", "minimize"], kind="search", metric_names=["val_top1", "macs"])
    for width, values in ((8, [50.0, 1e4]), (16, [60.0, 3e4])):
        search.study.add_trial(optuna.create_trial(params={"model.width": width},
                                                   distributions={"model.width": optuna.distributions.IntDistribution(8, 32)},
                                                   values=values))

    app = create_app(grid.storage)
    status, listing = _get(app, "/api/studies")
    assert status == 200, listing
    ids = {s["study_name"]: s["study_id"] for s in listing["study_summaries"]}
    status, detail = _get(app, f"/api/studies/{ids['views-grid']}")
    assert status == 200, detail
    assert {p["name"] for p in detail["union_search_space"]} == {"model.shift", "model.patch_size",
                                                                 "model.shift_offsets"}
    status, importances = _get(app, f"/api/studies/{ids['views-grid']}/param_importances")
    assert status == 200, importances  # a study without parameters raised ZeroDivisionError here
    assert {i["name"] for i in importances["param_importances"][0]} <= {"model.shift", "model.patch_size",
                                                                        "model.shift_offsets"}
    status, detail = _get(app, f"/api/studies/{ids['views-search']}")
    assert status == 200 and detail["objective_names"] == ["val_top1", "macs"]


# ---- the end of ablate run / ablate search -----------------------------------------------------

def test_run_ends_with_the_table_of_what_it_trained_and_the_report_command(workdir):
    """A real `ablate run`, on cells whose training MLflow already holds (a worker that died before
    telling the ledger): it records them without training, then shows them in its table."""
    write_spec(workdir / "g.yaml", name="views-run", extra="grid:\n  model.shift: [none, four]\n  model.width: [16, 32]\n")
    args = SpecArgs(("train.epochs=1",))
    spec = args.load("g.yaml")
    experiment_id = tracking.ensure_experiment(spec.name, spec)
    parent = tracking.start_parent(experiment_id, "grid", "g.yaml")
    results = {("none", 16): (41.25, 9.0e3), ("four", 16): (63.5, 9.0e3), ("none", 32): (44.0, 2.7e4),
               ("four", 32): (70.75, 2.7e4)}
    for cell in spec.cells():
        run = tracking.CellRun.open(experiment_id, parent, cell.config, cell.key, varied=spec.varied,
                                    spec_file="g.yaml", device="cpu")
        top1, macs = results[cell.values["model.shift"], cell.values["model.width"]]
        run.log_metrics({"val_top1": top1, "macs": macs})
        run.close("COMPLETE")
    result = CliRunner().invoke(cli, ["run", "g.yaml", "--device", "cpu", "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert "training on" not in result.output and result.output.count("already finished in MLflow") == 4
    lines = result.output[result.output.rindex("views-run+"):].splitlines()
    assert lines[0].endswith("(spec views-run, --set train.epochs=1): 4 cells")
    table = [re.split(r"\s{2,}", line.strip()) for line in lines[1:6]]
    assert table == [["shift", "width", "top-1", "MACs (k)", "state"],
                     ["none", "16", "41.25", "9", "finished"], ["none", "32", "44.00", "27", "finished"],
                     ["four", "16", "63.50", "9", "finished"], ["four", "32", "70.75", "27", "finished"]]
    assert lines[6:] == ["4/4 cells finished, 0 failed", "next: ablate report g.yaml --set train.epochs=1"]


def test_report_command_repeats_the_options_quoted_for_a_shell():
    args = SpecArgs(("model.shift=[[0,1],[0,-1]]", "train.epochs=1"), "my name")
    assert report_command("experiments/x.yaml", args) == (
        "ablate report experiments/x.yaml --set 'model.shift=[[0,1],[0,-1]]' --set train.epochs=1 --name 'my name'")


def test_printed_commands_repeat_the_spec_options_and_their_own():
    args = SpecArgs(("train.epochs=1",), None, 50)
    assert args.command("cancel", "x.yaml", "--storage", "postgresql://u:***@db/ablate") == (
        "ablate cancel x.yaml --storage 'postgresql://u:***@db/ablate' --set train.epochs=1 --max-cells 50")
    assert SpecArgs().command("status", "my spec.yaml") == "ablate status 'my spec.yaml'"


def test_search_ends_with_its_pareto_set(workdir, capsys):
    path = write_spec(workdir / "s.yaml", name="views-pareto", extra=SEARCH)
    ledger = Ledger.for_spec(load_spec(path), storage_url())
    space = {"model.width": optuna.distributions.IntDistribution(8, 32, step=8),
             "model.shift": optuna.distributions.CategoricalDistribution(["none", "four"])}
    for width, shift, top1, macs in ((8, "none", 40.0, 1e4), (16, "four", 60.0, 3e4), (24, "none", 55.0, 5e4),
                                     (32, "four", 70.0, 8e4)):
        ledger.study.add_trial(optuna.create_trial(params={"model.width": width, "model.shift": shift},
                                                   distributions=space, values=[top1, macs],
                                                   user_attrs={names.CELL_KEY: f"k{width}"}))
    print_search_summary(Outcome(load_spec(path), survey(load_spec(path), ledger), ledger), str(path))
    out = capsys.readouterr().out.splitlines()
    assert out[1] == ("views-pareto: Pareto set (val_top1 maximize, macs minimize): 3 of 4 finished "
                      "configurations")
    assert re.split(r"\s{2,}", out[2].strip()) == ["trial", "width", "shift", "top-1", "MACs (k)"]
    assert [re.split(r"\s{2,}", line.strip()) for line in out[3:6]] == [
        ["3", "32", "four", "70.00", "80"], ["1", "16", "four", "60.00", "30"], ["0", "8", "none", "40.00", "10"]]
    assert out[6:] == [f"next: ablate report {path}"]


def test_a_run_that_finished_nothing_does_not_point_to_a_report(workdir, capsys):
    from ablate.progress import CellProgress, CellState, Progress
    from ablate.summary import print_summary
    spec = load_spec(write_spec(workdir / "n.yaml", name="views-nothing"))
    failed = CellProgress(key="k", state=CellState.FAILED, values={"model.shift": "four"}, reason="diverged")
    where = Progress(names.GRID, 1, [failed], {s: int(s == CellState.FAILED) for s in CellState})
    print_summary(Outcome(spec, where, Ledger.for_spec(spec, storage_url())), "n.yaml")
    out = capsys.readouterr().out
    assert "0/1 cells finished, 1 failed" in out and "FAILED model.shift=four: diverged" in out and "next:" not in out
