"""The cost axis of a report (``ablate report --cost``): MACs, params, a measured latency, or GPU-hours.

- ``macs`` (the default): multiply-adds per image, the paper's "FLOPs" (analytic, §3.4);
- ``params``: parameters, paper convention (classifier and norms excluded) where logged;
- ``latency:<target>``: the median latency per image that ``ablate latency`` measured on that
  target (:mod:`ablate.latency`), from the configuration's latency run, else the mean over its
  cell runs (a search that optimised a latency recorded it there);
- ``gpu_hours``: the device-hours training took (processes x wall time), as the runs recorded,
  named by what they trained on: CPU-hours for CPU runs, GPU-hours for GPU runs, and said to be
  mixed where the configurations' runs trained on both (:meth:`CostAxis.of_devices`).

The top-1 figure and its Pareto front use the chosen axis; every measured latency gets a column
in the table (median and interquartile range); with a latency axis, a second figure puts the
measured latency against MACs, one point per configuration, with Spearman's rank correlation:
how far the FLOP count predicts what the target measures.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from ablate import latency, names
from ablate.errors import AblateError
from ablate.plots.style import macs_label
from ablate.tracking import configuration_key
from ablate.units import count_unit

CHOICES = ("macs", "params", "gpu_hours", "latency:<target>")


@dataclass(frozen=True)
class CostAxis:
    """One cost: how to read it from a report row, how to label it, which file holds its figure."""
    name: str  # macs | params | gpu_hours | latency:<target>
    devices: tuple[str, ...] = ()  # gpu_hours: the kinds of device the runs trained on (CPU, GPU; "": not recorded)

    def of_devices(self, kinds) -> "CostAxis":
        """This axis, knowing the kinds of device (``CPU``, ``GPU``, ``""``) its runs trained on."""
        return replace(self, devices=tuple(kinds))

    @property
    def hours_words(self) -> str:
        """``CPU-hours``, ``GPU-hours``, or device-hours where they are of no one named kind."""
        if self.devices == ("CPU",):
            return "CPU-hours"
        if self.devices == ("GPU",):
            return "GPU-hours"
        known = [k for k in self.devices if k]
        return f"device-hours ({' and '.join(known)} runs mixed)" if len(known) > 1 else "device-hours"

    @property
    def target(self) -> Optional[str]:
        return self.name[len(latency.OBJECTIVE_PREFIX):] if self.is_latency else None

    @property
    def is_latency(self) -> bool:
        return self.name.startswith(latency.OBJECTIVE_PREFIX)

    @property
    def metric(self) -> str:
        return latency.objective_metric(self.name)

    @property
    def stem(self) -> str:
        """The top-1 figure's file stem: ``top1_vs_macs`` (as before), ``top1_vs_latency_<target>``."""
        return "top1_vs_" + re.sub(r"[^A-Za-z0-9_-]+", "_", self.name.replace(":", "_"))

    @property
    def correlation_stem(self) -> str:
        return "macs_vs_" + self.stem[len("top1_vs_"):]

    @property
    def words(self) -> str:
        """What the axis is, for titles: ``MACs``, ``latency on cpu-amd-epyc-t2``."""
        if self.is_latency:
            return f"latency on {self.target}"
        return {"macs": "MACs", "params": "parameters", "gpu_hours": self.hours_words}[self.name]

    def value(self, row) -> float:
        """The row's cost on this axis (NaN where it has none)."""
        if self.name == "macs":
            return row.mean("macs")
        if self.name == "params":
            return row.params_m * 1e6
        if self.name == "gpu_hours":
            return row.mean("gpu_hours")
        return measured(row, self.metric)

    def label(self, values: Sequence[float]) -> tuple[str, float]:
        """(x-axis label, divisor) for these values."""
        if self.name == "macs":
            prefix, divisor = count_unit(values)
            return macs_label(prefix), divisor
        if self.name == "params":
            prefix, divisor = count_unit(values)
            return f"parameters ({prefix or 'count'}; paper convention; log scale)", divisor
        if self.name == "gpu_hours":
            return f"{self.hours_words} of training (processes x wall time; log scale)", 1.0
        return f"latency on {self.target} (ms per image, median; log scale)", 1.0


def parse_cost(text: Optional[str]) -> CostAxis:
    """``--cost`` as given; one-line error for anything else."""
    text = (text or "macs").strip()
    if text in ("macs", "params", "gpu_hours"):
        return CostAxis(text)
    if text.startswith(latency.OBJECTIVE_PREFIX):
        latency.check_target(text[len(latency.OBJECTIVE_PREFIX):], "--cost")
        return CostAxis(text)
    raise AblateError(f"--cost: {text!r} (allowed: {', '.join(CHOICES)}; `ablate latency SPEC` prints its target)")


# ---------------------------------------------------------------- measured numbers of a row


def measured(row, metric_name: str) -> float:
    """A measured metric of a configuration: its latency run's value, else the mean over its cell runs."""
    value = getattr(row, "measured", {}).get(metric_name)
    if value is not None and math.isfinite(value):
        return value
    return row.mean(metric_name)


