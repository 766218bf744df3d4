"""A search's figures: the Pareto front of its trials and its optimization history."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ablate.plots.cost import dodge
from ablate.plots.style import (FRONT_COLOR, Encoding, figure, finite, legend_outside, log_axis_at, metric_axis,
                                save, titled, whole_numbers)


def _better(direction: str, horizontal: bool) -> str:
    if horizontal:
        return "→ better" if direction == "maximize" else "← better"
    return "↑ better" if direction == "maximize" else "↓ better"


def plot_pareto(values: Sequence[Sequence[float]], settings: Sequence[Mapping[str, str]], front: Sequence[int],
                objectives: Sequence[tuple[str, str]], encoding: Encoding, folder: Path, stem: str, *,
                title: str, subtitle: str) -> list[str]:
    """:func:`pareto_figure` as ``stem.png`` and ``stem.svg`` in ``folder``; returns their names."""
    return save(pareto_figure(values, settings, front, objectives, encoding, title=title, subtitle=subtitle),
                folder, stem)


def pareto_figure(values: Sequence[Sequence[float]], settings: Sequence[Mapping[str, str]], front: Sequence[int],
                  objectives: Sequence[tuple[str, str]], encoding: Encoding, *, title: str, subtitle: str) -> Figure:
    """Objective 1 against objective 2 for every complete trial, colour and marker from
    ``encoding``; the front's trials ringed and joined by a dashed line. No per-point text:
    the report's table names the front's trials."""
    (m1, d1), (m2, d2) = objectives[:2]
    l1, s1 = metric_axis(m1, [v[0] for v in values])
    l2, s2 = metric_axis(m2, [v[1] for v in values])
    fig = figure()
    ax = fig.add_subplot()
    ok = [i for i, v in enumerate(values) if finite(v[0], v[1])]
    log_x = m2 in ("macs", "flops") and ok and all(values[i][1] > 0 for i in ok)
    # trials of equal cost and equal top-1 (a repeated configuration, a tiny rehearsal) would hide each other
    shift = dodge([values[i][1] for i in ok], [settings[i] for i in ok], encoding,
                  ys=[values[i][0] for i in ok]) if log_x else [1.0] * len(ok)
    factor = dict(zip(ok, shift))
    for i, f in factor.items():
        ax.plot([values[i][1] / s2 * f], [values[i][0] / s1], linestyle="none", marker=encoding.marker(settings[i]),
                ms=6, color=encoding.colour(settings[i]), alpha=0.85, zorder=3)
    on_front = [i for i in front if i in ok]
    fx = [values[i][1] / s2 * factor[i] for i in on_front]
    fy = [values[i][0] / s1 for i in on_front]
    ax.scatter(fx, fy, s=150, facecolors="none", edgecolors=FRONT_COLOR, lw=1.2, zorder=2)
    if on_front:
        order = sorted(range(len(fx)), key=lambda k: fx[k], reverse=(d2 == "maximize"))
        ax.plot([fx[k] for k in order], [fy[k] for k in order], color=FRONT_COLOR, ls="--", lw=1, zorder=1)
    handles = encoding.handles() + [Line2D([], [], color=FRONT_COLOR, ls="--", marker="o", ms=11,
                                           markerfacecolor="none", label="Pareto front")]
    legend_outside(fig, handles)
    if log_x:
        log_axis_at(ax, [values[i][1] / s2 for i in ok])
    else:
        ax.margins(x=0.08)
    ax.margins(y=0.08)
    ax.set_xlabel(f"{l2} per image (log scale), {_better(d2, True)}" if m2 in ("macs", "flops")
                  else f"{l2}, {_better(d2, True)}")
    ax.set_ylabel(f"{l1}, {_better(d1, False)}")
    titled(fig, title, subtitle)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def plot_history(values: Sequence[Sequence[float]], trial_numbers: Sequence[int],
                 settings: Sequence[Mapping[str, str]], objectives: Sequence[tuple[str, str]],
                 encoding: Encoding, folder: Path, stem: str, *, title: str, subtitle: str) -> list[str]:
    """:func:`history_figure` as ``stem.png`` and ``stem.svg`` in ``folder``; returns their names."""
    return save(history_figure(values, trial_numbers, settings, objectives, encoding, title=title,
                               subtitle=subtitle), folder, stem)


def history_figure(values: Sequence[Sequence[float]], trial_numbers: Sequence[int],
                   settings: Sequence[Mapping[str, str]], objectives: Sequence[tuple[str, str]],
                   encoding: Encoding, *, title: str, subtitle: str) -> Figure:
    """Optimization history: each objective per trial number (colour and marker from
    ``encoding``) with its best-so-far staircase, one panel per objective."""
    fig = figure(7.5, 2.3 * len(objectives) + 1.0)
    axes = fig.subplots(len(objectives), 1, sharex=True, squeeze=False)[:, 0]
    order = sorted(range(len(trial_numbers)), key=lambda i: trial_numbers[i])
    for k, ((metric, direction), ax) in enumerate(zip(objectives, axes)):
        label, scale = metric_axis(metric, [v[k] for v in values])
        shown = [i for i in order if finite(values[i][k])]
        for i in shown:
            ax.plot([trial_numbers[i]], [values[i][k] / scale], linestyle="none", marker=encoding.marker(settings[i]),
                    ms=5, color=encoding.colour(settings[i]), alpha=0.85)
        best, line = None, []
        for i in shown:
            y = values[i][k] / scale
            best = y if best is None else (max(best, y) if direction == "maximize" else min(best, y))
            line.append(best)
        ax.step([trial_numbers[i] for i in shown], line, where="post", color=FRONT_COLOR, lw=1.4)
        ax.set_ylabel(f"{label}\n({direction})", fontsize=9)
        if metric in ("macs", "flops") and shown and all(values[i][k] > 0 for i in shown):
            log_axis_at(ax, [values[i][k] / scale for i in shown], axis="y")
        ax.grid(True, alpha=0.3)
    handles = encoding.handles() + [Line2D([], [], color=FRONT_COLOR, lw=1.4, label="best so far")]
    legend_outside(fig, handles)
    axes[-1].set_xlabel("trial number")
    whole_numbers(axes[-1].xaxis)
    titled(fig, title, subtitle)
    return fig
