"""Accuracy against cost: one point per configuration, the paper's rows beside ours."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ablate.pareto import pareto_front
from ablate.plots.style import (FRONT_COLOR, Encoding, figure, finite, legend_outside, log_axis_at, macs_label,
                                save, titled)
from ablate.units import count_unit


@dataclass
class ConfigPoint:
    """One configuration: its settings (for colour and marker), MACs per image, top-1 mean and
    sample std over seeds (NaN with one seed), and the paper's numbers where a reference row has them."""
    settings: dict[str, str]
    macs: float
    top1: float
    top1_std: float = math.nan
    paper_macs: Optional[float] = None
    paper_top1: Optional[float] = None


#: the sideways spread of configurations of equal MACs, in decades per configuration
DODGE = 0.018


def dodge(xs: Sequence[float], settings: Sequence[dict[str, str]], encoding: Encoding,
          ys: Optional[Sequence[float]] = None) -> list[float]:
    """A factor per point that spreads configurations of equal MACs (same patch size, other
    shift) a little sideways, in the order of the legend, so that none hides another; with
    ``ys``, only points equal in both (search trials of one cost differ in top-1 already)."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault((round(math.log10(x), 6), round(ys[i], 6) if ys is not None else None), []).append(i)
    order = {v: k for k, v in enumerate(encoding.colours)}
    factors = [1.0] * len(xs)
    for members in groups.values():
        members.sort(key=lambda i: (order.get(settings[i].get(encoding.colour_key or "", ""), 0), i))
        for rank, i in enumerate(members):
            factors[i] = 10 ** ((rank - (len(members) - 1) / 2) * DODGE)
    return factors


def step_front(ax, xs: Sequence[float], ys: Sequence[float], label: Optional[str] = None) -> None:
    """Draw a front as a staircase from the cheapest point on: between two front points the
    best accuracy reachable at a given cost is the cheaper point's."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    ax.step([xs[i] for i in order], [ys[i] for i in order], where="post", color=FRONT_COLOR,
            lw=1.2, ls="--", alpha=0.8, zorder=1, label=label)


#: (x-axis label, divisor) for the costs on the axis: another cost than MACs (``ablate report --cost``)
XLabel = Callable[[Sequence[float]], tuple[str, float]]


def plot_top1_vs_macs(points: Sequence[ConfigPoint], encoding: Encoding, folder: Path, stem: str, *,
                      title: str, subtitle: str, x_label: Optional[XLabel] = None) -> list[str]:
    """:func:`top1_vs_macs_figure` as ``stem.png`` and ``stem.svg`` in ``folder``; returns their names."""
    return save(top1_vs_macs_figure(points, encoding, title=title, subtitle=subtitle, x_label=x_label), folder, stem)


def top1_vs_macs_figure(points: Sequence[ConfigPoint], encoding: Encoding, *, title: str, subtitle: str,
                        x_label: Optional[XLabel] = None) -> Figure:
    """Top-1 (%) against MACs per image on a log axis ticked at the data's MACs, colour and
    marker from ``encoding``, ± std over seeds as error bars, the paper's rows as hollow
    markers, our Pareto front (max top-1, min MACs) as a dashed staircase; one legend outside
    the axes, no text on the points; configurations of equal MACs are spread a little sideways
    (:func:`dodge`). Configurations without both numbers are left out. With ``x_label``, the
    points' ``macs`` hold another cost (parameters, a measured latency), labelled by it.
    """
    ours = [p for p in points if finite(p.macs, p.top1) and p.macs > 0]
    paper = [p for p in points if finite(p.paper_top1) and finite(p.paper_macs or p.macs)
             and (p.paper_macs or p.macs) > 0]
    every_macs = [p.macs for p in ours] + [p.paper_macs or p.macs for p in paper]
    prefix, divisor = count_unit(every_macs)
    xlabel = macs_label(prefix)
    if x_label is not None:
        xlabel, divisor = x_label(every_macs)
    fig = figure()
    ax = fig.add_subplot()
    handles = encoding.handles()
    if not ours:
        ax.text(0.5, 0.5, f"no configuration has both top-1 and {'MACs' if x_label is None else 'this cost'}",
                ha="center", va="center",
                transform=ax.transAxes)
    for p, k in zip(ours, dodge([p.macs for p in ours], [p.settings for p in ours], encoding)):
        colour = encoding.colour(p.settings)
        ax.errorbar([p.macs / divisor * k], [p.top1], yerr=[p.top1_std if finite(p.top1_std) else 0.0],
                    fmt=encoding.marker(p.settings), ms=7, color=colour, ecolor=colour, elinewidth=1.2,
                    capsize=3, alpha=0.9, zorder=3)
    paper_xs = [p.paper_macs or p.macs for p in paper]
    for p, x, k in zip(paper, paper_xs, dodge(paper_xs, [p.settings for p in paper], encoding)):
        ax.plot([x / divisor * k], [p.paper_top1], linestyle="none",
                marker=encoding.marker(p.settings), ms=9, markerfacecolor="none", markeredgewidth=1.5,
                color=encoding.colour(p.settings), zorder=2)
    if paper:
        handles.append(Line2D([], [], linestyle="none", marker="o", ms=7, markerfacecolor="none",
                              color="0.3", label="paper (hollow)"))
    if ours:
        xs, ys = [p.macs / divisor for p in ours], [p.top1 for p in ours]
        front = pareto_front([(y, x) for x, y in zip(xs, ys)], ["maximize", "minimize"])
        if len(front) > 1:
            step_front(ax, [xs[i] for i in front], [ys[i] for i in front])
            handles.append(Line2D([], [], color=FRONT_COLOR, ls="--", label="Pareto front (ours)"))
        log_axis_at(ax, xs, also=[(p.paper_macs or p.macs) / divisor for p in paper])
        ax.margins(y=0.12)
    legend_outside(fig, handles)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%), validation")
    titled(fig, title, subtitle)
    ax.grid(True, which="major", alpha=0.3)
    return fig
