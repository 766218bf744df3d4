"""Reports of an experiment, derived from its MLflow runs (never from a side file).

``write_report(target)`` reads the finished child runs of one experiment (a spec's ``name``
or an MLflow experiment name), groups them by configuration (the varied settings, seeds
pooled) and writes ``results/<name>/``:

- ``report.md`` and ``report.csv``: one row per configuration with top-1 and top-5 as
  mean ± std over seeds, params, MACs (the paper's "FLOPs", §3.4: one multiply-add = 1) and
  training time; the paper's numbers beside ours where the spec has a ``reference`` table;
- ``top1_vs_gmacs.png``: top-1 against MACs (in G, M or k, whichever reads best) with the
  Pareto front;
- for a search, also the Pareto front of the trials under the spec's objectives
  (``pareto.png`` for two objectives) and the optimization history (``history.png``).

All files are rendered into a temporary folder first and then moved into place, so a failure
leaves the previous report (or nothing) rather than a mix. The files are also logged as
artifacts (under ``report/``) of the experiment's most recent parent run.
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
from ablate.errors import AblateError
from ablate.pareto import pareto_front
from ablate.spec.types import path_slug
from ablate.units import macs_in, params_in

SEED = "train.seed"
ARTIFACT_DIR = "report"
DEFAULT_OBJECTIVES = [("val_top1", "maximize")]


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

    def metric(self, name: str) -> float:
        return self.metrics.get(name, math.nan)


@dataclass
class ConfigRow:
    """One configuration: the runs of every seed of the same varied values."""
    values: dict[str, str]
    runs: list[CellResult]
    paper_top1: Optional[float] = None
    paper_top5: Optional[float] = None

    @property
    def seeds(self) -> int:
        return len(self.runs)

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
    """What :func:`write_report` read and wrote (the CLI prints a summary of it)."""
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


def group_by_config(cells: Sequence[CellResult], varied: Sequence[str]) -> list[ConfigRow]:
    """Rows of runs sharing the varied values (seeds pooled), in the order the configurations
    were first run (trial number, then start time): a grid's own order."""
    def order(c: CellResult):
        n = c.trial_number
        return (n if n is not None else math.inf, c.start_time)

    rows: dict[tuple, ConfigRow] = {}
    for c in sorted(cells, key=order):
        values = {k: c.params.get(k, "") for k in varied}
        rows.setdefault(tuple(values.values()), ConfigRow(values, [])).runs.append(c)
    return list(rows.values())


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
    trials = sorted((c for c in cells if c.trial_number is not None), key=lambda c: c.trial_number)
    values = [[t.metric(m) for m, _ in objectives] for t in trials]
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


