"""A report's files: the Markdown and CSV tables (one row per configuration, and a search's
front), its figures (:mod:`ablate.plots`), all rendered into a temporary folder and then moved
into place, so that a failure leaves the previous report (or nothing) rather than a mix."""
from __future__ import annotations

import csv
import io
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ablate import latency, names, plots
from ablate.cost_axis import csv_columns, measured, table_columns
from ablate.progress import CellState
from ablate.report.collect import Apart, ConfigRow, Report
from ablate.report.stats import LEGEND, NO_INTERVAL, format_difference, format_interval
from ablate.text import fixed, markdown_table, mean_std, param, plural
from ablate.units import count_unit

#: the most configurations whose learning curves share one figure
MAX_CURVES = 12
CURVES_PLOT = "learning_curves"


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


@dataclass(frozen=True)
class CostColumn:
    """A column of what training cost: the metric runs logged, its Markdown and CSV headers, its
    format, and for device-hours the kind of device whose runs it averages."""
    metric: str
    label: str
    csv: str
    fmt: str
    kind: Optional[str] = None  # CPU | GPU | "" (not recorded); None: every run

    def value(self, r: ConfigRow) -> float:
        return r.mean(self.metric, self.kind)


#: what training cost, as runs record it (ablate/train.py), shown where any row has it (runs from
#: before these metrics have none)
TRAINING_COST = (CostColumn(names.IMAGES_PER_SECOND, "img/s", names.IMAGES_PER_SECOND, ".0f"),
                 CostColumn(names.MFU, "MFU (%)", names.MFU, ".1f"),
                 CostColumn(names.GPU_HOURS, "device-h", names.GPU_HOURS, ".3g"),
                 CostColumn("peak_memory_gb", "peak mem (GB)", "peak_memory_gb", ".3g"))
#: the device-hours a run logs (``gpu_hours``, whatever it trained on), one column per kind of
#: device, named by it: an hour of a CPU is not an hour of a GPU, so a report of CPU runs shows
#: CPU-h, never GPU-h, and one of runs on both shows each kind's mean in its own column
DEVICE_HOURS = {"CPU": ("CPU-h", "cpu_hours"), "GPU": ("GPU-h", names.GPU_HOURS),
                "": ("device-h (device not recorded)", "device_hours")}


def hours_kinds(rows) -> list[str]:
    """The kinds of device (CPU, GPU, "" for runs that recorded none) the runs with device-hours
    trained on, in :data:`DEVICE_HOURS` order."""
    found = {run.device_kind for r in rows for run in r.runs if math.isfinite(run.metric(names.GPU_HOURS))}
    return [k for k in DEVICE_HOURS if k in found]


def _training_cost(report: Report) -> list[CostColumn]:
    out = []
    for c in TRAINING_COST:
        if c.metric == names.GPU_HOURS:
            kinds = hours_kinds(report.rows)
            for kind in kinds:
                label, name = DEVICE_HOURS[kind]
                if kinds == [""]:  # no run says what it trained on: one column, of no named kind
                    label = "device-h"
                out.append(CostColumn(c.metric, label, name, c.fmt, kind))
        elif any(math.isfinite(r.mean(c.metric)) for r in report.rows):
            out.append(c)
    return out


#: a gap cell of a row whose runs did not measure train_top1 (recorded before it was, or turned off)
NO_GAP = "–"
#: after a row's params and MACs: counted on a forward pass of a timm model, not the paper's formula
COUNTED_MARK = " c"
COUNTED_LEGEND = ("; c: counted on a forward pass of the timm model (torch.utils.flop_counter; params without the "
                  "classifier, norms included), the other rows analytic (paper §3.4)")
GAP_LEGEND = ("gap: train top-1 minus validation top-1 after the last epoch, in percentage points, mean "
              "with a 95% Student-t confidence interval over seeds; train top-1 is measured like the "
              "validation split (eval mode, no augmentation) on a fixed subset of the training split "
              f"(train.eval_train_images), and {NO_GAP} marks runs that did not measure it.")


def _has_gap(report: Report) -> bool:
    """Whether any row measured train_top1 (runs from before it was measured have no gap column)."""
    return any(r.gap is not None for r in report.rows)


def _hours_legend(report: Report) -> str:
    """What the device-hours columns are, where there are any."""
    kinds = hours_kinds(report.rows)
    if not kinds:
        return ""
    named = " / ".join(DEVICE_HOURS[k][0].split(" ")[0] for k in kinds)
    return (f" {named}: device-hours of training (processes × wall time), mean over the seeds that trained on "
            "that kind of device (the device each run recorded)"
            + ("; a configuration whose seeds ran on different kinds has a value in each column" if len(kinds) > 1
               else "") + ".")


