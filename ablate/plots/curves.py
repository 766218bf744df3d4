"""Learning curves: validation top-1 and training loss against epoch, one line per configuration
(the mean over its seeds) with a band of ± one sample std where there are several seeds; where
the runs measured it, top-1 on the fixed training subset (``train_top1``) beside validation's,
dashed in the same colour, so the train - val gap reads off the first panel."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ablate import names
from ablate.plots.style import Encoding, figure, finite, legend_outside, save, titled, whole_numbers

#: the panels, left to right: (metric, axis label)
PANELS = ((names.VAL_TOP1, "top-1 (%), validation"), (names.TRAIN_LOSS, "training loss"))
#: the first panel's label when training top-1 is drawn in it too
BOTH_TOP1 = "top-1 (%): validation, training dashed"
#: how a training top-1 line differs from its configuration's validation line: dashed, thinner, no markers
TRAIN_STYLE = dict(ls=(0, (4, 2)), lw=1.0, alpha=0.8)


@dataclass
class Curves:
    """One configuration's per-epoch metrics: metric -> one {epoch: value} per seed."""
    settings: dict[str, str]
    history: Mapping[str, Sequence[Mapping[int, float]]]


def mean_band(per_seed: Sequence[Mapping[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Epochs every seed reached, the mean and the sample std (0 with one seed) at each."""
    if not per_seed:
        return [], [], []
    epochs = sorted(set.intersection(*(set(h) for h in per_seed)))
    means, stds = [], []
    for e in epochs:
        xs = [h[e] for h in per_seed if finite(h[e])]
        means.append(statistics.fmean(xs) if xs else float("nan"))
        stds.append(statistics.stdev(xs) if len(xs) > 1 else 0.0)
    return epochs, means, stds


def plot_learning_curves(curves: Sequence[Curves], encoding: Encoding, folder: Path, stem: str, *,
                         title: str, subtitle: str) -> list[str]:
    """:func:`learning_curves_figure` as ``stem.png`` and ``stem.svg`` in ``folder``; returns their names."""
    return save(learning_curves_figure(curves, encoding, title=title, subtitle=subtitle), folder, stem)


def learning_curves_figure(curves: Sequence[Curves], encoding: Encoding, *, title: str, subtitle: str) -> Figure:
    """Two panels (validation top-1, training loss) against epoch; colour, marker and line style
    from ``encoding``; one legend outside the axes."""
    fig = figure(10.0, 4.2)
    axes = fig.subplots(1, len(PANELS), sharex=True)
    train_drawn = False
    for ax, (metric, label) in zip(axes, PANELS):
        for c in curves:
            epochs, mean, std = mean_band(c.history.get(metric, []))
            if not epochs:
                continue
            colour = encoding.colour(c.settings)
            ax.plot(epochs, mean, color=colour, ls=encoding.linestyle(c.settings), marker=encoding.marker(c.settings),
                    ms=4, markevery=max(1, len(epochs) // 6), lw=1.4)
            if any(std):
                ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=colour, alpha=0.12, lw=0)
            if metric == names.VAL_TOP1:
                train_epochs, train_mean, _ = mean_band(c.history.get(names.TRAIN_TOP1, []))
                if train_epochs:
                    ax.plot(train_epochs, train_mean, color=colour, **TRAIN_STYLE)
                    train_drawn = True
        ax.set_xlabel("epoch")
        whole_numbers(ax.xaxis)
        ax.set_ylabel(BOTH_TOP1 if metric == names.VAL_TOP1 and train_drawn else label)
        ax.grid(True, alpha=0.3)
    if curves and not any(c.history.get(m) for c in curves for m, _ in PANELS):
        axes[0].text(0.5, 0.5, "no per-epoch metrics recorded", ha="center", va="center",
                     transform=axes[0].transAxes)
    handles = encoding.handles(lines=True)
    if train_drawn:
        handles += [Line2D([], [], color="0.3", lw=1.4, label="top-1, validation"),
                    Line2D([], [], color="0.3", **TRAIN_STYLE, label="top-1, training subset (eval mode)")]
    legend_outside(fig, handles)
    titled(fig, title, subtitle)
    return fig
