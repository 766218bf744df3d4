"""The end of ``ablate run`` and ``ablate search``: what they trained, and the command to run next.

A grid ends with the table of its cells (configuration, top-1, MACs, state), a search with its
Pareto set or best trial; both then print the ``ablate report`` command with the same options.
Cells no longer in the spec are not cells of the grid: the count line names those left
unfinished (orphaned) apart.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from optuna.trial import TrialState

from ablate import names, text, tracking
from ablate.ledger import Ledger
from ablate.pareto import pareto_front
from ablate.progress import CellState, Progress
from ablate.runner import Outcome, overrides_note
from ablate.spec.builder import SpecArgs
from ablate.units import count_unit

MAX_ROWS = 40  # a summary is read in a terminal; `ablate report` has every row


def report_command(spec_path: str, spec_args: SpecArgs = SpecArgs()) -> str:
    """The ``ablate report`` command of the runs a command with these options made."""
    return spec_args.command("report", spec_path)


@dataclass
class ResultRow:
    """One line of a summary: a cell's (or trial's) varied values, outcome and cost."""
    values: dict
    state: str
    metrics: dict


def grid_results(spec, where: Progress) -> list[ResultRow]:
    """Every cell of the grid, a configuration's seeds side by side and configurations in the
    spec's order, with its state and the top-1 and MACs of its finished run."""
    order: dict[str, int] = {}
    for cell in where.cells:
        order.setdefault(_configuration(cell.values), len(order))
    ordered = sorted(where.cells, key=lambda c: (order[_configuration(c.values)], c.values.get(names.SEED, 0)))
    return [ResultRow(c.values, str(c.state), {names.VAL_TOP1: c.top1, names.MACS: c.macs}) for c in ordered]


def _configuration(values: dict) -> str:
    return json.dumps({k: v for k, v in values.items() if k != names.SEED}, sort_keys=True, default=str)


def search_results(spec, ledger: Ledger) -> tuple[str, list[ResultRow]]:
    """(title, rows): the search's Pareto set (several objectives) or best trial, one row per
    configuration, best first, with each objective and the top-1 and MACs of its MLflow run."""
    objectives = spec.search.objectives
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
    runs = {r.data.tags.get(names.TRIAL_NUMBER): r for r in tracking.cell_runs(spec.name)}
    rows = []
    for t in chosen:
        metrics = dict(runs[str(t.number)].data.metrics) if str(t.number) in runs else {}
        metrics.update({o.metric: v for o, v in zip(objectives, t.values)})
        values = {"trial": t.number, **{k: t.params.get(k, "") for k in spec.search.space}}
        rows.append(ResultRow(values, str(CellState.FINISHED), metrics))
    what = (f"Pareto set ({', '.join(f'{o.metric} {o.direction}' for o in objectives)}): "
            f"{len(rows)} of {len(trials)} finished configurations" if len(objectives) > 1 else
            f"best of {len(trials)} finished configurations ({objectives[0].metric} {objectives[0].direction})")
    return what, rows


def _metric_column(name: str, values: list) -> tuple[str, list[str]]:
    """A metric's header and cells: counts (MACs, params) in one unit for the column, accuracy
    in percent points with two decimals."""
    counts = {names.MACS: "MACs", names.FLOPS: "FLOPs", names.PARAMS: "params", "params_paper": "params"}
    if name in counts:
        prefix, divisor = count_unit([v for v in values if v is not None])
        return (f"{counts[name]} ({prefix})" if prefix else counts[name],
                ["-" if v is None else f"{v / divisor:.3g}" for v in values])
    header = {names.VAL_TOP1: "top-1", names.VAL_TOP5: "top-5"}.get(name, name)
    fmt = ".2f" if name.startswith("val_") else ".4g"
    return header, ["-" if v is None else format(v, fmt) for v in values]


def format_results(rows: list[ResultRow], metrics: list[str], *, with_state: bool = True) -> list[str]:
    """Aligned lines: the varied values (short names), the metrics, the state."""
    if not rows:
        return []
    keys = list(rows[0].values)
    short = [k.split(".")[-1] for k in keys]
    headers = [s if short.count(s) == 1 else k for k, s in zip(keys, short)]
    body = [[text.value(r.values[k]) for k in keys] for r in rows]
    for m in metrics:
        header, cells = _metric_column(m, [r.metrics.get(m) for r in rows])
        headers.append(header)
        for line, cell in zip(body, cells):
            line.append(cell)
    if with_state:
        headers.append("state")
        for line, r in zip(body, rows):
            line.append(r.state)
    return text.aligned(headers, body, left=len(keys))


def _print_rows(lines: list[str], total: int, what: str, out) -> None:
    shown = lines[:MAX_ROWS + 1]  # the header and MAX_ROWS rows
    for line in shown:
        print(f"  {line}", file=out)
    if total > MAX_ROWS:
        print(f"  ... and {total - MAX_ROWS} more {what} (the report lists them all)", file=out)


def print_summary(outcome: Outcome, spec_path: str, spec_args: SpecArgs = SpecArgs(), out=None) -> None:
    """The end of ``ablate run``: the table of the grid's cells (configuration, top-1, MACs, state),
    the counts and failures, and the ``ablate report`` command to run next."""
    out = out or sys.stdout  # looked up now: a caller may have replaced it since import
    spec, where = outcome.spec, outcome.progress
    rows = grid_results(spec, where)
    print(f"\n{spec.name}{overrides_note(spec)}: {len(rows)} cells", file=out)
    _print_rows(format_results(rows, [names.VAL_TOP1, names.MACS]), len(rows), "cells", out)
    finished, failed = where.with_state(CellState.FINISHED), where.with_state(CellState.FAILED)
    orphaned = where.orphaned  # cells no longer in the spec, left unfinished: said apart, never "not finished"
    print(f"{len(finished)}/{where.total} cells finished, {len(failed)} failed"
          + (f", {where.pending} not finished" if where.pending else "")
          + (f"; {len(orphaned)} orphaned (no longer in the spec, left unfinished: "
             f"{spec_args.command('run', spec_path, '--close-orphans')} closes "
             f"{'them' if len(orphaned) > 1 else 'it'})" if orphaned else ""), file=out)
    for c in failed:
        print(f"  FAILED {c.describe()}: {c.reason}", file=out)
    if finished:  # a report needs a finished run
        print(f"next: {report_command(spec_path, spec_args)}", file=out)


def print_search_summary(outcome: Outcome, spec_path: str, spec_args: SpecArgs = SpecArgs(), out=None) -> None:
    """The end of ``ablate search``: its Pareto set or best trial, and the ``ablate report`` command."""
    out = out or sys.stdout
    spec = outcome.spec
    what, rows = search_results(spec, outcome.ledger)
    print(f"\n{spec.name}{overrides_note(spec)}: {what}", file=out)
    metrics = list(dict.fromkeys([o.metric for o in spec.search.objectives] + [names.VAL_TOP1, names.MACS]))
    _print_rows(format_results(rows, metrics, with_state=False), len(rows), "configurations", out)
    print(f"next: {report_command(spec_path, spec_args)}", file=out)