def _cost_value(r: ConfigRow, c: CostColumn) -> str:
    value = c.value(r)
    return fixed(100 * value if c.metric == names.MFU else value, c.fmt)


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
    gap = _has_gap(report)
    if gap:
        header += ["gap (pp, 95% CI)"]
    p_prefix, p_div = count_unit([r.params_m * 1e6 for r in report.rows])
    m_prefix, m_div = count_unit([r.gmacs * 1e9 for r in report.rows])
    header += [f"params ({p_prefix})" if p_prefix else "params", f"{m_prefix}MACs", "train (s)"]
    measured_header, measured_cells = table_columns(report.rows, report.cost)
    cost = _training_cost(report)
    header += [c.label for c in cost]
    header += measured_header
    body = []
    for r in report.rows:
        line = [param(r.values[k]) for k in report.columns] + [
            str(r.seeds), mean_std(r.mean(names.VAL_TOP1), r.std(names.VAL_TOP1))]
        if _has_reference(report):
            line += [fixed(r.paper_top1, ".1f")]
        line += [_delta_cell(r)]
        if _any_interval(report):
            line += [_method_cell(r)]
        if _several_baselines(report):
            line += ["" if r.is_baseline or r.baseline is None else _baseline_cell(report, r.baseline)]
        line += [mean_std(r.mean(names.VAL_TOP5), r.std(names.VAL_TOP5))]
        if _has_reference(report):
            line += [fixed(r.paper_top5, ".1f")]
        if gap:
            line += [format_interval(r.gap, NO_GAP)]
        counted = COUNTED_MARK if r.counted else ""
        line += [fixed(r.params_m * 1e6 / p_div, ".4g") + counted, fixed(r.gmacs * 1e9 / m_div, ".4g") + counted,
                 fixed(r.mean("train_seconds"), ".1f"), *[_cost_value(r, c) for c in cost]]
        body.append(line + measured_cells[len(body)])
    return header, body


def _baseline_cell(report: Report, base: ConfigRow) -> str:
    """The baseline's values in the settings that differ between the baselines."""
    bases = {id(r.baseline): r.baseline for r in report.rows if r.baseline is not None}.values()
    keys = [k for k in report.columns if len({b.values.get(k) for b in bases}) > 1]
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={param(base.values[k])}" for k in keys)


def _objective_text(value: float, scale: float) -> str:
    return fixed(value / scale, ".2f" if scale == 1.0 else ".4g")


def pareto_table(report: Report) -> tuple[list[str], list[list[str]]]:
    s = report.search
    arrows = {"maximize": "↑", "minimize": "↓"}
    axes = [plots.metric_axis(m, [v[k] for v in s.values]) for k, (m, _) in enumerate(s.objectives)]
    header = ["trial"] + list(report.varied) + [
        f"{label} {arrows.get(d, d)}" for (label, _), (_, d) in zip(axes, s.objectives)]
    body = []
    for i in sorted(s.front, key=lambda i: [(-v if d == "maximize" else v) for v, (_, d)
                                            in zip(s.values[i], s.objectives)]):
        t = s.trials[i]
        body.append([str(t.trial_number)] + [param(t.params.get(k, "")) for k in report.varied] +
                    [_objective_text(v, scale) for v, (_, scale) in zip(s.values[i], axes)])
    return header, body


def context(report: Report) -> str:
    """What a figure's title must say besides the experiment: the dataset, the training budget,
    the split the accuracy is measured on, and the seeds behind each point."""
    settings = [r.settings for r in report.rows]
    datasets = sorted({s.get("data.name", "") for s in settings} - {""})
    epochs = sorted({int(float(s[names.EPOCHS])) for s in settings if _number(s.get(names.EPOCHS))})
    seeds = sorted({r.seeds for r in report.rows})
    parts = [", ".join(datasets) or "dataset not recorded"]
    if epochs:
        parts.append(plural(epochs[0], "epoch") if len(epochs) == 1 else f"{epochs[0]}–{epochs[-1]} epochs")
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


