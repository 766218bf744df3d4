"""Reports of an experiment, derived from its MLflow runs (never from a side file).

``write_report(target)`` reads the finished child runs of one experiment (a spec's ``name``
or an MLflow experiment name), groups them by configuration (the whole resolved
configuration but the seed: runs that differ in any other setting are different rows) and
writes ``reports/<name>/`` under the working directory (or ``out``):

- ``report.md`` and ``report.csv``: one row per configuration with top-1 and top-5 as
  mean ± std over seeds, the difference in top-1 from the baseline with a 95% confidence
  interval over seeds (:mod:`ablate.report_stats`), params, MACs (the paper's "FLOPs", §3.4:
  one multiply-add = 1) and training time; the paper's numbers beside ours where the spec
  has a ``reference`` table;
- ``top1_vs_macs.png``/``.svg``: top-1 against MACs, colour and marker for the varied
  settings, the paper's rows hollow, our Pareto front dashed; with ``cost`` another axis
  (:mod:`ablate.cost_axis`: params, a latency measured by ``ablate latency``, GPU-hours), in
  ``top1_vs_<cost>``, and for a latency also ``macs_vs_latency_<target>`` with the rank
  correlation of the two;
- ``learning_curves.png``/``.svg``: validation top-1 and training loss against epoch per
  configuration, from MLflow's per-epoch metrics;
- for a search, also the Pareto front of the trials under the spec's objectives
  (``pareto.png``/``.svg`` for two objectives) and the optimization history (``history``).

All files are rendered into a temporary folder first and then moved into place, so a failure
leaves the previous report (or nothing) rather than a mix. The files are also logged as
artifacts (under ``report/``) of the experiment's most recent parent run. A report names its
MLflow store relative to the working directory, with any password masked, never by an
absolute path of the machine that made it.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from ablate import names
from ablate.config import MACHINE_LOCAL
from ablate.cost_axis import Correlation, CostAxis, parse_cost
from ablate.errors import AblateError
from ablate.pareto import pareto_front
from ablate.report_stats import LEGEND, NO_INTERVAL, Difference, difference, format_difference
from ablate.spec.types import path_slug
from ablate.units import MACS_UNITS, macs_in, params_in
from ablate.urls import display_url, is_sqlite

SEED = "train.seed"
ARTIFACT_DIR = "report"
DEFAULT_OBJECTIVES = [("val_top1", "maximize")]
#: where reports go, under the working directory, unless --out says otherwise (git-ignored)
REPORTS_DIR = "reports"
#: the per-epoch metrics of the learning curves
CURVE_METRICS = ("val_top1", "train_loss")
#: the most configurations whose learning curves share one figure
MAX_CURVES = 12
COST_PLOT = "top1_vs_macs"
CURVES_PLOT = "learning_curves"


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
            return int(self.params[SEED])
        except (KeyError, ValueError):
            return None

    def metric(self, name: str) -> float:
        return self.metrics.get(name, math.nan)


def configuration(c: CellResult) -> dict[str, str]:
    """What a run trained: its flat params but the seed and the machine-local paths."""
    return {k: v for k, v in c.params.items() if k != SEED and k not in MACHINE_LOCAL}


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

    def by_seed(self, metric: str) -> dict[int, float]:
        """seed -> metric (a run without a seed param counts by its position)."""
        return {(r.seed if r.seed is not None else -1 - i): r.metric(metric) for i, r in enumerate(self.runs)}

    def mean(self, metric: str) -> float:
        xs = [r.metric(metric) for r in self.runs if math.isfinite(r.metric(metric))]
        return statistics.fmean(xs) if xs else math.nan

    def std(self, metric: str) -> float:
        """Sample standard deviation over seeds (n - 1); NaN with fewer than two seeds."""
        xs = [r.metric(metric) for r in self.runs if math.isfinite(r.metric(metric))]
        return statistics.stdev(xs) if len(xs) > 1 else math.nan

    @property
    def params_m(self) -> float:
        """Parameters in millions, paper convention (classifier and norms excluded) when logged."""
        paper = self.mean("params_paper")
        return params_in(paper if math.isfinite(paper) else self.mean("params"), "M")

    @property
    def gmacs(self) -> float:
        return macs_in(self.mean("macs"), "G")

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
    """What :func:`write_report` read and wrote (the CLI prints a summary of it).

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

    @property
    def columns(self) -> list[str]:
        """The settings that tell the rows apart."""
        return list(self.varied) + list(self.differing)


