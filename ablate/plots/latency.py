"""How far MACs predict a measured latency: one point per configuration, both axes logarithmic."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from ablate.plots.cost import dodge
from ablate.plots.style import Encoding, figure, finite, legend_outside, log_axis_at, macs_label, save, titled
from ablate.units import count_unit


@dataclass
class LatencyPoint:
    """One configuration: its settings (colour and marker), MACs per image, and its measured
    latency per image in ms: the median and the 25th and 75th percentiles."""
    settings: dict[str, str]
    macs: float
    latency_ms: float
    p25_ms: float
    p75_ms: float


def plot_macs_vs_latency(points: Sequence[LatencyPoint], encoding: Encoding, folder: Path, stem: str, *,
                         target: str, title: str, subtitle: str) -> list[str]:
    """:func:`macs_vs_latency_figure` as ``stem.png`` and ``stem.svg`` in ``folder``; returns their names."""
    return save(macs_vs_latency_figure(points, encoding, target=target, title=title, subtitle=subtitle),
                folder, stem)


def macs_vs_latency_figure(points: Sequence[LatencyPoint], encoding: Encoding, *, target: str, title: str,
                           subtitle: str) -> Figure:
    """Measured latency (median, bars from the 25th to the 75th percentile) against MACs, colour
    and marker from ``encoding``. Were MACs a perfect predictor, the points would rise
    monotonically from left to right; the subtitle's rank correlation says how far they do.
    Configurations of equal MACs (shift patterns) are spread a little sideways."""
    ok = [p for p in points if finite(p.macs, p.latency_ms) and p.macs > 0 and p.latency_ms > 0]
    prefix, divisor = count_unit([p.macs for p in ok])
    fig = figure()
    ax = fig.add_subplot()
    if not ok:
        ax.text(0.5, 0.5, "no configuration has both MACs and a latency", ha="center", va="center",
                transform=ax.transAxes)
    factors = dodge([p.macs for p in ok], [p.settings for p in ok], encoding) if ok else []
    for p, k in zip(ok, factors):
        colour = encoding.colour(p.settings)
        low = p.latency_ms - p.p25_ms if finite(p.p25_ms) else 0.0
        high = p.p75_ms - p.latency_ms if finite(p.p75_ms) else 0.0
        ax.errorbar([p.macs / divisor * k], [p.latency_ms], yerr=[[max(low, 0.0)], [max(high, 0.0)]],
                    fmt=encoding.marker(p.settings), ms=7, color=colour, ecolor=colour, elinewidth=1.2, capsize=3,
                    alpha=0.9, zorder=3)
    if ok:
        log_axis_at(ax, [p.macs / divisor for p in ok])
        log_axis_at(ax, [p.latency_ms for p in ok], axis="y",
                    also=[v for p in ok for v in (p.p25_ms, p.p75_ms) if finite(v) and v > 0])
    legend_outside(fig, encoding.handles())
    ax.set_xlabel(macs_label(prefix))
    ax.set_ylabel("latency, ms per image (median, IQR; log scale)")
    titled(fig, title, subtitle)
    ax.grid(True, which="major", alpha=0.3)
    return fig