def render_markdown(report: Report, command: str, spec_path: Optional[str], when: datetime,
                    where: str = "") -> str:
    """``where``: the working directory ``command`` ran in, relative to the report's folder."""
    c = report.counts
    kind = names.SEARCH if report.search is not None else names.GRID
    not_shown = ", ".join(f"{c[s]} {w}" for s, w in ((CellState.PRUNED, "pruned"), (CellState.FAILED, "failed"),
                                                       (CellState.RUNNING, "unfinished")) if c.get(s))
    lines = [
        f"# {report.experiment}",
        "",
        f"- experiment: `{report.experiment}` ({kind}" + (f", spec `{spec_path}`" if spec_path else "") + ")",
        f"- runs: {c[CellState.FINISHED]} complete in {len(report.rows)} configuration{'s' * (len(report.rows) != 1)}"
        + (f" ({report.repeats} of them {'a repeat' if report.repeats == 1 else 'repeats'} of a configuration "
           "already trained, counted once)" if report.repeats else "")
        + (f"; {not_shown} (not in the tables)" if not_shown else ""),
        *([f"- no longer in the spec: {_apart_summary(report.apart)}"] if report.apart else []),
        f"- MLflow tracking URI: `{report.store}`"
        + (f" (parent run `{report.parent_run_id}`)" if report.parent_run_id else ""),
        f"- {context(report)}",
        f"- {report.baseline_note}",
        f"- date: {when.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- generated by `{command}`"
        + (f", run in `{where}` from this report's folder (the working directory it ran in)"
           if where else ""),
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
        "M = 1e6, k = 1e3)" + (COUNTED_LEGEND if any(r.counted for r in report.rows) else "")
        + ". train: mean training seconds." + _hours_legend(report) + " " + LEGEND + no_interval
        + (" " + GAP_LEGEND if _has_gap(report) else ""),
        "",
        markdown_table(*config_table(report)),
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
            markdown_table(*pareto_table(report)),
            "",
        ]
        for stem in ("pareto", "history"):
            if stem in figures:
                lines += [f"![{figures[stem]}]({stem}.png)", ""]
    if report.apart:
        lines += _apart_section(report.apart, spec_path)
    lines += ["Every figure is also written as SVG beside its PNG.", ""]
    return "\n".join(lines)


def _apart_summary(a: Apart) -> str:
    """``1 cell (1 unfinished: model.shift=four); listed apart below, ...``, for the report's header."""
    parts = [f"{sum(r.seeds for r in a.rows)} finished"] if a.rows else []
    for word in dict.fromkeys(word for _, word in a.unfinished):
        named = [n for n, w in a.unfinished if w == word]
        parts.append(f"{len(named)} {word}: {'; '.join(named)}")
    return (f"{plural(a.cells, 'cell')} ({', '.join(parts)}); listed apart below, never in the table, the figures "
            "or the baseline")


def _apart_section(a: Apart, spec_path: Optional[str]) -> list[str]:
    """The runs of cells the spec no longer has: their finished configurations, and those that did not finish."""
    lines = ["## No longer in the spec", "",
             "Cells these runs trained are no longer cells of the spec (a value dropped from the grid, a setting "
             "changed): the table above, its figures and its baseline are the spec's as it is. The finished ones "
             "are still results, here as they were recorded (their Δ is not computed)."
             + (" The CSV holds the spec's rows only." if a.rows else ""), ""]
    if a.rows:
        header = a.columns + ["seeds", "top-1 (%)", "top-5 (%)", "GMACs", "runs"]
        body = [[param(r.values[k]) for k in a.columns] + [
            str(r.seeds), mean_std(r.mean(names.VAL_TOP1), r.std(names.VAL_TOP1)),
            mean_std(r.mean(names.VAL_TOP5), r.std(names.VAL_TOP5)), fixed(r.gmacs, ".4g"),
            ", ".join(f"`{x.run_id}`" for x in r.runs)] for r in a.rows]
        lines += [markdown_table(header, body), ""]
    unfinished = [(n, w) for n, w in a.unfinished if w == "unfinished"]
    if unfinished:
        close = f"`ablate run {spec_path} --close-orphans`" if spec_path else "`ablate run SPEC --close-orphans`"
        it = "them" if len(unfinished) > 1 else "it"
        lines += [f"Left unfinished (orphaned), not shown: {'; '.join(n for n, _ in unfinished)}. No worker of the "
                  f"spec trains {it}; {close} closes {it} (MLflow run KILLED, ledger trial failed, checkpoint "
                  "removed).", ""]
    ended = [(n, w) for n, w in a.unfinished if w != "unfinished"]
    if ended:
        lines += ["Ended without a result, not shown: " + "; ".join(f"{n} ({w})" for n, w in ended) + ".", ""]
    return lines


