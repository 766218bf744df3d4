"""The end of ``ablate run`` and ``ablate search``: what they trained, and the command to run next.

A grid ends with the table of its cells (configuration, top-1, MACs, state), a search with its
Pareto set or best trial; both then print the ``ablate report`` command with the same options.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

from ablate import names
from ablate.runner import Summary, _open_ledger, _overrides_note, _short
from ablate.spec.builder import SpecArgs

MAX_ROWS = 40  # a summary is read in a terminal; `ablate report` has every row


def report_command(spec_path: str, spec_args: SpecArgs = SpecArgs()) -> str:
    """The ``ablate report`` command of the runs a command with these options made."""
    return spec_args.command("report", spec_path)


def cell_runs(experiment: str) -> list:
    """Every cell run of an experiment, newest first; none (and nothing created) where there is
    no such experiment, or no tracking store yet."""
    from ablate import tracking
    from ablate.locks import sqlite_path
    path = sqlite_path(tracking.tracking_uri())
    if path is not None and not os.path.exists(path):
        return []
    c = tracking.client()
    exp = c.get_experiment_by_name(experiment)
    runs, token = [], None
    while exp is not None:
        page = c.search_runs([exp.experiment_id], filter_string=f"tags.`{names.ROLE}` = 'cell'",
                             order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    return runs


@dataclass
class ResultRow:
    """One line of a summary: a cell's (or trial's) varied values, outcome and cost."""
    values: dict
    state: str
    metrics: dict


def grid_results(spec) -> list[ResultRow]:
    """Every cell of the grid in the spec's order, with the top-1 and MACs of its finished run."""
    runs: dict[str, object] = {}
    for run in cell_runs(spec.name):  # newest first: a cell's finished run wins, else its latest
        key = run.data.tags.get(names.CELL_KEY)
        finished = run.data.tags.get(names.STATE) == "COMPLETE"
        if key not in runs or (finished and runs[key].data.tags.get(names.STATE) != "COMPLETE"):
            runs[key] = run
    rows = []
    # a configuration's seeds side by side, configurations in the spec's order
    order = {}
    for cell in spec.cells():
        order.setdefault(_configuration(cell.values), len(order))
    for cell in sorted(spec.cells(), key=lambda c: (order[_configuration(c.values)], c.seed)):
        run = runs.get(cell.key)
        state = run.data.tags.get(names.STATE, "?") if run is not None else "not started"
        metrics = run.data.metrics if run is not None else {}
        rows.append(ResultRow(cell.values, state, {"val_top1": metrics.get("val_top1") if state == "COMPLETE" else None,
                                                   "macs": metrics.get("macs")}))
    return rows


def _configuration(values: dict) -> str:
    return json.dumps({k: v for k, v in values.items() if k != "train.seed"}, sort_keys=True, default=str)


def search_results(spec, storage: Optional[str] = None) -> tuple[str, list[ResultRow]]:
    """(title, rows): the search's Pareto set (several objectives) or best trial, one row per
    configuration, best first, with each objective and the top-1 and MACs of its MLflow run."""
    from optuna.trial import TrialState

    from ablate.ledger import NoLedger, storage_url
    from ablate.pareto import pareto_front
    objectives = spec.search.objectives
    try:
        ledger = _open_ledger(spec, storage_url(storage), create=False)
    except NoLedger:
        return "no finished trial", []
    seen, trials = set(), []
    for t in ledger.trials(states=(TrialState.COMPLETE,)):
        key = t.user_attrs.get(names.CELL_KEY, f"trial {t.number}")
        if names.DUPLICATE not in t.user_attrs and t.values is not None and key not in seen:
            seen.add(key)  # a repeated configuration counts once
            trials.append(t)
    if not trials:
        return "no finished trial", []
    directions = [o.direction for o in objectives]
    chosen = [trials[i] for i in pareto_front([t.values for t in trials], directions)]
    first = 1.0 if directions[0] == "maximize" else -1.0
    chosen.sort(key=lambda t: -first * t.values[0])
    runs = {r.data.tags.get(names.TRIAL_NUMBER): r for r in cell_runs(spec.name)}
    rows = []
    for t in chosen:
        metrics = dict(runs[str(t.number)].data.metrics) if str(t.number) in runs else {}
        metrics.update({o.metric: v for o, v in zip(objectives, t.values)})
        rows.append(ResultRow({"trial": t.number, **{k: t.params.get(k, "") for k in spec.search.space}}, "COMPLETE",
                              metrics))
    what = (f"Pareto set ({', '.join(f'{o.metric} {o.direction}' for o in objectives)}): "
            f"{len(rows)} of {len(trials)} finished configurations" if len(objectives) > 1 else
            f"best of {len(trials)} finished configurations ({objectives[0].metric} {objectives[0].direction})")
    return what, rows