# ---------------------------------------------------------------- reading MLflow


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """Field of a spec part whether the loader gives models or plain mappings."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _objective_pairs(objectives: Any) -> list[tuple[str, str]]:
    out = []
    for o in objectives or []:
        if isinstance(o, (list, tuple)):
            metric, direction = o
        else:
            metric, direction = _get(o, "metric"), _get(o, "direction")
        out.append((str(metric), str(getattr(direction, "value", direction))))
    return out


def _looks_like_spec(target: str) -> bool:
    return Path(target).suffix.lower() in (".yaml", ".yml") or Path(target).is_file()


def _load_spec(path: str, spec_args: Any = None):
    if not Path(path).is_file():
        raise AblateError(f"{path}: spec file not found (allowed: a spec YAML file or an MLflow "
                          "experiment name)")
    from ablate.spec import SpecArgs
    return (spec_args or SpecArgs()).load(path, check_paths=False)  # a report reads MLflow, not the data


def _all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment(client, name: str, uri: str):
    exp = client.get_experiment_by_name(name)
    if exp is None:
        existing = sorted(e.name for e in client.search_experiments(max_results=50))
        raise AblateError(f"no MLflow experiment named {name!r} in {uri} "
                          f"(experiments there: {', '.join(existing) or 'none'})")
    return exp


def _cell(run) -> CellResult:
    return CellResult(run.info.run_id, dict(run.data.params), dict(run.data.metrics),
                      dict(run.data.tags), run.info.start_time or 0)


def outcome_counts(children: list[CellResult]) -> dict[str, int]:
    """Complete runs, and the cells that did not finish by how their last run ended: a cell that
    failed twice is one failed cell, and one that failed and then finished is not failed."""
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0}
    last: dict[str, CellResult] = {}
    for c in sorted(children, key=lambda c: c.start_time):
        if c.state == "COMPLETE":
            counts["COMPLETE"] += 1
        last[c.tags.get(names.CELL_KEY) or c.run_id] = c
    done = {c.tags.get(names.CELL_KEY) or c.run_id for c in children if c.state == "COMPLETE"}
    for key, c in last.items():
        if key not in done:
            counts[c.state if c.state in counts else "RUNNING"] += 1
    return counts


def _latest_per_cell(cells: list[CellResult]) -> list[CellResult]:
    """One run per cell key (the newest): a cell recorded twice must not count as two seeds."""
    by_key: dict[str, CellResult] = {}
    for c in sorted(cells, key=lambda c: c.start_time):
        by_key[c.tags.get(names.CELL_KEY) or c.run_id] = c
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
    return [k for k in keys if k != SEED and k not in MACHINE_LOCAL]


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
        settings = configuration(c)
        key = tuple(sorted(settings.items()))
        rows.setdefault(key, ConfigRow({}, [], settings)).runs.append(c)
    every = sorted({k for r in rows.values() for k in r.settings})
    differing = [k for k in every if k not in varied
                 and len({r.settings.get(k, "") for r in rows.values()}) > 1]
    for r in rows.values():
        r.values = {k: r.settings.get(k, "") for k in list(varied) + differing}
    return list(rows.values()), differing


# ---------------------------------------------------------------- baseline and differences


def _matches(row: ConfigRow, wanted: dict[str, Any]) -> bool:
    from ablate.spec import same_value
    return all(k in row.settings and same_value(param_value(row.settings[k]), v) for k, v in wanted.items())


def compare_with_baseline(rows: Sequence[ConfigRow], baseline: Optional[dict[str, Any]]) -> str:
    """Set every row's baseline and its difference in top-1 from it; returns how the baseline
    was chosen, for the report.

    With ``baseline`` (a spec's ``report.baseline``: varied setting -> value), each row is
    compared with the configuration that has the baseline's values and the row's other
    settings (shift none at patch size 2 with shift four at patch size 2), or, where none has
    them, with the first configuration that has the baseline's values. Without it, or where no
    finished configuration has its values, with the first configuration.
    """
    if not rows:
        return ""
    described = ", ".join(f"{k}={_value_text(v)}" for k, v in (baseline or {}).items())
    matching = [r for r in rows if _matches(r, baseline)] if baseline else []
    if baseline and not matching:
        note = (f"baseline: no finished configuration has {described} (the spec's report.baseline); "
                f"compared with the first configuration, {_row_label(rows[0])}")
    elif baseline:
        note = (f"baseline: {described} (the spec's report.baseline)"
                + (", with each row's other settings" if len({id(b) for b in _pick(rows, matching, baseline)}) > 1
                   else ""))
    else:
        note = f"baseline: the first configuration, {_row_label(rows[0])}"
    chosen = _pick(rows, matching, baseline) if matching else [rows[0]] * len(rows)
    for row, base in zip(rows, chosen):
        row.baseline = base
        if row is not base:
            try:
                row.delta = difference(row.by_seed("val_top1"), base.by_seed("val_top1"))
            except ValueError:  # no finite top-1 on one side
                row.delta = None
    return note


def _pick(rows: Sequence[ConfigRow], matching: list[ConfigRow], baseline: dict[str, Any]) -> list[ConfigRow]:
    """For each row, the matching configuration that shares its other settings, else the first."""
    def others(r: ConfigRow) -> dict[str, str]:
        return {k: v for k, v in r.settings.items() if k not in baseline}
    return [next((m for m in matching if others(m) == others(r)), matching[0]) for r in rows]


def _value_text(v: Any) -> str:
    from ablate.spec.problems import format_value
    return format_value(v)


def _row_label(row: ConfigRow) -> str:
    return ", ".join(f"{k}={display_value(v)}" for k, v in row.values.items()) or "the only configuration"


# ---------------------------------------------------------------- the paper's numbers


_PYTHON_WORDS = {"True": True, "False": False, "None": None}


def param_value(text: str) -> Any:
    """A setting's value from its MLflow param: lists and numbers are JSON, booleans and None
    Python's words (``str(value)``), anything else the string itself."""
    if text in _PYTHON_WORDS:
        return _PYTHON_WORDS[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def attach_reference(rows: Sequence[ConfigRow], reference: Any) -> None:
    """Set each row's paper top-1/top-5 from the first reference row that describes the row's
    configuration (:func:`ablate.spec.matching_row`, on the params read back as values)."""
    from ablate.spec import matching_row
    for row in rows:
        ref = matching_row(reference, {k: param_value(v) for k, v in row.runs[0].params.items()})
        if ref is not None:
            row.paper_top1, row.paper_top5 = _get(ref, "top1"), _get(ref, "top5")
            if isinstance(_get(ref, "gmacs"), (int, float)):
                row.paper_macs = _get(ref, "gmacs") * MACS_UNITS[_get(ref, "macs_unit") or "G"]


# ---------------------------------------------------------------- search


def _search_objectives(spec: Any, parent) -> tuple[list[tuple[str, str]], str]:
    if spec is not None and _get(spec, "search") is not None:
        return _objective_pairs(_get(_get(spec, "search"), "objectives")), "the spec"
    spec_file = parent.data.tags.get(names.SPEC_FILE) if parent is not None else None
    if spec_file and Path(spec_file).is_file():
        try:
            found = _objective_pairs(_get(_get(_load_spec(spec_file), "search"), "objectives"))
            if found:
                return found, f"the spec {spec_file}"
        except AblateError:
            pass
    return list(DEFAULT_OBJECTIVES), "default (spec not found)"


def summarize_search(cells: Sequence[CellResult], objectives: list[tuple[str, str]],
                     source: str) -> SearchResult:
    """Complete trials in trial order, their objective values and the Pareto front (for one
    objective, the best trial)."""
    from ablate.latency import objective_metric
    trials = sorted((c for c in cells if c.trial_number is not None), key=lambda c: c.trial_number)
    values = [[t.metric(objective_metric(m)) for m, _ in objectives] for t in trials]
    front = pareto_front(values, [d for _, d in objectives]) if objectives else []
    return SearchResult(objectives, trials, values, front, source)


# ---------------------------------------------------------------- rendering


def _num(x: Optional[float], fmt: str) -> str:
    return "" if x is None or not math.isfinite(x) else format(x, fmt)


def _pm(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return ""
    return f"{mean:.2f} ± {std:.2f}" if math.isfinite(std) else f"{mean:.2f}"


def display_value(value: str) -> str:
    """A param as MLflow stored it, shortened for tables: floats to 4 significant digits."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return value if number.is_integer() or len(value) <= 7 else f"{number:.4g}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(map(cell, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _has_reference(report: Report) -> bool:
    return report.reference_source is not None


def _delta_cell(row: ConfigRow) -> str:
    if row.is_baseline:
        return "baseline"
    return format_difference(row.delta) if row.delta is not None else ""


def _method_cell(row: ConfigRow) -> str:
    d = row.delta
    if row.is_baseline or d is None:
        return ""
    if not d.has_interval:
        return "one seed: no interval can be given"
    return f"{d.method}, {d.seeds} seeds"


def _any_interval(report: Report) -> bool:
    return any(r.delta is not None and r.delta.has_interval for r in report.rows)


def _several_baselines(report: Report) -> bool:
    return len({id(r.baseline) for r in report.rows}) > 1


#: what training cost, as runs record it (ablate/train.py): (metric, Markdown header, format), shown
#: where any row has it (runs from before these metrics have none)
TRAINING_COST = (("images_per_second", "img/s", ".0f"), ("mfu", "MFU (%)", ".1f"), ("gpu_hours", "GPU-h", ".3g"),
                 ("peak_memory_gb", "peak mem (GB)", ".3g"))


def _training_cost(report: Report) -> list[tuple[str, str, str]]:
    return [c for c in TRAINING_COST if any(math.isfinite(r.mean(c[0])) for r in report.rows)]


def _cost_value(r: ConfigRow, metric: str, fmt: str) -> str:
    value = r.mean(metric)
    return _num(100 * value if metric == "mfu" else value, fmt)


def config_table(report: Report) -> tuple[list[str], list[list[str]]]:
    header = report.columns + ["seeds", "top-1 (%)"]
    if _has_reference(report):
        header += ["paper top-1"]
    header += ["Δ top-1 (95% CI)"]
    if _any_interval(report):
        header += ["CI method"]
    if _several_baselines(report):
        header += ["vs baseline"]
    header += ["top-5 (%)"]
    if _has_reference(report):
        header += ["paper top-5"]
    from ablate.units import count_unit
    p_prefix, p_div = count_unit([r.params_m * 1e6 for r in report.rows])
    m_prefix, m_div = count_unit([r.gmacs * 1e9 for r in report.rows])
    header += [f"params ({p_prefix})" if p_prefix else "params", f"{m_prefix}MACs", "train (s)"]
    from ablate.cost_axis import table_columns
    measured_header, measured_cells = table_columns(report.rows, report.cost)
    cost = _training_cost(report)
    header += [label for _, label, _ in cost]
    header += measured_header
    body = []
    for r in report.rows:
        line = [display_value(r.values[k]) for k in report.columns] + [
            str(r.seeds), _pm(r.mean("val_top1"), r.std("val_top1"))]
        if _has_reference(report):
            line += [_num(r.paper_top1, ".1f")]
        line += [_delta_cell(r)]
        if _any_interval(report):
            line += [_method_cell(r)]
        if _several_baselines(report):
            line += ["" if r.is_baseline or r.baseline is None else _baseline_cell(report, r.baseline)]
        line += [_pm(r.mean("val_top5"), r.std("val_top5"))]
        if _has_reference(report):
            line += [_num(r.paper_top5, ".1f")]
        line += [_num(r.params_m * 1e6 / p_div, ".4g"), _num(r.gmacs * 1e9 / m_div, ".4g"),
                 _num(r.mean("train_seconds"), ".1f"), *[_cost_value(r, m, f) for m, _, f in cost]]
        body.append(line + measured_cells[len(body)])
    return header, body


def _baseline_cell(report: Report, base: ConfigRow) -> str:
    """The baseline's values in the settings that differ between the baselines."""
    bases = {id(r.baseline): r.baseline for r in report.rows if r.baseline is not None}.values()
    keys = [k for k in report.columns if len({b.values.get(k) for b in bases}) > 1]
    return ", ".join(f"{short_key(k)}={display_value(base.values[k])}" for k in keys)


def short_key(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _objective_text(value: float, scale: float) -> str:
    return _num(value / scale, ".2f" if scale == 1.0 else ".4g")


def pareto_table(report: Report) -> tuple[list[str], list[list[str]]]:
    from ablate.plots import metric_axis
    s = report.search
    arrows = {"maximize": "↑", "minimize": "↓"}
    axes = [metric_axis(m, [v[k] for v in s.values]) for k, (m, _) in enumerate(s.objectives)]
    header = ["trial"] + list(report.varied) + [
        f"{label} {arrows.get(d, d)}" for (label, _), (_, d) in zip(axes, s.objectives)]
    body = []
    for i in sorted(s.front, key=lambda i: [(-v if d == "maximize" else v) for v, (_, d)
                                            in zip(s.values[i], s.objectives)]):
        t = s.trials[i]
        body.append([str(t.trial_number)] + [display_value(t.params.get(k, "")) for k in report.varied] +
                    [_objective_text(v, scale) for v, (_, scale) in zip(s.values[i], axes)])
    return header, body


def context(report: Report) -> str:
    """What a figure's title must say besides the experiment: the dataset, the training budget,
    the split the accuracy is measured on, and the seeds behind each point."""
    settings = [r.settings for r in report.rows]
    datasets = sorted({s.get("data.name", "") for s in settings} - {""})
    epochs = sorted({int(float(s["train.epochs"])) for s in settings if _number(s.get("train.epochs"))})
    seeds = sorted({r.seeds for r in report.rows})
    parts = [", ".join(datasets) or "dataset not recorded"]
    if epochs:
        parts.append(f"{epochs[0]} epoch{'s' if epochs[0] != 1 else ''}" if len(epochs) == 1 else f"{epochs[0]}–{epochs[-1]} epochs")
    parts.append("top-1 on the validation split")
    if seeds and seeds[-1] > 1:
        parts.append(f"± std over {seeds[0] if len(seeds) == 1 else f'{seeds[0]}–{seeds[-1]}'} seeds")
    return ", ".join(parts)


def _number(text: Optional[str]) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def figure_files(report: Report) -> list[tuple[str, str]]:
    """(stem, caption) of the figures the report shows, in order."""
    out = [(report.cost.stem, f"top-1 against {report.cost.words}")]
    if report.correlation is not None:
        out.append((report.cost.correlation_stem, f"MACs against {report.cost.words}"))
    out.append((CURVES_PLOT, "learning curves"))
    s = report.search
    if s is not None and s.trials:
        if len(s.objectives) == 2:
            out.append(("pareto", "Pareto front"))
        out.append(("history", "optimization history"))
    return out


def render_markdown(report: Report, command: str, spec_path: Optional[str], when: datetime) -> str:
    c = report.counts
    kind = "search" if report.search is not None else "grid"
    not_shown = ", ".join(f"{c[s]} {w}" for s, w in (("PRUNED", "pruned"), ("FAIL", "failed"),
                                                       ("RUNNING", "unfinished")) if c.get(s))
    lines = [
        f"# {report.experiment}",
        "",
        f"- experiment: `{report.experiment}` ({kind}" + (f", spec `{spec_path}`" if spec_path else "") + ")",
        f"- runs: {c['COMPLETE']} complete in {len(report.rows)} configuration{'s' * (len(report.rows) != 1)}"
        + (f" ({report.repeats} of them {'a repeat' if report.repeats == 1 else 'repeats'} of a configuration "
           "already trained, counted once)" if report.repeats else "")
        + (f"; {not_shown} (not in the tables)" if not_shown else ""),
        f"- MLflow tracking URI: `{report.store}`"
        + (f" (parent run `{report.parent_run_id}`)" if report.parent_run_id else ""),
        f"- {context(report)}",
        f"- {report.baseline_note}",
        f"- date: {when.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- generated by `{command}`",
        "",
    ]
    if report.differing:
        lines += [f"Configurations also differ in settings the spec does not vary: "
                  f"{', '.join(report.differing)}. Runs that differ in them are separate rows, not seeds.", ""]
    no_interval = "" if _any_interval(report) or all(r.delta is None for r in report.rows) else (
        " Here no row and its baseline both have two seeds or more, so no interval can be given: Δ is the "
        "plain difference.")
    lines += [
        "top-1 / top-5: validation accuracy (%) after the last epoch, mean ± sample std over "
        "seeds. params: paper convention (classifier and norm parameters excluded) when "
        "logged. MACs: multiply-accumulates per image, the paper's \"FLOPs\" (G = 1e9, "
        "M = 1e6, k = 1e3). train: mean training seconds. " + LEGEND + no_interval,
        "",
        _md_table(*config_table(report)),
        "",
    ]
    if _has_reference(report):
        caveat = (f" They are for the spec as written: these runs changed {', '.join(report.overridden)} with --set, "
                  "so they compare with the paper only where those settings do not matter."
                  if report.overridden else "")
        lines += [f"Paper numbers: {report.reference_source}.{caveat}", ""]
    s = report.search
    figures = dict(figure_files(report))
    lines += [f"![{figures[report.cost.stem]}]({report.cost.stem}.png)", ""]
    if report.correlation is not None:
        stem = report.cost.correlation_stem
        lines += [f"{report.correlation.text()}: how far the FLOP count predicts the measured latency "
                  "(1: the same order).", "", f"![{figures[stem]}]({stem}.png)", ""]
    lines += [f"![{figures[CURVES_PLOT]}]({CURVES_PLOT}.png)", ""]
    if s is not None:
        objective_list = ", ".join(f"{m} ({d})" for m, d in s.objectives)
        what = "best trial" if len(s.objectives) == 1 else "non-dominated trials"
        lines += [
            "## Pareto front" if len(s.objectives) > 1 else "## Best trial",
            "",
            f"Objectives: {objective_list} (from {s.objectives_source}). {len(s.front)} {what} of "
            f"{len(s.trials)} complete trials; the learning curves above are theirs.",
            "",
            _md_table(*pareto_table(report)),
            "",
        ]
        for stem in ("pareto", "history"):
            if stem in figures:
                lines += [f"![{figures[stem]}]({stem}.png)", ""]
    lines += ["Every figure is also written as SVG beside its PNG.", ""]
    return "\n".join(lines)


def render_csv(report: Report) -> str:
    header = report.columns + ["seeds", "top1_mean", "top1_std", "top5_mean", "top5_std"]
    if _has_reference(report):
        header += ["paper_top1", "paper_top5"]
    header += ["delta_top1", "delta_low", "delta_high", "delta_method", "delta_excludes_zero", "baseline"]
    from ablate.cost_axis import csv_columns
    measured_header, measured_cells = csv_columns(report.rows, report.cost)
    cost = _training_cost(report)
    header += ["params_m", "params_all_m", "gmacs", "train_seconds", *[m for m, _, _ in cost], *measured_header,
               "run_ids"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r, measured in zip(report.rows, measured_cells):
        line = [display_value(r.values[k]) for k in report.columns] + [
            r.seeds, _num(r.mean("val_top1"), ".4f"), _num(r.std("val_top1"), ".4f"),
            _num(r.mean("val_top5"), ".4f"), _num(r.std("val_top5"), ".4f")]
        if _has_reference(report):
            line += [_num(r.paper_top1, "g"), _num(r.paper_top5, "g")]
        d = r.delta
        if d is not None:
            line += [_num(d.mean, ".4f"), _num(d.low, ".4f"), _num(d.high, ".4f"),
                     d.method if d.has_interval else NO_INTERVAL, str(d.excludes_zero).lower()]
        else:
            line += ["", "", "", "", ""]
        line += ["self" if r.is_baseline else (_row_label(r.baseline) if r.baseline is not None else "")]
        line += [_num(r.params_m, ".6g"), _num(r.mean("params") / 1e6, ".6g"), _num(r.gmacs, ".6g"),
                 _num(r.mean("train_seconds"), ".2f"), *[_num(r.mean(m), "g") for m, _, _ in cost], *measured,
                 ";".join(x.run_id for x in r.runs)]
        w.writerow(line)
    return buf.getvalue()


def _encoding(report: Report):
    from ablate.plots import Encoding
    return Encoding.choose([r.values for r in report.rows], report.columns)


def _curve_rows(report: Report) -> list[ConfigRow]:
    """The configurations whose learning curves are drawn: a search's front (or best trial),
    else every configuration, at most :data:`MAX_CURVES`."""
    s = report.search
    if s is not None and s.trials:
        ids = {s.trials[i].run_id for i in s.front}
        rows = [r for r in report.rows if any(x.run_id in ids for x in r.runs)]
    else:
        rows = list(report.rows)
    return rows[:MAX_CURVES]


def _render_files(report: Report, folder: Path, command: str, spec_path: Optional[str]) -> list[str]:
    from ablate import plots
    (folder / "report.md").write_text(
        render_markdown(report, command, spec_path, datetime.now(timezone.utc)), encoding="utf-8")
    (folder / "report.csv").write_text(render_csv(report), encoding="utf-8")
    files = ["report.md", "report.csv"]
    enc = _encoding(report)
    subtitle = context(report) + (f"; {enc.note()}" if enc.note() else "")
    cost = report.cost
    on_macs = cost.name == "macs"  # the paper's rows have MACs, never our other costs
    points = [plots.ConfigPoint(r.values, cost.value(r), r.mean("val_top1"), r.std("val_top1"),
                                r.paper_macs if on_macs else None, r.paper_top1 if on_macs else None)
              for r in report.rows]
    files += plots.plot_top1_vs_macs(points, enc, folder, cost.stem, subtitle=subtitle,
                                     title=f"{report.experiment}: top-1 against {cost.words}",
                                     x_label=None if on_macs else cost.label)
    if report.correlation is not None:
        from ablate.cost_axis import measured
        from ablate.latency import LATENCY_P25, LATENCY_P75, metric
        files += plots.plot_macs_vs_latency(
            [plots.LatencyPoint(r.values, r.mean("macs"), cost.value(r), measured(r, metric(LATENCY_P25, cost.target)),
                                measured(r, metric(LATENCY_P75, cost.target))) for r in report.rows],
            enc, folder, cost.correlation_stem, target=cost.target,
            title=f"{report.experiment}: how far MACs predict the latency on {cost.target}",
            subtitle=f"{context(report).split(',')[0]}; {report.correlation.short()}")
    shown = _curve_rows(report)
    curves = [plots.Curves(r.values, r.history) for r in shown]
    which = "" if len(shown) == len(report.rows) else (
        " of the Pareto front" if report.search is not None and len(report.search.objectives) > 1 else
        " of the best trial" if report.search is not None else f" of the first {len(shown)} configurations")
    files += plots.plot_learning_curves(curves, enc, folder, CURVES_PLOT, subtitle=subtitle,
                                        title=f"{report.experiment}: learning curves{which}"
                                        + (", mean ± std over seeds" if any(r.seeds > 1 for r in shown) else ""))
    s = report.search
    if s is not None and s.trials:
        numbers = [t.trial_number for t in s.trials]
        settings = [{k: t.params.get(k, "") for k in report.columns} for t in s.trials]
        if len(s.objectives) == 2:
            files += plots.plot_pareto(s.values, settings, s.front, s.objectives, enc, folder, "pareto",
                                       title=f"{report.experiment}: Pareto front of {len(s.trials)} trials",
                                       subtitle=subtitle)
        files += plots.plot_history(s.values, numbers, settings, s.objectives, enc, folder, "history",
                                    title=f"{report.experiment}: optimization history", subtitle=subtitle)
    return files


def _write_atomically(report: Report, command: str, spec_path: Optional[str]) -> list[Path]:
    """Render every file in a temporary folder beside the target, then move each into place."""
    out = report.out_dir
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        files = _render_files(report, tmp, command, spec_path)
        for name in files:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / n for n in files]


# ---------------------------------------------------------------- entry point


def shown_store(uri: str, cwd: Optional[str] = None) -> str:
    """The tracking URI as a report shows it: password masked, a local file relative to the
    working directory, and a local file elsewhere by its name alone (never an absolute path)."""
    shown = display_url(uri, cwd)
    sqlite = shown.split(":///", 1)[0] + ":///" if is_sqlite(shown) else "sqlite:///"  # any driver: sqlite+pysqlite
    for prefix in (sqlite, "file://", ""):
        rest = shown[len(prefix):]
        if shown.startswith(prefix) and os.path.isabs(rest):
            return f"{prefix}<outside the working directory>/{Path(rest).name}"
    return shown


def shown_path(path: str, cwd: Optional[str] = None) -> str:
    """A path as a report shows it: relative to the working directory where it is under it,
    else by its name alone."""
    if not os.path.isabs(path):
        return path
    cwd = os.path.abspath(cwd or os.getcwd())
    if path == cwd or path.startswith(cwd.rstrip(os.sep) + os.sep):
        return os.path.relpath(path, cwd)
    return f"<outside the working directory>/{Path(path).name}"


def shown_command(command: str, cwd: Optional[str] = None) -> str:
    """``command`` with its absolute paths (a spec, ``--out``) shown as :func:`shown_path` does."""
    return " ".join(shown_path(word, cwd) for word in command.split(" "))


def default_out(name: str) -> Path:
    """``reports/<slug>/`` under the working directory (git-ignored; ``results/`` holds the
    committed reference reports, written only with ``--out``)."""
    return Path(REPORTS_DIR) / path_slug(name)


def write_report(target: str, out: Optional[str | Path] = None, *, command: Optional[str] = None,
                 log_artifacts: bool = True, spec_args: Any = None, cost: Optional[str] = None) -> Report:
    """Write ``reports/<name>/`` (or ``out``) for a spec file or an MLflow experiment name.

    ``spec_args`` (:class:`ablate.spec.SpecArgs`: ``--set``, ``--name``) select the experiment of
    a spec run with those options; ``cost`` is the x axis of the top-1 figure (``--cost``:
    macs, params, gpu_hours or latency:<target>). Raises :class:`AblateError` when there is no MLflow store,
    or the experiment does not exist or has no finished runs.
    """
    axis = parse_cost(cost)  # a wrong --cost is said before anything is read
    is_spec = _looks_like_spec(target)
    if not is_spec and spec_args is not None and (spec_args.overrides or spec_args.name):
        option = "--set" if spec_args.overrides else "--name"
        raise AblateError(f"{option}: {target} is an experiment name, not a spec file (allowed: {option} "
                          "with a spec file; an experiment name is reported as recorded)")
    spec = _load_spec(target, spec_args) if is_spec else None
    command = command or f"ablate report {target}" + (f" --out {out}" if out is not None else "")
    return report_experiment(_get(spec, "name") if spec is not None else target, spec=spec,
                             spec_path=target if spec is not None else None, out=out,
                             command=command, log_artifacts=log_artifacts, cost=axis)


def _histories(client, rows: Sequence[ConfigRow]) -> None:
    """Each row's per-epoch metrics (one {epoch: value} per seed) from MLflow's metric history.
    A search trial that repeated a trained configuration has its original's history."""
    for row in rows:
        for metric in CURVE_METRICS:
            per_seed = []
            for run in row.runs:
                source = run.tags.get(names.REUSED_FROM) or run.run_id
                steps = {m.step: m.value for m in client.get_metric_history(source, metric)}
                if steps:
                    per_seed.append(steps)
            row.history[metric] = per_seed


def report_experiment(name: str, *, spec: Any = None, spec_path: Optional[str] = None,
                      out: Optional[str | Path] = None, command: Optional[str] = None,
                      log_artifacts: bool = True, cost: CostAxis | str | None = None) -> Report:
    """:func:`write_report` for an experiment ``name`` and, optionally, its loaded spec (which
    gives the varied settings, the baseline, the search objectives and the paper's reference table)."""
    from mlflow.tracking import MlflowClient

    from ablate.cost_axis import attach_measured, check_axis, correlation
    from ablate.stores import existing_tracking_store

    axis = cost if isinstance(cost, CostAxis) else parse_cost(cost)
    uri = existing_tracking_store()  # no store here: one line, and no empty mlflow.db left behind
    client = MlflowClient(uri)
    exp = _experiment(client, name, display_url(uri))
    runs = _all_runs(client, exp.experiment_id)
    parents = sorted((r for r in runs if r.data.tags.get(names.ROLE) == "parent"),
                     key=lambda r: r.info.start_time or 0)
    children = [_cell(r) for r in runs if r.data.tags.get(names.ROLE) == "cell"]
    counts = outcome_counts(children)
    complete = [c for c in children if c.state == "COMPLETE"]
    if not complete:
        raise AblateError(f"experiment {name!r} has no finished runs in {display_url(uri)} "
                          f"({len(children)} runs: {counts['PRUNED']} pruned, {counts['FAIL']} failed, "
                          f"{counts['RUNNING']} unfinished)")

    varied = [k for k in (_get(spec, "varied") or []) if k != SEED] or varied_from_runs(complete)
    latest = _latest_per_cell(complete)
    rows, differing = group_by_config(latest, varied)
    attach_measured(rows, [r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_LATENCY])
    check_axis(axis, rows, name)
    reference = _get(spec, "reference")
    if reference is not None:
        attach_reference(rows, reference)
    parent = parents[-1] if parents else None
    is_search = (spec is not None and _get(spec, "search") is not None) or (
        spec is None and parent is not None and parent.data.tags.get(names.KIND) == "search")
    search = None
    if is_search:
        search = summarize_search(complete, *_search_objectives(spec, parent))

    report = Report(
        experiment=name, tracking_uri=uri, varied=varied, rows=rows, counts=counts,
        out_dir=Path(out) if out is not None else default_out(name), search=search,
        parent_run_id=parent.info.run_id if parent else None,
        reference_source=(_get(reference, "source") or "reference") if reference is not None else None,
        differing=differing, store=shown_store(uri), overridden=sorted(getattr(spec, "overrides", None) or ()),
        repeats=len(complete) - len(latest), cost=axis,
        correlation=correlation(rows, axis) if axis.is_latency else None)
    report.baseline_note = compare_with_baseline(rows, _get(spec, "baseline") or None)
    _histories(client, _curve_rows(report))
    command = command or f"ablate report {name}" + (f" --out {out}" if out is not None else "")
    report.files = _write_atomically(report, shown_command(command),
                                     shown_path(str(spec_path)) if spec_path is not None else None)
    if log_artifacts and parent is not None:
        try:
            for path in report.files:
                client.log_artifact(parent.info.run_id, str(path), ARTIFACT_DIR)
        except Exception as e:  # the files are written; say what did not happen and why
            raise AblateError(f"report written to {report.out_dir}, but logging it to MLflow run "
                              f"{parent.info.run_id} in {display_url(uri)} failed: {e}") from e
    return report
