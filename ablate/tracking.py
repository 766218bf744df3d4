"""The MLflow mapping, in one place.

One experiment per spec ``name``; one parent run per ``ablate run`` / ``ablate search``
invocation; one child run per cell or trial, tagged with the cell key so finished work can be
found again (MLflow has no get-or-create of runs). Cost is logged as metrics (``macs``,
``flops``, ``params``) so that MLflow's own charts can plot accuracy against FLOPs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ablate import liveness, names
from ablate.config import KEYED_WHEN_SET, MACHINE_LOCAL, SECTIONS, CellConfig, applies, flat_params
from ablate.locks import StoreUnwritable, is_lost, retry_busy, sqlite_path, store_lock, unwritable
from ablate.stores import check_database, check_tracking_store
from ablate.urls import database_url

STORE = "the MLflow store"
ARTIFACTS = "MLflow's artifact folder"

#: the MLflow store refused a write in this process for good (a full disk, a read-only file): the
#: command ends on that error, and nothing more is written there, not even the parent run's end
#: (the next invocation closes a parent run left RUNNING: :func:`close_gone_parents`)
_refused: Optional[StoreUnwritable] = None


def _retry(fn, *args, writing: Optional[str] = None, **kwargs):
    """Every MLflow call: a busy store and a lost connection are retried (ablate.locks); a write
    refused for good raises :class:`StoreUnwritable` naming the store's file and ``writing``."""
    global _refused
    try:
        return retry_busy(fn, *args, what=STORE, where=tracking_uri(), writing=writing, **kwargs)
    except StoreUnwritable as e:
        _refused = _refused or e
        raise


def refuse_writes() -> None:
    """Write nothing more to the MLflow store from this process: it refused a write in a worker
    process, and the command is ending on that error."""
    global _refused
    _refused = _refused or StoreUnwritable("the MLflow store refused a write in a worker", STORE, "")


def _not_a_lost_connection(record: logging.LogRecord) -> bool:
    # MLflow's SQL store logs the traceback of every OperationalError it re-raises; a lost
    # connection is retried by the caller (and said in one line if it never comes back), a full or
    # read-only store is said in one line (ablate.locks.StoreUnwritable)
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and (is_lost(error) or unwritable(error) is not None))