def render_csv(report: Report) -> str:
    header = report.columns + ["seeds", "top1_mean", "top1_std", "top5_mean", "top5_std"]
    if _has_reference(report):
        header += ["paper_top1", "paper_top5"]
    gap = _has_gap(report)
    if gap:
        header += ["train_top1_mean", "gap_mean", "gap_low", "gap_high"]
    header += ["delta_top1", "delta_low", "delta_high", "delta_method", "delta_excludes_zero", "baseline"]
    measured_header, measured_cells = csv_columns(report.rows, report.cost)
    cost = _training_cost(report)
    header += ["params_m", "params_all_m", "gmacs", "train_seconds", *[c.csv for c in cost], *measured_header,
               "run_ids"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r, latencies in zip(report.rows, measured_cells):
        line = [param(r.values[k], whole_offsets=True) for k in report.columns] + [
            r.seeds, fixed(r.mean(names.VAL_TOP1), ".4f"), fixed(r.std(names.VAL_TOP1), ".4f"),
            fixed(r.mean(names.VAL_TOP5), ".4f"), fixed(r.std(names.VAL_TOP5), ".4f")]
        if _has_reference(report):
            line += [fixed(r.paper_top1, "g"), fixed(r.paper_top5, "g")]
        if gap:
            g = r.gap
            line += [fixed(r.mean(names.TRAIN_TOP1), ".4f")] + (
                [fixed(g.mean, ".4f"), fixed(g.low, ".4f"), fixed(g.high, ".4f")] if g is not None else ["", "", ""])
        d = r.delta
        if d is not None:
            line += [fixed(d.mean, ".4f"), fixed(d.low, ".4f"), fixed(d.high, ".4f"),
                     d.method if d.has_interval else NO_INTERVAL, str(d.excludes_zero).lower()]
        else:
            line += ["", "", "", "", ""]
        line += ["self" if r.is_baseline else (r.baseline.label if r.baseline is not None else "")]
        line += [fixed(r.params_m, ".6g"), fixed(r.mean(names.PARAMS) / 1e6, ".6g"), fixed(r.gmacs, ".6g"),
                 fixed(r.mean("train_seconds"), ".2f"), *[fixed(c.value(r), "g") for c in cost], *latencies,
                 ";".join(x.run_id for x in r.runs)]
        w.writerow(line)
    return buf.getvalue()


def _encoding(report: Report):
    return plots.Encoding.choose([r.values for r in report.rows], report.columns)


def curve_rows(report: Report) -> list[ConfigRow]:
    """The configurations whose learning curves are drawn: a search's front (or best trial),
    else every configuration, at most :data:`MAX_CURVES`."""
    s = report.search
    if s is not None and s.trials:
        ids = {s.trials[i].run_id for i in s.front}
        rows = [r for r in report.rows if any(x.run_id in ids for x in r.runs)]
    else:
        rows = list(report.rows)
    return rows[:MAX_CURVES]


def _render_files(report: Report, folder: Path, command: str, spec_path: Optional[str], where: str = "") -> list[str]:
    (folder / "report.md").write_text(
        render_markdown(report, command, spec_path, datetime.now(timezone.utc), where), encoding="utf-8")
    (folder / "report.csv").write_text(render_csv(report), encoding="utf-8")
    files = ["report.md", "report.csv"]
    enc = _encoding(report)
    subtitle = context(report) + (f"; {enc.note()}" if enc.note() else "")
    cost = report.cost
    on_macs = cost.name == "macs"  # the paper's rows have MACs, never our other costs
    points = [plots.ConfigPoint(r.values, cost.value(r), r.mean(names.VAL_TOP1), r.std(names.VAL_TOP1),
                                r.paper_macs if on_macs else None, r.paper_top1 if on_macs else None)
              for r in report.rows]
    files += plots.plot_top1_vs_macs(points, enc, folder, cost.stem, subtitle=subtitle,
                                     title=f"{report.experiment}: top-1 against {cost.words}",
                                     x_label=None if on_macs else cost.label)
    if report.correlation is not None:
        files += plots.plot_macs_vs_latency(
            [plots.LatencyPoint(r.values, r.mean(names.MACS), cost.value(r),
                                measured(r, latency.metric(latency.LATENCY_P25, cost.target)),
                                measured(r, latency.metric(latency.LATENCY_P75, cost.target))) for r in report.rows],
            enc, folder, cost.correlation_stem, target=cost.target,
            title=f"{report.experiment}: how far MACs predict the latency on {cost.target}",
            subtitle=f"{context(report).split(',')[0]}; {report.correlation.short()}")
    shown = curve_rows(report)
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


def write_atomically(report: Report, command: str, spec_path: Optional[str], where: str = "") -> list[Path]:
    """Render every file in a temporary folder beside the target, then move each into place
    (``where``: the working directory, relative to the report's folder, for its command)."""
    out = report.out_dir
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        files = _render_files(report, tmp, command, spec_path, where)
        for name in files:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / n for n in files]
