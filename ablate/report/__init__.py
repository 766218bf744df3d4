"""Reports of an experiment, derived from its MLflow runs (never from a side file).

``write_report(target)`` reads the finished child runs of one experiment (a spec's ``name``
or an MLflow experiment name), groups them by configuration (the whole resolved
configuration but the seed: runs that differ in any other setting are different rows) and
writes ``reports/<name>/`` under the working directory (or ``out``):

- ``report.md`` and ``report.csv``: one row per configuration with top-1 and top-5 as
  mean ± std over seeds, the difference in top-1 from the baseline with a 95% confidence
  interval over seeds (:mod:`.stats`), the train - val gap in top-1 with its 95% interval
  over seeds (where the runs measured ``train_top1``: a column only then, "–" for a row whose
  runs did not), params, MACs (the paper's "FLOPs", §3.4: one multiply-add = 1) and training
  time; the paper's numbers beside ours where the spec has a ``reference`` table;
- ``top1_vs_macs.png``/``.svg``: top-1 against MACs, colour and marker for the varied
  settings, the paper's rows hollow, our Pareto front dashed; with ``cost`` another axis
  (:mod:`ablate.cost_axis`: params, a latency measured by ``ablate latency``, GPU-hours), in
  ``top1_vs_<cost>``, and for a latency also ``macs_vs_latency_<target>`` with the rank
  correlation of the two;
- ``learning_curves.png``/``.svg``: validation top-1 (and, dashed, training top-1 where it was
  measured) and training loss against epoch per configuration, from MLflow's per-epoch metrics;
- for a search, also the Pareto front of the trials under the spec's objectives
  (``pareto.png``/``.svg`` for two objectives) and the optimization history (``history``).

All files are rendered into a temporary folder first and then moved into place, so a failure
leaves the previous report (or nothing) rather than a mix. The files are also logged as
artifacts (under ``report/``) of the experiment's most recent parent run. A report names its
MLflow store relative to the working directory, with any password masked, never by an
absolute path of the machine that made it.

The parts, one seam each: :mod:`.collect` (MLflow runs -> configurations: what was measured),
:mod:`.compare` (the baseline and the paper's numbers), :mod:`.stats` (the confidence interval
of a difference), :mod:`.render` (tables, figures, the folder written at once) and
:mod:`.paths` (where a report goes and how it names paths and stores).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ablate import names
from ablate.cost_axis import CostAxis, attach_measured, check_axis, correlation, parse_cost
from ablate.errors import AblateError
from ablate.locks import unwritable, unwritable_error
from ablate.progress import CellState
from ablate.report.collect import (CellResult, ConfigRow, Report, apart, group_by_config, is_search, latest_per_cell,
                                   outcome_counts, read_experiment, read_histories, read_spec, search_objectives,
                                   summarize_search, varied_from_runs)
from ablate.report.compare import attach_reference, compare_with_baseline
from ablate.report.paths import default_out, run_in, shown_command, shown_path, shown_store
from ablate.report.render import curve_rows, hours_kinds, write_atomically
from ablate.spec import Spec, SpecArgs
from ablate.stores import existing_tracking_store
from ablate.tracking import client
from ablate.urls import display_url

__all__ = ["CellResult", "ConfigRow", "Report", "group_by_config", "outcome_counts", "report_experiment",
           "shown_store", "write_report"]

#: the folder of the parent run's artifacts that holds the report
ARTIFACT_DIR = "report"


def write_report(target: str, out: Optional[str | Path] = None, *, command: Optional[str] = None,
                 log_artifacts: bool = True, spec_args: Optional[SpecArgs] = None,
                 cost: Optional[str] = None) -> Report:
    """Write ``reports/<name>/`` (or ``out``) for a spec file or an MLflow experiment name.

    ``spec_args`` (:class:`ablate.spec.SpecArgs`: ``--set``, ``--name``) select the experiment of
    a spec run with those options; ``cost`` is the x axis of the top-1 figure (``--cost``:
    macs, params, gpu_hours or latency:<target>). Raises :class:`AblateError` when there is no MLflow store,
    or the experiment does not exist or has no finished runs.
    """
    axis = parse_cost(cost)  # a wrong --cost is said before anything is read
    is_spec = Path(target).suffix.lower() in (".yaml", ".yml") or Path(target).is_file()
    if not is_spec and spec_args is not None and (spec_args.overrides or spec_args.name):
        option = "--set" if spec_args.overrides else "--name"
        raise AblateError(f"{option}: {target} is an experiment name, not a spec file (allowed: {option} "
                          "with a spec file; an experiment name is reported as recorded)")
    spec = read_spec(target, spec_args) if is_spec else None
    command = command or f"ablate report {target}" + (f" --out {out}" if out is not None else "")
    return report_experiment(spec.name if spec is not None else target, spec=spec,
                             spec_path=target if spec is not None else None, out=out,
                             command=command, log_artifacts=log_artifacts, cost=axis)


def report_experiment(name: str, *, spec: Optional[Spec] = None, spec_path: Optional[str] = None,
                      out: Optional[str | Path] = None, command: Optional[str] = None,
                      log_artifacts: bool = True, cost: CostAxis | str | None = None) -> Report:
    """:func:`write_report` for an experiment ``name`` and, optionally, its loaded spec (which
    gives the varied settings, the baseline, the search objectives and the paper's reference table)."""
    axis = cost if isinstance(cost, CostAxis) else parse_cost(cost)
    uri = existing_tracking_store()  # no store here: one line, and no empty mlflow.db left behind
    recorded = read_experiment(name, uri, spec)  # a grid's spec sets apart the cells it no longer has
    children, parent = recorded.cells, recorded.parent
    counts = outcome_counts(children)
    complete = [c for c in children if c.state == "COMPLETE"]
    if not complete:
        raise AblateError(f"experiment {name!r} has no finished runs in {display_url(uri)} "
                          f"({len(children)} runs: {counts[CellState.PRUNED]} pruned, {counts[CellState.FAILED]} failed, "
                          f"{counts[CellState.RUNNING]} unfinished)")

    varied = [k for k in (spec.varied if spec is not None else []) if k != names.SEED] or varied_from_runs(complete)
    latest = latest_per_cell(complete)
    rows, differing = group_by_config(latest, varied)
    attach_measured(rows, recorded.latency_runs)
    check_axis(axis, rows, name)
    if axis.name == "gpu_hours":  # its label names what the hours are of: CPU, GPU, or both mixed
        axis = axis.of_devices(hours_kinds(rows))
    reference = spec.reference if spec is not None else None
    if reference is not None:
        attach_reference(rows, reference)
    search = summarize_search(complete, *search_objectives(spec, parent)) if is_search(spec, parent) else None

    report = Report(
        experiment=name, tracking_uri=uri, varied=varied, rows=rows, counts=counts,
        out_dir=Path(out) if out is not None else default_out(name), search=search,
        parent_run_id=parent.info.run_id if parent else None,
        reference_source=(reference.source or "reference") if reference is not None else None,
        differing=differing, store=shown_store(uri), overridden=sorted(spec.identity_overrides) if spec is not None else [],
        repeats=len(complete) - len(latest), cost=axis,
        correlation=correlation(rows, axis) if axis.is_latency else None,
        apart=apart(recorded.orphans, rows, varied))
    report.baseline_note = compare_with_baseline(rows, (spec.baseline or None) if spec is not None else None)
    read_histories(curve_rows(report))
    command = command or f"ablate report {name}" + (f" --out {out}" if out is not None else "")
    new_folder = not report.out_dir.exists()
    try:
        report.files = write_atomically(report, shown_command(command),
                                        shown_path(str(spec_path)) if spec_path is not None else None,
                                        run_in(report.out_dir))
    except OSError as e:  # a full disk, a read-only folder: one line, and the previous report (if any) stays whole
        if unwritable(e) is None:
            raise
        if new_folder:
            _remove_if_empty(report.out_dir)
        raise unwritable_error(e, "the report", str(report.out_dir), "its tables and figures", exact=False,
                         then=f"run `{command}` again: the previous report, if any, is unchanged") from None
    if log_artifacts and parent is not None:
        try:
            for path in report.files:
                client().log_artifact(parent.info.run_id, str(path), ARTIFACT_DIR)
        except Exception as e:  # the files are written; say what did not happen and why
            why = e if unwritable(e) is None else unwritable_error(
                e, "MLflow's artifact folder", parent.info.artifact_uri, f"{path.name} under report/",
                then=f"run `{command}` again")
            raise AblateError(f"report written to {report.out_dir}, but logging it to MLflow run "
                              f"{parent.info.run_id} in {display_url(uri)} failed: {why}") from None
    return report


def _remove_if_empty(folder: Path) -> None:
    """A report folder this command created and could not fill: gone again, leaving nothing behind."""
    try:
        folder.rmdir()
    except OSError:  # not empty, or not ours to remove
        pass