def short_label(values: dict[str, str]) -> str:
    """Point label: the value alone for one factor, ``name=value`` pairs for several."""
    if len(values) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(map(cell, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _has_reference(report: Report) -> bool:
    return report.reference_source is not None


def config_table(report: Report) -> tuple[list[str], list[list[str]]]:
    header = list(report.varied) + ["seeds", "top-1 (%)", "top-5 (%)"]
    if _has_reference(report):
        header += ["paper top-1", "paper top-5"]
    from ablate.units import count_unit
    p_prefix, p_div = count_unit([r.params_m * 1e6 for r in report.rows])
    m_prefix, m_div = count_unit([r.gmacs * 1e9 for r in report.rows])
    header += [f"params ({p_prefix})" if p_prefix else "params", f"{m_prefix}MACs", "train (s)"]
    body = []
    for r in report.rows:
        line = [display_value(r.values[k]) for k in report.varied] + [
            str(r.seeds), _pm(r.mean("val_top1"), r.std("val_top1")),
            _pm(r.mean("val_top5"), r.std("val_top5"))]
        if _has_reference(report):
            line += [_num(r.paper_top1, ".1f"), _num(r.paper_top5, ".1f")]
        line += [_num(r.params_m * 1e6 / p_div, ".4g"), _num(r.gmacs * 1e9 / m_div, ".4g"),
                 _num(r.mean("train_seconds"), ".1f")]
        body.append(line)
    return header, body


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


def render_markdown(report: Report, command: str, spec_path: Optional[str], when: datetime) -> str:
    c = report.counts
    kind = "search" if report.search is not None else "grid"
    not_shown = ", ".join(f"{c[s]} {w}" for s, w in (("PRUNED", "pruned"), ("FAIL", "failed"),
                                                       ("RUNNING", "unfinished")) if c.get(s))
    lines = [
        f"# {report.experiment}",
        "",
        f"- experiment: `{report.experiment}` ({kind}" + (f", spec `{spec_path}`" if spec_path else "") + ")",
        f"- runs: {c['COMPLETE']} complete in {len(report.rows)} configurations"
        + (f"; {not_shown} (not in the tables)" if not_shown else ""),
        f"- MLflow tracking URI: `{report.tracking_uri}`"
        + (f" (parent run `{report.parent_run_id}`)" if report.parent_run_id else ""),
        f"- date: {when.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- generated by `{command}`",
        "",
        "top-1 / top-5: validation accuracy (%) after the last epoch, mean ± sample std over "
        "seeds. params: paper convention (classifier and norm parameters excluded) when "
        "logged. MACs: multiply-accumulates per image, the paper's \"FLOPs\" (G = 1e9, "
        "M = 1e6, k = 1e3). "
        "train: mean training seconds.",
        "",
        _md_table(*config_table(report)),
        "",
    ]
    if _has_reference(report):
        lines += [f"Paper numbers: {report.reference_source}.", ""]
    lines += ["![top-1 against MACs](top1_vs_gmacs.png)", ""]
    s = report.search
    if s is not None:
        objective_list = ", ".join(f"{m} ({d})" for m, d in s.objectives)
        what = "best trial" if len(s.objectives) == 1 else "non-dominated trials"
        lines += [
            "## Pareto front" if len(s.objectives) > 1 else "## Best trial",
            "",
            f"Objectives: {objective_list} (from {s.objectives_source}). {len(s.front)} {what} of "
            f"{len(s.trials)} complete trials.",
            "",
            _md_table(*pareto_table(report)),
            "",
        ]
        if len(s.objectives) == 2:
            lines += ["![Pareto front](pareto.png)", ""]
        lines += ["![optimization history](history.png)", ""]
    return "\n".join(lines)


def render_csv(report: Report) -> str:
    header = list(report.varied) + ["seeds", "top1_mean", "top1_std", "top5_mean", "top5_std"]
    if _has_reference(report):
        header += ["paper_top1", "paper_top5"]
    header += ["params_m", "params_all_m", "gmacs", "train_seconds", "run_ids"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in report.rows:
        line = [display_value(r.values[k]) for k in report.varied] + [
            r.seeds, _num(r.mean("val_top1"), ".4f"), _num(r.std("val_top1"), ".4f"),
            _num(r.mean("val_top5"), ".4f"), _num(r.std("val_top5"), ".4f")]
        if _has_reference(report):
            line += [_num(r.paper_top1, "g"), _num(r.paper_top5, "g")]
        line += [_num(r.params_m, ".6g"), _num(r.mean("params") / 1e6, ".6g"), _num(r.gmacs, ".6g"),
                 _num(r.mean("train_seconds"), ".2f"), ";".join(x.run_id for x in r.runs)]
        w.writerow(line)
    return buf.getvalue()


def _render_files(report: Report, folder: Path, command: str, spec_path: Optional[str]) -> list[str]:
    from ablate import plots
    (folder / "report.md").write_text(
        render_markdown(report, command, spec_path, datetime.now(timezone.utc)), encoding="utf-8")
    (folder / "report.csv").write_text(render_csv(report), encoding="utf-8")
    rows = report.rows
    plots.plot_top1_vs_macs([r.mean("macs") for r in rows], [r.mean("val_top1") for r in rows],
                            [r.std("val_top1") for r in rows], [short_label(r.values) for r in rows],
                            folder / "top1_vs_gmacs.png", title=f"{report.experiment}: top-1 vs MACs")
    files = ["report.md", "report.csv", "top1_vs_gmacs.png"]
    s = report.search
    if s is not None and s.trials:
        numbers = [t.trial_number for t in s.trials]
        if len(s.objectives) == 2:
            plots.plot_pareto(s.values, numbers, s.front, s.objectives, folder / "pareto.png",
                              title=f"{report.experiment}: Pareto front")
            files.append("pareto.png")
        plots.plot_history(s.values, numbers, s.objectives, folder / "history.png",
                           title=f"{report.experiment}: optimization history")
        files.append("history.png")
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


def write_report(target: str, out: Optional[str | Path] = None, *, command: Optional[str] = None,
                 log_artifacts: bool = True, spec_args: Any = None) -> Report:
    """Write ``results/<name>/`` (or ``out``) for a spec file or an MLflow experiment name.

    ``spec_args`` (:class:`ablate.spec.SpecArgs`: ``--set``, ``--name``) select the experiment of
    a spec run with those options. Raises :class:`AblateError` when the experiment does not exist
    or has no finished runs.
    """
    is_spec = _looks_like_spec(target)
    if not is_spec and spec_args is not None and (spec_args.overrides or spec_args.name):
        option = "--set" if spec_args.overrides else "--name"
        raise AblateError(f"{option}: {target} is an experiment name, not a spec file (allowed: {option} "
                          "with a spec file; an experiment name is reported as recorded)")
    spec = _load_spec(target, spec_args) if is_spec else None
    command = command or f"ablate report {target}" + (f" --out {out}" if out is not None else "")
    return report_experiment(_get(spec, "name") if spec is not None else target, spec=spec,
                             spec_path=target if spec is not None else None, out=out,
                             command=command, log_artifacts=log_artifacts)


def report_experiment(name: str, *, spec: Any = None, spec_path: Optional[str] = None,
                      out: Optional[str | Path] = None, command: Optional[str] = None,
                      log_artifacts: bool = True) -> Report:
    """:func:`write_report` for an experiment ``name`` and, optionally, its loaded spec (which
    gives the varied settings, the search objectives and the paper's reference table)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = mlflow.get_tracking_uri()
    client = MlflowClient()
    exp = _experiment(client, name, uri)
    runs = _all_runs(client, exp.experiment_id)
    parents = sorted((r for r in runs if r.data.tags.get(names.ROLE) == "parent"),
                     key=lambda r: r.info.start_time or 0)
    children = [_cell(r) for r in runs if r.data.tags.get(names.ROLE) == "cell"]
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0}
    for c in children:
        counts[c.state if c.state in counts else "RUNNING"] += 1
    complete = [c for c in children if c.state == "COMPLETE"]
    if not complete:
        raise AblateError(f"experiment {name!r} has no finished runs in {uri} "
                          f"({len(children)} runs: {counts['PRUNED']} pruned, {counts['FAIL']} failed, "
                          f"{counts['RUNNING']} unfinished)")

    varied = [k for k in (_get(spec, "varied") or []) if k != SEED] or varied_from_runs(complete)
    rows = group_by_config(_latest_per_cell(complete), varied)
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
        out_dir=Path(out) if out is not None else Path("results") / path_slug(name), search=search,
        parent_run_id=parent.info.run_id if parent else None,
        reference_source=(_get(reference, "source") or "reference") if reference is not None else None)
    command = command or f"ablate report {name}" + (f" --out {out}" if out is not None else "")
    report.files = _write_atomically(report, command, spec_path)
    if log_artifacts and parent is not None:
        try:
            for path in report.files:
                client.log_artifact(parent.info.run_id, str(path), ARTIFACT_DIR)
        except Exception as e:  # the files are written; say what did not happen and why
            raise AblateError(f"report written to {report.out_dir}, but logging it to MLflow run "
                              f"{parent.info.run_id} in {uri} failed: {e}") from e
    return report
