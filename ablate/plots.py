"""The report's figures: accuracy against cost, a search's Pareto front and its history.

Figures are drawn on matplotlib's Agg canvas directly (no ``pyplot``), so drawing needs no
display and leaves no global figure state behind in the calling process.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ablate.pareto import pareto_front
from ablate.units import count_unit

FRONT_COLOR = "tab:red"


def _figure(width: float = 7.0, height: float = 4.8) -> Figure:
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _plain_log_x(ax) -> None:
    """Log x axis with plain numbers (0.5, 2) rather than 5×10⁻¹ on the short ranges of a grid."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(v: float, _) -> str:  # where few decades leave room: label 2, 3 and 5 (x 10^n)
        lo, hi = ax.get_xlim()
        mantissa = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
        return f"{v:g}" if lo > 0 and math.log10(hi / lo) < 1.2 and mantissa in (2, 3, 5) else ""

    ax.xaxis.set_minor_formatter(FuncFormatter(minor))


def _step_front(ax, xs: Sequence[float], ys: Sequence[float]) -> None:
    """Draw a front as a staircase from the cheapest point on: between two front points the
    best accuracy reachable at a given cost is the cheaper point's."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    ax.step([xs[i] for i in order], [ys[i] for i in order], where="post", color=FRONT_COLOR,
            lw=1.5, alpha=0.8, zorder=1)


def plot_top1_vs_macs(macs: Sequence[float | None], top1: Sequence[float | None],
                      top1_std: Sequence[float | None], labels: Sequence[str], path: Path, *,
                      title: str) -> None:
    """Top-1 (%) against MACs per image on a log axis, one point per configuration with its
    seed spread as an error bar, the labels beside the points and the Pareto front (max
    top-1, min MACs) ringed and joined by a step line. Configurations without both numbers
    are left out."""
    keep = [i for i in range(len(labels)) if _finite(macs[i], top1[i]) and macs[i] > 0]
    prefix, divisor = count_unit([macs[i] for i in keep])
    fig = _figure()
    ax = fig.add_subplot()
    if not keep:
        ax.text(0.5, 0.5, "no configuration has both top-1 and MACs", ha="center", va="center",
                transform=ax.transAxes)
    else:
        xs = [macs[i] / divisor for i in keep]
        ys = [top1[i] for i in keep]
        err = [top1_std[i] if _finite(top1_std[i]) else 0.0 for i in keep]
        ax.errorbar(xs, ys, yerr=err, fmt="o", ms=5, capsize=3, color="tab:blue",
                    ecolor="tab:gray", label="ours (mean ± std over seeds)", zorder=2)
        for x, y, i in zip(xs, ys, keep):
            ax.annotate(labels[i], (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
        front = pareto_front([(y, x) for x, y in zip(xs, ys)], ["maximize", "minimize"])
        fx, fy = [xs[i] for i in front], [ys[i] for i in front]
        ax.scatter(fx, fy, s=110, facecolors="none", edgecolors=FRONT_COLOR, lw=1.5,
                   label="Pareto front", zorder=3)
        _step_front(ax, fx, fy)
        _plain_log_x(ax)
        ax.margins(x=0.2, y=0.08)  # room for the labels of the outermost points
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(f"{prefix}MACs per image (log scale)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path)


def metric_axis(metric: str, values: Sequence[float | None] = ()) -> tuple[str, float]:
    """(label, divisor) for an objective: cost counts in a readable unit, other metrics as is."""
    if metric in ("macs", "flops"):
        prefix, divisor = count_unit(values or [1e9])
        return f"{prefix}{'MACs' if metric == 'macs' else 'FLOPs'}", divisor
    if metric.startswith("params"):
        prefix, divisor = count_unit(values or [1e6])
        return f"{metric} ({prefix})" if prefix else metric, divisor
    return metric, 1.0


def plot_pareto(values: Sequence[Sequence[float]], trial_numbers: Sequence[int], front: Sequence[int],
                objectives: Sequence[tuple[str, str]], path: Path, *, title: str) -> None:
    """Objective 1 against objective 2 for every complete trial, the front highlighted and
    labelled with its trial numbers."""
    (m1, d1), (m2, d2) = objectives[:2]
    (l1, s1) = metric_axis(m1, [v[0] for v in values])
    (l2, s2) = metric_axis(m2, [v[1] for v in values])
    fig = _figure()
    ax = fig.add_subplot()
    ok = [i for i, v in enumerate(values) if _finite(v[0], v[1])]
    ax.scatter([values[i][1] / s2 for i in ok], [values[i][0] / s1 for i in ok], s=18,
               color="tab:gray", alpha=0.6, label="trials", zorder=2)
    fx = [values[i][1] / s2 for i in front]
    fy = [values[i][0] / s1 for i in front]
    ax.scatter(fx, fy, s=36, color=FRONT_COLOR, label="Pareto front", zorder=3)
    labels: dict[tuple[float, float], list[str]] = {}  # equal trials share one label
    for x, y, i in zip(fx, fy, front):
        labels.setdefault((x, y), []).append(f"#{trial_numbers[i]}")
    for (x, y), names in labels.items():
        ax.annotate(", ".join(names), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    if front:
        order = sorted(range(len(fx)), key=lambda k: fx[k], reverse=(d2 == "maximize"))
        ax.plot([fx[k] for k in order], [fy[k] for k in order], color=FRONT_COLOR, lw=1, alpha=0.6)
    ax.set_xlabel(f"{l2} ({'→' if d2 == 'maximize' else '←'} better)")
    ax.set_ylabel(f"{l1} ({'↑' if d1 == 'maximize' else '↓'} better)")
    if m2 in ("macs", "flops") and ok and all(values[i][1] > 0 for i in ok):
        _plain_log_x(ax)
    ax.margins(x=0.1, y=0.08)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)


def plot_history(values: Sequence[Sequence[float]], trial_numbers: Sequence[int],
                 objectives: Sequence[tuple[str, str]], path: Path, *, title: str) -> None:
    """Optimization history: each objective per trial number with its best-so-far line
    (one panel per objective; for several objectives each line is that objective's best)."""
    fig = _figure(7.0, 2.6 * len(objectives) + 0.6)
    axes = fig.subplots(len(objectives), 1, sharex=True, squeeze=False)[:, 0]
    order = sorted(range(len(trial_numbers)), key=lambda i: trial_numbers[i])
    for k, ((metric, direction), ax) in enumerate(zip(objectives, axes)):
        label, scale = metric_axis(metric, [v[k] for v in values])
        xs = [trial_numbers[i] for i in order if _finite(values[i][k])]
        ys = [values[i][k] / scale for i in order if _finite(values[i][k])]
        ax.scatter(xs, ys, s=16, color="tab:blue", alpha=0.7, label="trial")
        best, best_line = None, []
        for y in ys:
            best = y if best is None else (max(best, y) if direction == "maximize" else min(best, y))
            best_line.append(best)
        ax.step(xs, best_line, where="post", color=FRONT_COLOR, lw=1.5, label="best so far")
        ax.set_ylabel(f"{label} ({direction})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("trial number")
    axes[0].set_title(title, fontsize=10)
    fig.savefig(path)
