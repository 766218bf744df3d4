"""What a report measured: an experiment's MLflow runs read into :class:`CellResult` s, one per
cell (the newest run of each), grouped into :class:`ConfigRow` s (the whole configuration but
the seed), with their learning curves and, for a search, its trials and their front.

A report of a grid's spec file reads the spec as it is: runs of cells whose key the spec no longer
produces (nor another spec file recorded in the same experiment, :func:`ablate.progress.other_specs_keys`)
are set apart (:class:`Apart`): never a row of the table, a point of a figure, a baseline or an
unfinished cell of the counts. A report of an experiment name has no spec to hold them against:
every run counts."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ablate import names
from ablate.config import MACHINE_LOCAL
from ablate.cost_axis import Correlation, CostAxis
from ablate.errors import AblateError
from ablate.latency import objective_metric
from ablate.pareto import pareto_front
from ablate.pricing import is_cpu
from ablate.progress import CLOSED_REASON, CellState, other_specs_keys, states_from_runs
from ablate.report.stats import Difference, mean_interval
from ablate.spec import SearchSpec, Spec, SpecArgs
from ablate.text import param
from ablate.tracking import all_runs, client, existing_experiment, run_configuration
from ablate.units import macs_in, params_in
from ablate.urls import display_url

DEFAULT_OBJECTIVES = [(names.VAL_TOP1, "maximize")]
#: a row's value of a setting its model does not have (S²-MLP's width for a timm model)
NOT_APPLICABLE = "-"
#: the per-epoch metrics of the learning curves (runs from before train_top1 have none of it)
CURVE_METRICS = (names.VAL_TOP1, names.TRAIN_LOSS, names.TRAIN_TOP1)


@dataclass
class CellResult:
    """One finished child run (a cell of a grid or a trial of a search)."""
    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_time: int

    @property
    def state(self) -> str:
        return self.tags.get(names.STATE, "")

    @property
    def trial_number(self) -> Optional[int]:
        value = self.tags.get(names.TRIAL_NUMBER)
        return int(value) if value not in (None, "") else None

    @property
    def seed(self) -> Optional[int]:
        try:
            return int(self.params[names.SEED])
        except (KeyError, ValueError):
            return None

    @property
    def cell(self) -> str:
        """The cell it ran (its key; the run itself where it has none)."""
        return self.tags.get(names.CELL_KEY) or self.run_id

    def metric(self, name: str) -> float:
        return self.metrics.get(name, math.nan)

    @property
    def device_kind(self) -> str:
        """``CPU`` or ``GPU``: what it trained on, by the device it recorded (``ablate.device_name``,
        else ``ablate.device``); ``""`` where it recorded none (its device-hours are of no known kind)."""
        return device_kind(self.tags.get(names.DEVICE_NAME) or self.tags.get(names.DEVICE) or "")


def device_kind(device: str) -> str:
    """``CPU`` for ``cpu``, ``GPU`` for any other device a run names (``cuda:0``, ``NVIDIA H100 ...``),
    ``""`` for none."""
    if not device:
        return ""
    return "CPU" if is_cpu(device) else "GPU"


@dataclass
class ConfigRow:
    """One configuration (the whole resolved configuration but the seed) and its runs, one per seed.

    ``values`` are the settings shown for it: the varied ones and those in which configurations
    differ although the spec does not vary them. ``delta`` is its difference in top-1 from
    ``baseline`` (``None`` for a baseline itself).
    """
    values: dict[str, str]
    runs: list[CellResult]
    settings: dict[str, str] = field(default_factory=dict)
    paper_top1: Optional[float] = None
    paper_top5: Optional[float] = None
    paper_macs: Optional[float] = None
    baseline: Optional["ConfigRow"] = None
    delta: Optional[Difference] = None
    history: dict[str, list[dict[int, float]]] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)  # its latency run's metrics (ablate.latency)
    machines: dict[str, str] = field(default_factory=dict)    # ... and what each target was measured on

    @property
    def seeds(self) -> int:
        return len(self.runs)

    @property
    def label(self) -> str:
        """``model.shift=four, model.patch_size=16``: the row as a note names it."""
        return ", ".join(f"{k}={param(v)}" for k, v in self.values.items()) or "the only configuration"

    def by_seed(self, metric: str) -> dict[int, float]:
        """seed -> metric (a run without a seed param counts by its position)."""
        return {(r.seed if r.seed is not None else -1 - i): r.metric(metric) for i, r in enumerate(self.runs)}

    def mean(self, metric: str, kind: Optional[str] = None) -> float:
        """The mean over its seeds' runs (with ``kind``, over those that trained on that kind of
        device, :attr:`CellResult.device_kind`)."""
        xs = [r.metric(metric) for r in self.runs
              if math.isfinite(r.metric(metric)) and (kind is None or r.device_kind == kind)]
        return statistics.fmean(xs) if xs else math.nan

    def std(self, metric: str) -> float:
        """Sample standard deviation over seeds (n - 1); NaN with fewer than two seeds."""
        xs = [r.metric(metric) for r in self.runs if math.isfinite(r.metric(metric))]
        return statistics.stdev(xs) if len(xs) > 1 else math.nan

    @property
    def gap(self) -> Optional[Difference]:
        """Train top-1 minus validation top-1 (percentage points) after the last epoch: the mean
        and its 95% interval over the seeds whose runs measured train_top1; ``None`` where none did
        (runs from before it was measured, or ``train.eval_train_images: 0``)."""
        return mean_interval({seed: self.by_seed(names.TRAIN_TOP1)[seed] - top1
                              for seed, top1 in self.by_seed(names.VAL_TOP1).items()})

    @property
    def params_m(self) -> float:
        """Parameters in millions, paper convention (classifier and norms excluded) when logged."""
        paper = self.mean("params_paper")
        return params_in(paper if math.isfinite(paper) else self.mean(names.PARAMS), "M")

    @property
    def gmacs(self) -> float:
        return macs_in(self.mean(names.MACS), "G")

    @property
    def counted(self) -> bool:
        """Whether its params and MACs were counted on a forward pass (a timm model), not analytic."""
        return any(r.tags.get(names.COST_SOURCE) == "counted" for r in self.runs)

    @property
    def is_baseline(self) -> bool:
        return self.baseline is self


@dataclass
class SearchResult:
    """The complete trials of a search, their objective values and the non-dominated ones."""
    objectives: list[tuple[str, str]]
    trials: list[CellResult]
    values: list[list[float]]
    front: list[int]
    objectives_source: str


@dataclass
class Report:
    """What :func:`ablate.report.write_report` read and wrote (the CLI prints a summary of it).

    ``varied`` are the settings the spec varies; ``differing`` those it does not vary in which
    configurations nevertheless differ (a spec edited between runs). ``store`` is the tracking
    URI as a report may show it.
    """
    experiment: str
    tracking_uri: str
    varied: list[str]
    rows: list[ConfigRow]
    counts: dict[str, int]
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    search: Optional[SearchResult] = None
    parent_run_id: Optional[str] = None
    reference_source: Optional[str] = None
    overridden: list[str] = field(default_factory=list)  # settings --set changed: the paper's rows are not for them
    differing: list[str] = field(default_factory=list)
    baseline_note: str = ""
    store: str = ""
    repeats: int = 0  # complete runs of a cell recorded again (a search's repeated proposal): counted once
    cost: CostAxis = CostAxis("macs")  # the x axis of the top-1 figure (--cost)
    correlation: Optional[Correlation] = None  # a latency axis: how far MACs predict it
    apart: Optional["Apart"] = None  # runs of cells no longer in the spec (a report of a spec file)

    @property
    def columns(self) -> list[str]:
        """The settings that tell the rows apart."""
        return list(self.varied) + list(self.differing)


# ---------------------------------------------------------------- reading MLflow


def read_spec(path: str, spec_args: Optional[SpecArgs] = None) -> Spec:
    """The spec at ``path``, loaded as ``spec_args`` say (``--set``, ``--name``), without
    checking its data: a report reads MLflow, not the data."""
    if not Path(path).is_file():
        raise AblateError(f"{path}: spec file not found (allowed: a spec YAML file or an MLflow "
                          "experiment name)")
    return (spec_args or SpecArgs()).load(path, check_paths=False)


@dataclass
class Recorded:
    """An experiment's runs by role: its newest parent run, its cell runs, its latency runs, and
    (a report of a grid's spec file) the cell runs of cells the spec no longer produces."""
    parent: Any
    cells: list[CellResult]
    latency_runs: list
    orphans: list[CellResult] = field(default_factory=list)


def spec_keys(spec: Optional[Spec], parents: list) -> Optional[set[str]]:
    """The cell keys a report of ``spec`` holds runs against: its grid's cells and those of the other
    spec files recorded in the experiment; None where there is nothing to hold them against (no
    spec, a search, or an object without cells)."""
    if spec is None or spec.search is not None or not hasattr(spec, "cells"):
        return None
    keys = {c.key for c in spec.cells()}
    return (keys | other_specs_keys(spec, parents)) if keys else None


def read_experiment(name: str, uri: str, spec: Optional[Spec] = None) -> Recorded:
    """Every run of the experiment ``name`` in the store at ``uri``; an :class:`AblateError`
    naming the experiments there when it has none of that name. With a grid's ``spec``, the runs
    of cells it no longer produces are set apart (``orphans``); an :class:`AblateError` when only
    those finished."""
    exp = existing_experiment(name)
    if exp is None:
        existing = sorted(e.name for e in client().search_experiments(max_results=50))
        raise AblateError(f"no MLflow experiment named {name!r} in {display_url(uri)} "
                          f"(experiments there: {', '.join(existing) or 'none'})")
    runs = all_runs(exp.experiment_id)
    parents = sorted((r for r in runs if r.data.tags.get(names.ROLE) == "parent"),
                     key=lambda r: r.info.start_time or 0)
    cells = [_cell(r) for r in runs if r.data.tags.get(names.ROLE) == "cell"]
    keys = spec_keys(spec, parents)
    orphans = [c for c in cells if keys is not None and names.CELL_KEY in c.tags and c.cell not in keys]
    if orphans:
        cells = [c for c in cells if c not in orphans]
        finished = sum(c.state == "COMPLETE" for c in orphans)
        if finished and not any(c.state == "COMPLETE" for c in cells):
            raise AblateError(f"experiment {name!r} in {display_url(uri)}: no finished run of a cell the spec has; "
                              f"{finished} finished run(s) of cells no longer in it (allowed: `ablate report "
                              f"{name}` reports every run of the experiment)")
    return Recorded(parents[-1] if parents else None, cells,
                    [r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_LATENCY], orphans)


def _cell(run) -> CellResult:
    return CellResult(run.info.run_id, dict(run.data.params), dict(run.data.metrics),
                      dict(run.data.tags), run.info.start_time or 0)


def outcome_counts(children: list[CellResult]) -> dict[CellState, int]:
    """Finished runs (a search's repeats of a configuration each count), and the cells that did not
    finish by their :class:`CellState` from MLflow alone: a cell that failed twice is one failed
    cell, and one that failed and then finished is not failed."""
    counts = {CellState.FINISHED: sum(c.state == "COMPLETE" for c in children), CellState.PRUNED: 0,
              CellState.FAILED: 0, CellState.RUNNING: 0}
    ordered = sorted(children, key=lambda c: c.start_time)
    for state in states_from_runs((c.cell, c.state) for c in ordered).values():
        if state != CellState.FINISHED:
            counts[state if state in counts else CellState.RUNNING] += 1
    return counts


@dataclass
class Apart:
    """Runs of cells no longer in the spec: the finished ones as configurations (``rows``, shown in
    ``columns``, never compared with a baseline), the others by how their cell ended."""
    rows: list[ConfigRow]
    columns: list[str]
    unfinished: list[tuple[str, str]]  # (the cell as its settings name it, unfinished | failed | pruned | closed)

    @property
    def cells(self) -> int:
        return sum(r.seeds for r in self.rows) + len(self.unfinished)


def apart(orphans: Sequence[CellResult], rows: Sequence[ConfigRow], varied: Sequence[str]) -> Optional[Apart]:
    """The runs of cells no longer in the spec (:attr:`Recorded.orphans`) as a report shows them apart
    from ``rows`` (the spec's): each configuration whose cells finished, in the spec's ``varied``
    settings and in those where it differs from every row of the spec (``train.epochs`` 2 where
    the spec now says 3), and the cells that did not finish (unfinished, failed, pruned, or
    closed by ``ablate run --close-orphans``), named by their settings. None where there are none."""
    if not orphans:
        return None
    found, _ = group_by_config(latest_per_cell([c for c in orphans if c.state == "COMPLETE"]), varied)
    ours: dict[str, set[str]] = {}
    for r in rows:
        for k, v in r.settings.items():
            ours.setdefault(k, set()).add(v)
    every = list(dict.fromkeys(k for r in found for k in r.settings))
    columns = list(varied) + [k for k in every if k not in varied
                              and any(r.settings.get(k) not in ours.get(k, set()) for r in found)]
    for r in found:
        r.values = {k: r.settings.get(k, NOT_APPLICABLE) for k in columns}
    ordered = sorted(orphans, key=lambda c: c.start_time)
    latest = {c.cell: c for c in ordered}
    unfinished = []
    for key, state in states_from_runs((c.cell, c.state) for c in ordered).items():
        if state == CellState.FINISHED:
            continue
        run = latest[key]
        named = ", ".join(f"{k}={param(run.params[k])}" for k in columns if k in run.params) or key
        word = ("closed" if run.tags.get(names.FAILURE, "").startswith(CLOSED_REASON) else
                str(state) if state in (CellState.FAILED, CellState.PRUNED) else "unfinished")
        unfinished.append((named, word))
    return Apart(found, columns, unfinished)


def latest_per_cell(cells: list[CellResult]) -> list[CellResult]:
    """One run per cell key (the newest): a cell recorded twice must not count as two seeds."""
    by_key: dict[str, CellResult] = {}
    for c in sorted(cells, key=lambda c: c.start_time):
        by_key[c.cell] = c
    return list(by_key.values())


def varied_from_runs(cells: Sequence[CellResult]) -> list[str]:
    """The varied settings recorded on the runs (``ablate.varied``), or else the params whose
    values differ between runs (seed and machine-local paths left out)."""
    keys: list[str] = []
    for c in cells:
        try:
            for k in json.loads(c.tags.get(names.VARIED, "[]")):
                if k not in keys:
                    keys.append(k)
        except (TypeError, ValueError):
            continue
    if not keys:
        all_params = sorted({k for c in cells for k in c.params})
        keys = [k for k in all_params if len({c.params.get(k) for c in cells}) > 1]
    return [k for k in keys if k != names.SEED and k not in MACHINE_LOCAL]


def group_by_config(cells: Sequence[CellResult], varied: Sequence[str]) -> tuple[list[ConfigRow], list[str]]:
    """Rows of runs with the same configuration but the seed, in the order the configurations
    were first run (trial number, then start time): a grid's own order.

    Returns the rows and the settings outside ``varied`` in which they differ (a setting the
    spec does not vary, changed between two runs of it): runs that differ in it are different
    configurations, never seeds of one.
    """
    def order(c: CellResult):
        n = c.trial_number
        return (n if n is not None else math.inf, c.start_time)

    rows: dict[tuple, ConfigRow] = {}
    for c in sorted(cells, key=order):
        settings = run_configuration(c.params)
        key = tuple(sorted(settings.items()))
        rows.setdefault(key, ConfigRow({}, [], settings)).runs.append(c)
    every = sorted({k for r in rows.values() for k in r.settings})
    # a setting a row's model does not have (S²-MLP's width for a timm model) tells no rows apart
    differing = [k for k in every if k not in varied
                 and len({r.settings[k] for r in rows.values() if k in r.settings}) > 1]
    for r in rows.values():
        r.values = {k: r.settings.get(k, NOT_APPLICABLE) for k in list(varied) + differing}
    return list(rows.values()), differing


def read_histories(rows: Sequence[ConfigRow]) -> None:
    """Each row's per-epoch metrics (one {epoch: value} per seed) from MLflow's metric history.
    A search trial that repeated a trained configuration has its original's history."""
    mlflow = client()
    for row in rows:
        for metric in CURVE_METRICS:
            per_seed = []
            for run in row.runs:
                source = run.tags.get(names.REUSED_FROM) or run.run_id
                steps = {m.step: m.value for m in mlflow.get_metric_history(source, metric)}
                if steps:
                    per_seed.append(steps)
            row.history[metric] = per_seed


# ---------------------------------------------------------------- search


def is_search(spec: Optional[Spec], parent) -> bool:
    """Whether the runs are a search's: its spec has one, or else its parent run says so."""
    if spec is not None:
        return spec.search is not None
    return parent is not None and parent.data.tags.get(names.KIND) == names.SEARCH


def _objective_pairs(search: Optional[SearchSpec]) -> list[tuple[str, str]]:
    return [(o.metric, o.direction) for o in search.objectives] if search is not None else []


def search_objectives(spec: Optional[Spec], parent) -> tuple[list[tuple[str, str]], str]:
    """A search's objectives and where they come from: its spec, else the spec file its parent
    run names, else top-1 alone."""
    if spec is not None and spec.search is not None:
        return _objective_pairs(spec.search), "the spec"
    spec_file = parent.data.tags.get(names.SPEC_FILE) if parent is not None else None
    if spec_file and Path(spec_file).is_file():
        try:
            found = _objective_pairs(read_spec(spec_file).search)
            if found:
                return found, f"the spec {spec_file}"
        except AblateError:
            pass
    return list(DEFAULT_OBJECTIVES), "default (spec not found)"


def summarize_search(cells: Sequence[CellResult], objectives: list[tuple[str, str]],
                     source: str) -> SearchResult:
    """Complete trials in trial order, their objective values and the Pareto front (for one
    objective, the best trial)."""
    trials = sorted((c for c in cells if c.trial_number is not None), key=lambda c: c.trial_number)
    values = [[t.metric(objective_metric(m)) for m, _ in objectives] for t in trials]
    front = pareto_front(values, [d for _, d in objectives]) if objectives else []
    return SearchResult(objectives, trials, values, front, source)