def _metric_column(name: str, values: list) -> tuple[str, list[str]]:
    """A metric's header and cells: counts (MACs, params) in one unit for the column, accuracy
    in percent points with two decimals."""
    from ablate.units import count_unit
    counts = {"macs": "MACs", "flops": "FLOPs", "params": "params", "params_paper": "params"}
    if name in counts:
        prefix, divisor = count_unit([v for v in values if v is not None])
        return (f"{counts[name]} ({prefix})" if prefix else counts[name],
                ["-" if v is None else f"{v / divisor:.3g}" for v in values])
    header = {"val_top1": "top-1", "val_top5": "top-5"}.get(name, name)
    fmt = ".2f" if name.startswith("val_") else ".4g"
    return header, ["-" if v is None else format(v, fmt) for v in values]


def format_results(rows: list[ResultRow], metrics: list[str], *, with_state: bool = True) -> list[str]:
    """Aligned lines: the varied values (short names), the metrics, the state."""
    from ablate.plan import _table
    if not rows:
        return []
    keys = list(rows[0].values)
    short = [k.split(".")[-1] for k in keys]
    headers = [s if short.count(s) == 1 else k for k, s in zip(keys, short)]
    body = [[_short(r.values[k]) for k in keys] for r in rows]
    for m in metrics:
        header, cells = _metric_column(m, [r.metrics.get(m) for r in rows])
        headers.append(header)
        for line, cell in zip(body, cells):
            line.append(cell)
    if with_state:
        headers.append("state")
        for line, r in zip(body, rows):
            line.append(r.state)
    return _table(headers, body, left=len(keys))


def _print_rows(lines: list[str], total: int, what: str, out) -> None:
    shown = lines[:MAX_ROWS + 1]  # the header and MAX_ROWS rows
    for line in shown:
        print(f"  {line}", file=out)
    if total > MAX_ROWS:
        print(f"  ... and {total - MAX_ROWS} more {what} (the report lists them all)", file=out)


def print_summary(summary: Summary, out=None, *, spec_path: Optional[str] = None,
                  spec_args: SpecArgs = SpecArgs()) -> None:
    """The end of ``ablate run``: with ``spec_path``, the table of the grid's cells (configuration,
    top-1, MACs, state) and the ``ablate report`` command to run next; the counts and failures."""
    out = out or sys.stdout  # looked up now: a caller may have replaced it since import
    print("", file=out)
    if spec_path is not None:
        spec = spec_args.load(spec_path)
        rows = grid_results(spec)
        print(f"{spec.name}{_overrides_note(spec)}: {len(rows)} cells", file=out)
        _print_rows(format_results(rows, ["val_top1", "macs"]), len(rows), "cells", out)
    print(f"{summary.complete}/{summary.total} cells finished, {len(summary.failed)} failed"
          + (f", {summary.pending} not finished" if summary.pending else ""), file=out)
    for desc, reason in summary.failed:
        print(f"  FAILED {desc}: {reason}", file=out)
    if spec_path is not None and summary.complete:  # a report needs a finished run
        print(f"next: {report_command(spec_path, spec_args)}", file=out)


def print_search_summary(spec_path: str, spec_args: SpecArgs = SpecArgs(), storage: Optional[str] = None,
                         out=None) -> None:
    """The end of ``ablate search``: its Pareto set or best trial, and the ``ablate report`` command."""
    out = out or sys.stdout
    spec = spec_args.load(spec_path)
    what, rows = search_results(spec, storage)
    print(f"\n{spec.name}{_overrides_note(spec)}: {what}", file=out)
    metrics = list(dict.fromkeys([o.metric for o in spec.search.objectives] + ["val_top1", "macs"]))
    _print_rows(format_results(rows, metrics, with_state=False), len(rows), "configurations", out)
    print(f"next: {report_command(spec_path, spec_args)}", file=out)