def client() -> MlflowClient:
    db_log = logging.getLogger("mlflow.store.db.utils")
    if _not_a_lost_connection not in db_log.filters:
        db_log.addFilter(_not_a_lost_connection)
    return MlflowClient()


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def all_runs(experiments: str | list[str], filter_string: str = "", order_by: Optional[list[str]] = None, *,
             uri: Optional[str] = None) -> list:
    """Every run of one experiment (an id) or several (a list) that matches ``filter_string``, through
    all of MLflow's pages, in the store at ``uri`` (default: the current one)."""
    ids = [experiments] if isinstance(experiments, str) else list(experiments)
    reader = client() if uri is None else MlflowClient(uri)
    runs, token = [], None
    while ids:
        page = _retry(reader.search_runs, ids, filter_string=filter_string, order_by=order_by,
                      max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    return runs


def existing_experiment(name: str):
    """The MLflow experiment named ``name``, or None where it or the tracking store does not exist;
    nothing is created (opening a SQLite store that is not there would create it)."""
    uri = tracking_uri()
    path = sqlite_path(uri)
    if path is not None and (not os.path.exists(path) or os.path.getsize(path) == 0):
        return None
    if path is None and database_url(uri) and "experiments" not in check_database(uri, "MLflow store", create=False):
        return None  # an empty database: MLflow would create its tables in it
    if path is None and not database_url(uri):
        # a server that does not answer, a file store, a plugin's scheme: one line, not MLflow's retries for minutes
        check_tracking_store(uri, create=False)
    return _retry(client().get_experiment_by_name, name)


def cell_runs(name: str) -> list:
    """Every cell run (one per cell or trial attempt) of the experiment ``name``, oldest first;
    none, and nothing created, where there is no such experiment or no store yet."""
    experiment = existing_experiment(name)
    if experiment is None:
        return []
    runs = all_runs(experiment.experiment_id, f"tags.`{names.ROLE}` = 'cell'")
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def epochs_logged(run_id: str) -> int:
    """The last epoch a cell run logged (its ``train_loss`` steps), 0 before the first."""
    history = _retry(client().get_metric_history, run_id, names.TRAIN_LOSS)
    return max((m.step for m in history), default=0)


def git_commit() -> str:
    """The commit of the checkout the package runs from ('unknown' outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ensure_experiment(name: str, spec=None) -> str:
    """Experiment id for ``name``, creating it (and the store) once; tolerant of a racing creator.

    The experiment carries :func:`experiment_tags` (with ``spec``, its saved runs view too); an
    experiment made before gets those it lacks, and a tag a person changed since is kept.
    """
    global _refused
    _refused = None  # a new invocation (in a process that ran one before) writes again
    tags = experiment_tags(spec)
    with store_lock(tracking_uri()):  # creating the schema or the experiment twice at once fails
        c = client()
        exp = _retry(c.get_experiment_by_name, name)
        if exp is None:
            return _retry(c.create_experiment, name, tags=tags, writing=f"the experiment {name!r}")
        for key, value in tags.items():
            if key not in exp.tags:
                _retry(c.set_experiment_tag, exp.experiment_id, key, value, writing=f"a tag of experiment {name!r}")
        return exp.experiment_id


# ---- how MLflow's UI opens an experiment ------------------------------------------------------
# MLflow 3's UI opens an experiment of no kind, or of the GenAI kind, on its GenAI overview
# ("No data available" for training runs). ``mlflow.experimentKind`` is the tag its own kind
# selector writes; MLflow 3.17's UI decides the first tab by the sidebar's workflow type instead
# (GenAI unless chosen otherwise in that browser, or ``?workflowType=machine_learning`` in the
# URL), so :func:`ablate.ui.experiment_urls` says that in the URLs it prints. The saved view is
# the format of the UI's own "Save view" (a tag ``mlflow.sharedViewState.<key>`` holding
# {name, createdAt, updatedAt, state}); ``?viewStateShareKey=<key>`` opens it, and the UI lists
# it among the experiment's saved views.
VIEW_NAME = "ablate: top-1 against MACs"
SECTION_NAME = "Accuracy against cost"  # sorts before MLflow's own "Model metrics" section
CHART_RUNS = 500  # runs (or groups) a chart draws; MLflow's default of 10 would hide most of a grid


def experiment_tags(spec=None) -> dict[str, str]:
    """MLflow's experiment kind for model training; with ``spec``, its saved runs view."""
    tags = {names.EXPERIMENT_KIND: names.KIND_MACHINE_LEARNING}
    if spec is not None:
        objectives = [o.metric for o in spec.search.objectives] if spec.search is not None else []
        state = runs_view(spec.varied, objectives, group=spec.search is None)
        tags[names.SHARED_VIEW + names.VIEW_KEY] = saved_view(VIEW_NAME, state)
    return tags


def saved_view(name: str, state: dict[str, Any], now_ms: Optional[int] = None) -> str:
    """The value of a saved-view tag, as MLflow's UI writes it (the state as uncompressed JSON)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return json.dumps({"name": name, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)})


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # MLflow's column ids: params.`model.shift`, metrics.`val_top1`


def runs_view(varied: list[str], objectives: list[str] = (), *, group: bool = True) -> dict[str, Any]:
    """The runs page of an ablate experiment, in the fields of MLflow's saved view state.

    Only the cell runs (a parent run holds no metrics); the varied settings, top-1 and cost as
    columns, best top-1 first; a grid's runs grouped by every varied setting but the seed, so
    that a group is one configuration averaged over its seeds, with a colour of its own in the
    charts; a chart of the first objective (top-1) against the cost (the second objective, or
    MACs) and the per-epoch top-1, over every run rather than the first ten.
    """
    y, x = (list(objectives) + [names.VAL_TOP1, names.MACS])[:2] if len(objectives) != 1 else (objectives[0], names.MACS)
    metrics = list(dict.fromkeys([y, x, names.VAL_TOP1, names.VAL_TOP5, names.MACS, names.PARAMS]))
    section = "ablate-accuracy-vs-cost"
    base = {"runsCountToCompare": CHART_RUNS, "metricSectionId": section, "deleted": False, "isGenerated": False}
    charts = [
        {**base, "uuid": "ablate-scatter", "type": "SCATTER", "displayName": f"{y} against {x}",
         "xaxis": {"key": x, "type": "METRIC"}, "yaxis": {"key": y, "type": "METRIC"}},
        {**base, "uuid": "ablate-curve", "type": "LINE", "displayName": f"{names.VAL_TOP1} per epoch",
         "metricKey": names.VAL_TOP1, "selectedMetricKeys": [names.VAL_TOP1], "lineSmoothness": 0,
         "xAxisScaleType": "linear", "scaleType": "linear",
         "range": {}, "xAxisKey": "step", "selectedXAxisMetricKey": "", "yAxisKey": "metric", "yAxisExpressions": [],
         "ignoreOutliers": False, "useGlobalXaxisKey": False, "useGlobalLineSmoothing": True},
    ]
    keys = [k for k in varied if k != names.SEED] if group else []
    return {
        "searchFilter": f"tags.`{names.ROLE}` = 'cell'",
        "orderByKey": _column("metrics", y), "orderByAsc": False,
        "selectedColumns": [_column("params", k) for k in varied] + [_column("metrics", m) for m in metrics],
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": k} for k in keys]}
        if keys else None,
        "groupsExpanded": {}, "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts,
        "compareRunSections": [{"uuid": section, "name": SECTION_NAME, "display": True, "isReordered": False,
                                "deleted": False, "isGenerated": False}],
        "isAccordionReordered": False,
    }


def spec_tags(spec) -> dict[str, str]:
    """What a run records of how its spec was given: the ``--set`` overrides, and the spec's own
    name when the experiment carries another (overrides, ``--name``)."""
    tags = {}
    if spec.overrides:
        tags[names.OVERRIDES] = json.dumps(spec.overrides, sort_keys=True)
    if spec.name != spec.spec_name:
        tags[names.SPEC_NAME] = spec.spec_name
    return tags


def start_parent(experiment_id: str, kind: str, spec_file: str, tags: Optional[dict[str, str]] = None, *,
                 local: bool = True) -> str:
    """The invocation's parent run. ``local``: its workers run under this process, which the run's
    tags name, so that a later invocation can close it if this process dies (:func:`close_gone_parents`)."""
    tags = {names.ROLE: "parent", names.KIND: kind, names.SPEC_FILE: spec_file, names.GIT_COMMIT: git_commit(),
            names.HOST: socket.gethostname(), **(_process_tags() if local else {}), **(tags or {})}
    run = _retry(client().create_run, experiment_id, tags=tags,
                 run_name=f"{kind} {time.strftime('%Y-%m-%d %H:%M:%S')}", writing=f"this {kind}'s parent run")
    return run.info.run_id


def _process_tags() -> dict[str, str]:
    me = liveness.this_process()
    return {names.PID: me["pid"], names.PROCESS_START: me["start"], names.PROCESS_SPACE: me["space"]}


def _process_gone(tags: dict[str, str]) -> bool:
    """Whether the local process a parent run's tags name has ended (False when it cannot be told here)."""
    space = tags.get(names.PROCESS_SPACE, "")  # a run that recorded no space predates the check: left alone
    return bool(space) and liveness.gone(tags.get(names.PID, ""), space=space, host=tags.get(names.HOST, ""),
                                         start=tags.get(names.PROCESS_START, ""))


def close_gone_parents(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING parent runs of this experiment whose ``ablate`` process is gone.

    A SIGKILL, a crash of the machine or an out-of-memory kill leaves the parent run RUNNING
    with no one to close it; the next invocation on the same machine does. Slurm launches are
    left alone: their parent is closed by the last task, and their tasks run elsewhere.
    """
    runs = _retry(client().search_runs, [experiment_id],
                  filter_string=f"tags.`{names.ROLE}` = 'parent' and attributes.status = 'RUNNING'")
    closed = []
    for run in runs:
        if run.data.tags.get(names.LAUNCHER) == "slurm" or not _process_gone(run.data.tags):
            continue
        finish_run(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    """End a run with ``status``; nothing where this process found the store unwritable (the
    command is ending on that error: the next invocation closes the run, :func:`close_gone_parents`)."""
    if _refused is not None:
        return
    _retry(client().set_terminated, run_id, status, writing=f"the end ({status}) of run {run_id}")


# ---- a setting's value as an MLflow param (a string) and back ----------------------------------

_PYTHON_WORDS = {"True": True, "False": False, "None": None}


def param_text(value: Any) -> str:
    """A setting's value as its MLflow param: lists and mappings as JSON, anything else ``str(value)``."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def param_value(text: str) -> Any:
    """A setting's value from its MLflow param (:func:`param_text` read back): lists and numbers
    are JSON, booleans and None Python's words (``str(value)``), anything else the string itself."""
    if text in _PYTHON_WORDS:
        return _PYTHON_WORDS[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def run_configuration(params: dict[str, str]) -> dict[str, str]:
    """What a run trained, as ``ablate report`` groups and shows it: its params but the seed and
    the machine-local paths, a setting added after the run was recorded read at the value every
    earlier run had (``config.KEYED_WHEN_SET``, as in its cell key), and without the settings its
    model does not have (S²-MLP's width for a timm model, a shift pattern beside another mixer)."""
    settings = {k: v for k, v in params.items() if k != names.SEED and k not in MACHINE_LOCAL}
    if not settings:  # a run that recorded no params at all stays empty
        return settings
    for k, v in KEYED_WHEN_SET.items():
        settings.setdefault(k, param_text(v))
    timm, mixing = param_value(settings["model.timm"]), settings["model.token_mixing"]
    return {k: v for k, v in settings.items() if applies(k, timm, mixing)}


def configuration_key(params: dict[str, str]) -> str:
    """Stable identity of a run's configuration (:func:`run_configuration`), equal for every seed
    and for runs recorded before a later setting existed (left out at its old value)."""
    settings = {k: v for k, v in run_configuration(params).items()
                if not (k in KEYED_WHEN_SET and v == param_text(KEYED_WHEN_SET[k]))}
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_from_params(params: dict[str, str], *, without_data: bool = False) -> CellConfig:
    """The :class:`CellConfig` a cell run's params describe (:func:`param_value` of each), raising
    pydantic's ``ValidationError`` (a ``ValueError``) where they no longer validate. ``without_data``:
    the data section left at its defaults (its paths are another machine's)."""
    nested: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, text in params.items():
        section, _, name = key.partition(".")
        if section in nested and name:
            nested[section][name] = param_value(text)
    if without_data:
        nested["data"] = {}
    return CellConfig.model_validate(nested)


def find_cell_runs(experiment_id: str, key: str) -> list:
    """All child runs recorded for a cell key, newest first."""
    return _retry(client().search_runs, [experiment_id],
                  filter_string=f"tags.`{names.CELL_KEY}` = '{key}' and tags.`{names.ROLE}` = 'cell'",
                  order_by=["attributes.start_time DESC"])


class CellRun:
    """The MLflow child run of one cell: opened (or continued after a crash), logged, closed."""

    def __init__(self, run_id: str, resumed: bool, key: str = "", artifact_uri: str = ""):
        self.run_id, self.resumed, self.key, self.artifact_uri = run_id, resumed, key, artifact_uri
        #: the steps each metric already has in MLflow (a resumed run's earlier attempts logged
        #: some): each (metric, step) is logged once, however often its epoch is trained again
        self.logged: dict[str, set[int]] = {}

    @property
    def label(self) -> str:
        return f"cell {self.key}, run {self.run_id}" if self.key else f"run {self.run_id}"

    def _read_logged(self, metrics: Iterable[str]) -> None:
        c = client()
        for name in metrics:
            self.logged[name] = {m.step for m in _retry(c.get_metric_history, self.run_id, name)}

    @classmethod
    def open(cls, experiment_id: str, parent_id: str, cfg: CellConfig, key: str, *,
             varied: Iterable[str], spec_file: str, device: str, trial_number: Optional[int] = None,
             run_name: Optional[str] = None, tags: Optional[dict[str, str]] = None) -> "CellRun":
        """Continue this cell's interrupted (RUNNING) run if there is one, else start a new one.

        The ledger hands a cell to one worker at a time, so a RUNNING run found here belongs to
        a worker that died: continuing it keeps exactly one run per cell.
        """
        c = client()
        for run in find_cell_runs(experiment_id, key):
            if run.info.status == "RUNNING":
                cr = cls(run.info.run_id, resumed=True, key=key, artifact_uri=run.info.artifact_uri)
                _retry(c.update_run, run.info.run_id, status="RUNNING", writing=f"the status of {cr.label}")
                cr._read_logged(run.data.metrics)
                cr.set_tags({names.DEVICE: device, names.STATE: "RUNNING"})
                if names.INCOMPLETE in run.data.tags:  # its creator died before it logged what the cell is
                    cr._describe(cfg)
                return cr
        # created marked incomplete, the mark removed once the run says what it trained: a kill in
        # between leaves a run that the next worker completes, never one without params or config
        tags = {names.ROLE: "cell", names.CELL_KEY: key, names.STATE: "RUNNING", names.PARENT_ID: parent_id,
                names.VARIED: json.dumps(sorted(varied)), names.SPEC_FILE: spec_file,
                names.GIT_COMMIT: git_commit(), names.DEVICE: device,
                names.HOST: socket.gethostname(), names.INCOMPLETE: "params and config.yaml not logged yet",
                **(tags or {})}
        if trial_number is not None:
            tags[names.TRIAL_NUMBER] = str(trial_number)
        run = _retry(c.create_run, experiment_id, tags=tags, run_name=run_name or key,
                     writing=f"a new run of cell {key}")
        cr = cls(run.info.run_id, resumed=False, key=key, artifact_uri=run.info.artifact_uri)
        cr._describe(cfg)
        return cr

    def _describe(self, cfg: CellConfig) -> None:
        """Log the cell's params and config.yaml, then drop the incomplete mark. Logging the same
        values again (a resumed run whose creator died midway) is harmless."""
        c = client()
        params = [Param(k, param_text(v)) for k, v in flat_params(cfg).items()]
        for i in range(0, len(params), 100):
            _retry(c.log_batch, self.run_id, params=params[i:i + 100], writing=f"the params of {self.label}")
        config = f"{self.artifact_uri}/config.yaml" if self.artifact_uri else None
        retry_busy(c.log_text, self.run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
                   "config.yaml", what=ARTIFACTS, where=config, writing=f"config.yaml of {self.label}")
        _retry(c.delete_tag, self.run_id, names.INCOMPLETE, writing=f"the tags of {self.label}")

    @classmethod
    def copy_of(cls, run, parent_id: str, trial_number: int) -> "CellRun":
        """A finished run for a search trial that repeated an earlier trial's configuration."""
        tags = {k: v for k, v in run.data.tags.items() if k.startswith("ablate.")}
        tags.update({names.PARENT_ID: parent_id, names.TRIAL_NUMBER: str(trial_number),
                     names.REUSED_FROM: run.info.run_id})
        key = run.data.tags.get(names.CELL_KEY, "")
        new = _retry(client().create_run, run.info.experiment_id, tags=tags,
                     run_name=f"{run.info.run_name} (repeat)", writing=f"a run for trial {trial_number}")
        cr = cls(new.info.run_id, resumed=False, key=key, artifact_uri=new.info.artifact_uri)
        _retry(client().log_batch, cr.run_id, params=[Param(k, v) for k, v in run.data.params.items()],
               writing=f"the params of {cr.label}")
        cr.log_metrics(run.data.metrics)
        cr.close("COMPLETE")
        return cr

    @classmethod
    def reused(cls, source, experiment_id: str, parent_id: str, cfg: CellConfig, key: str, *, varied: Iterable[str],
               spec_file: str, trial_number: int, run_name: str, tags: dict[str, str]) -> "CellRun":
        """This spec's run of a cell another spec finished in the same stores (``source``): its
        configuration as this spec describes it, the source's results at its last step, where it
        trained, and tags naming the source run and experiment (its learning curves are read there)."""
        # what its training recorded (device, data path, split sizes, threads, ...), not what names
        # the run's place in its own spec (role, key, state, spec file, trial, varied settings)
        trained = {k: v for k, v in source.data.tags.items()
                   if k.startswith("ablate.") and k not in _OWN_TAGS and k not in tags}
        reused = {**trained, names.REUSED_FROM: source.info.run_id, names.REUSED_EXPERIMENT: source.info.experiment_id}
        cr = cls.open(experiment_id, parent_id, cfg, key, varied=varied, spec_file=spec_file,
                      device=trained.get(names.DEVICE, ""), trial_number=trial_number, run_name=run_name,
                      tags={**tags, **reused})
        cr.set_tags(reused)
        epochs = source.data.params.get(names.EPOCHS, "")
        cr.log_metrics(source.data.metrics, step=int(epochs) if epochs.isdigit() else None)
        cr.close("COMPLETE")
        return cr

    def set_tags(self, tags: dict[str, Any]) -> None:
        _retry(client().log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()],
               writing=f"the tags of {self.label}")

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        """Log ``metrics`` at ``step``, leaving out those this run has at that step already (an
        epoch trained again after a stop: its checkpoint was not written, or the run not closed)."""
        now, step = int(time.time() * 1000), step or 0
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and step not in self.logged.get(k, ())]
        if not batch:
            return
        _retry(client().log_batch, self.run_id, metrics=batch, writing=f"the metrics at step {step} of {self.label}")
        for m in batch:
            self.logged.setdefault(m.key, set()).add(step)

    def close(self, state: str, reason: Optional[str] = None) -> None:
        """state: COMPLETE | PRUNED | FAIL (the ledger's words) -> FINISHED | KILLED | FAILED."""
        tags = {names.STATE: state}
        if reason:
            tags[names.FAILURE] = reason[:5000]
        self.set_tags(tags)
        finish_run(self.run_id, {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED"))


def _other_experiments(experiment_id: str) -> list[str]:
    """The ids of every active experiment of the store but ``experiment_id``, through MLflow's pages."""
    ids, token = [], None
    while True:
        page = _retry(client().search_experiments, max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page if e.experiment_id != experiment_id]
        token = page.token
        if not token:
            return ids


#: the tags that place a cell run in its own spec and invocation: a reused run sets its own
_OWN_TAGS = {names.ROLE, names.CELL_KEY, names.STATE, names.VARIED, names.SPEC_FILE, names.TRIAL_NUMBER,
             names.INCOMPLETE, names.FAILURE, names.REUSED_FROM, names.REUSED_EXPERIMENT}

#: a finished cell run: its MLflow status and the ledger's word, which only a whole training writes
_FINISHED_CELL = f"tags.`{names.ROLE}` = 'cell' and tags.`{names.STATE}` = 'COMPLETE' and attributes.status = 'FINISHED'"


def finished_elsewhere(experiment_id: str, key: str):
    """The cell ``key``'s finished run under another spec (another experiment of this store), the
    original where it is itself a copy; None where no other spec finished it."""
    others = _other_experiments(experiment_id)
    if not others:
        return None
    runs = _retry(client().search_runs, others, filter_string=f"tags.`{names.CELL_KEY}` = '{key}' and {_FINISHED_CELL}",
                  order_by=["attributes.start_time ASC"], max_results=1)
    if not runs:
        return None
    source = runs[0].data.tags.get(names.REUSED_FROM)
    return _retry(client().get_run, source) if source else runs[0]


def keys_finished_elsewhere(experiment_id: str) -> set[str]:
    """Every cell key with a finished run under another spec of this store (one paged read)."""
    others = _other_experiments(experiment_id)
    return {r.data.tags.get(names.CELL_KEY) for r in all_runs(others, _FINISHED_CELL)} - {None} if others else set()


def finished_run(experiment_id: str, key: str):
    """This cell's FINISHED run, if one exists (work already done)."""
    for run in find_cell_runs(experiment_id, key):
        if run.info.status == "FINISHED" and run.data.tags.get(names.STATE) == "COMPLETE":
            return run
    return None