def attach_measured(rows: Sequence[Any], latency_runs: Sequence[Any]) -> None:
    """Give each row (:class:`ablate.report.ConfigRow`) the latency metrics of the latency run of
    its configuration (found by the configuration key of its settings)."""
    by_key = {}
    for run in sorted(latency_runs, key=lambda r: r.info.start_time or 0):
        by_key[run.data.tags.get(names.CONFIG_KEY, "")] = run
    for row in rows:
        run = by_key.get(configuration_key(row.settings))
        if run is not None:
            row.measured = {k: v for k, v in run.data.metrics.items() if k.split(".", 1)[0] in latency.METRICS}
            row.machines = {k: v for k, v in run.data.tags.items() if k.startswith(names.LATENCY_PREFIX)}


def targets(rows: Sequence[Any]) -> list[str]:
    """Every latency target measured for some row (its latency run or its cell runs)."""
    metric_names = [m for r in rows for m in getattr(r, "measured", {})]
    metric_names += [m for r in rows for run in r.runs for m in run.metrics]
    return latency.targets_in(metric_names)


def check_axis(axis: CostAxis, rows: Sequence[Any], experiment: str) -> None:
    """Refuse an axis that no configuration has a value on, naming what there is."""
    if any(math.isfinite(axis.value(r)) for r in rows):
        return
    if axis.is_latency:
        found = targets(rows)
        raise AblateError(f"--cost {axis.name}: no configuration of {experiment!r} has a latency measured on "
                          f"{axis.target!r} (allowed: "
                          + (", ".join(f"latency:{t}" for t in found) if found else "none measured yet")
                          + "; measure with `ablate latency SPEC`, which prints its target)")
    raise AblateError(f"--cost {axis.name}: no finished run of {experiment!r} recorded {axis.metric} "
                      "(allowed: macs, params, or latency:<target> after `ablate latency SPEC`)")


# ---------------------------------------------------------------- table columns


def _ms(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:.3g}"


def table_columns(rows: Sequence[Any], axis: CostAxis) -> tuple[list[str], list[list[str]]]:
    """Markdown columns for the measured latencies: each target's median and IQR, ms per image;
    one list of cells per row (the training cost, device-hours included, is the report's own)."""
    header, cells = [], [[] for _ in rows]
    for t in targets(rows):
        header.append(f"latency {t} (ms)")
        for line, r in zip(cells, rows):
            mid = measured(r, latency.metric(latency.LATENCY, t))
            lo, hi = (measured(r, latency.metric(p, t)) for p in (latency.LATENCY_P25, latency.LATENCY_P75))
            line.append(_ms(mid) + (f" ({_ms(lo)}–{_ms(hi)})" if math.isfinite(mid) and math.isfinite(lo) else ""))
    return header, cells


def csv_columns(rows: Sequence[Any], axis: CostAxis) -> tuple[list[str], list[list[str]]]:
    """CSV columns: every measured metric of every latency target, unrounded."""
    header = [latency.metric(p, t) for t in targets(rows) for p in latency.METRICS]
    cells = []
    for r in rows:
        values = [measured(r, m) for m in header]
        cells.append(["" if not math.isfinite(v) else format(v, ".6g") for v in values])
    return header, cells


# ---------------------------------------------------------------- how far MACs predict latency


@dataclass
class Correlation:
    """Spearman's rank correlation between MACs and a measured latency over configurations."""
    target: str
    rho: float
    p: float
    n: int

    def text(self) -> str:
        if self.n < 3 or not math.isfinite(self.rho):
            return (f"Spearman rank correlation of MACs and latency on {self.target}: not defined "
                    f"({self.n} configuration{'s' * (self.n != 1)} with both"
                    + (", or one of them constant" if self.n >= 3 else "") + ")")
        return (f"Spearman rank correlation of MACs and latency on {self.target}: ρ = {self.rho:.2f} "
                f"(p = {self.p:.2g}, {self.n} configurations)")

    def short(self) -> str:
        """``Spearman ρ = 0.43 (p = 0.39, 6 configurations)``, for a figure's subtitle."""
        if self.n < 3 or not math.isfinite(self.rho):
            return f"Spearman ρ not defined ({self.n} configurations)"
        return f"Spearman ρ = {self.rho:.2f} (p = {self.p:.2g}, {self.n} configurations)"


def correlation(rows: Sequence[Any], axis: CostAxis) -> Correlation:
    xs, ys = pairs(rows, axis)
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return Correlation(axis.target or "", math.nan, math.nan, len(xs))
    from scipy.stats import spearmanr  # lazy: 0.7 s to import; only a latency axis's correlation needs it
    result = spearmanr(xs, ys)
    return Correlation(axis.target or "", float(result.statistic), float(result.pvalue), len(xs))


def pairs(rows: Sequence[Any], axis: CostAxis) -> tuple[list[float], list[float]]:
    """(MACs, latency) of the rows that have both."""
    xs, ys = [], []
    for r in rows:
        x, y = r.mean("macs"), axis.value(r)
        if math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0:
            xs.append(x)
            ys.append(y)
    return xs, ys
