"""What every figure of a report shares: the canvas, the encoding of settings as colour and
marker, a log axis ticked at the data's own values, and saving as PNG and SVG.

Figures are drawn on matplotlib's Agg canvas directly (no ``pyplot``), so drawing needs no
display and leaves no global figure state behind in the calling process.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from matplotlib import rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import FuncFormatter, Locator, MaxNLocator, NullLocator

from ablate.text import param
from ablate.units import count_unit

FRONT_COLOR = "0.35"
#: Tableau's ten, then their light companions (tab20's second shades): Table 7 alone has 11
#: shift patterns, and a setting with more values than colours goes unencoded
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
           "tab:olive", "tab:cyan", "tab:gray",
           "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
           "#9edae5", "#c7c7c7")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
#: the space between two tick labels of a log axis, in multiples of the label font's size
TICK_GAP = 0.8
#: the widest share of the figure's width a legend beside the axes may take; a wider one goes below them
LEGEND_SHARE = 0.3
TITLE_SIZE = 9


def figure(width: float = 7.5, height: float = 4.6) -> Figure:
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def finite(*values: Optional[float]) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def short_name(key: str) -> str:
    """``model.patch_size`` -> ``patch_size``: the section is clear from the context."""
    return key.rsplit(".", 1)[-1]


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


@dataclass
class Encoding:
    """Which setting each point's colour and marker show, and the value -> colour/marker maps.

    Chosen from the settings that tell configurations apart: the model (``model.timm``) first,
    settings some configurations lack last, categorical settings (a shift pattern) before
    numbers, fewer values before more; a setting with more values than there
    are colours (or markers) is not encoded, and is named in ``unencoded``.
    """
    colour_key: Optional[str] = None
    marker_key: Optional[str] = None
    colours: dict[str, str] = field(default_factory=dict)
    markers: dict[str, str] = field(default_factory=dict)
    unencoded: list[str] = field(default_factory=list)

    @classmethod
    def choose(cls, settings: Sequence[Mapping[str, str]], keys: Sequence[str]) -> "Encoding":
        distinct = {k: list(dict.fromkeys(s.get(k, "") for s in settings)) for k in keys}
        candidates = [k for k in keys if len(distinct[k]) > 1]

        def rank(k: str):
            # which model (a timm baseline or S²-MLP) comes first, and a setting some rows do not
            # have ("-": a shift pattern beside other token mixers) after those every row has
            numeric = all(_number(v) is not None for v in distinct[k])
            return (k != "model.timm", "-" in distinct[k], numeric, len(distinct[k]), list(keys).index(k))

        enc = cls()
        for k in sorted(candidates, key=rank):
            values = distinct[k]
            if all(_number(v) is not None for v in values):
                values = sorted(values, key=_number)
            if enc.colour_key is None and len(values) <= len(COLOURS):
                enc.colour_key, enc.colours = k, dict(zip(values, COLOURS))
            elif enc.marker_key is None and len(values) <= len(MARKERS):
                enc.marker_key, enc.markers = k, dict(zip(values, MARKERS))
            else:
                enc.unencoded.append(k)
        return enc

    def colour(self, values: Mapping[str, str]) -> str:
        return self.colours.get(values.get(self.colour_key, ""), COLOURS[0]) if self.colour_key else COLOURS[0]

    def marker(self, values: Mapping[str, str]) -> str:
        return self.markers.get(values.get(self.marker_key, ""), MARKERS[0]) if self.marker_key else MARKERS[0]

    def linestyle(self, values: Mapping[str, str]) -> str:
        if not self.marker_key:
            return LINESTYLES[0]
        index = list(self.markers).index(values.get(self.marker_key, "")) if values.get(
            self.marker_key, "") in self.markers else 0
        return LINESTYLES[index % len(LINESTYLES)]

    def handles(self, lines: bool = False) -> list:
        """Legend entries: a colour swatch per value of the colour setting, a grey marker (and
        line style, for curves) per value of the marker setting."""
        out = []
        if self.colour_key:
            out += [Patch(facecolor=c, edgecolor=c, label=f"{short_name(self.colour_key)} = {param(v)}")
                    for v, c in self.colours.items()]
        if self.marker_key:
            for i, (v, m) in enumerate(self.markers.items()):
                out.append(Line2D([], [], color="0.3", marker=m, markersize=6,
                                  linestyle=LINESTYLES[i % len(LINESTYLES)] if lines else "none",
                                  label=f"{short_name(self.marker_key)} = {param(v)}"))
        return out

    def note(self) -> str:
        """What the legend cannot say: the settings that vary but are not encoded."""
        if not self.unencoded:
            return ""
        return "not encoded: " + ", ".join(short_name(k) for k in self.unencoded)


def log_axis_at(ax, values: Sequence[float], axis: str = "x", also: Sequence[float] = ()) -> None:
    """A log axis with ticks at the data's own ``values`` (as many as fit without their labels
    touching), written as plain numbers; no minor ticks. Its limits take in ``also`` too (the
    paper's points), which get ticks only where they lie beyond the data."""
    xs = sorted({v for v in values if finite(v) and v > 0})
    getattr(ax, f"set_{axis}scale")("log")
    target = ax.xaxis if axis == "x" else ax.yaxis
    if not xs:
        return
    extent = xs + [v for v in also if finite(v) and v > 0]
    lo, hi = min(extent), max(extent)
    span = math.log10(hi / lo) if hi > lo else 0.0
    pad = max(span * 0.12, 0.08)  # decades of room either side, for markers and error bars
    getattr(ax, f"set_{axis}lim")(lo / 10 ** pad, hi * 10 ** pad)
    beyond = sorted({v for v in also if finite(v) and v > 0 and not xs[0] <= v <= xs[-1]})
    target.set_major_locator(DataLocator(xs, beyond))
    target.set_major_formatter(FuncFormatter(lambda v, _: tick_text(v)))
    target.set_minor_locator(NullLocator())


class DataLocator(Locator):
    """Ticks of a log axis at the data's values, chosen when the axis is drawn: which labels fit
    apart depends on the axis's length in pixels, known only once the layout has placed it
    (a legend beside a narrow figure leaves less room than a share of the span suggests)."""

    def __init__(self, values: Sequence[float], beyond: Sequence[float] = ()):
        self.values, self.beyond = list(values), list(beyond)

    def __call__(self):
        lo, hi = self.axis.get_view_interval()
        return self.tick_values(lo, hi)

    def tick_values(self, vmin, vmax):
        lo, hi = sorted((vmin, vmax))
        if not (lo > 0 and hi > lo):
            return self.values[:1]
        is_x = self.axis.axis_name == "x"
        box = self.axis.axes.bbox
        length = max(box.width if is_x else box.height, 1.0)
        size = FontProperties(size=rcParams[f"{self.axis.axis_name}tick.labelsize"]).get_size_in_points()
        points_per_pixel = 72.0 / self.axis.figure.dpi

        def at(v: float) -> float:  # where a value lies along the axis, in points
            return math.log10(v / lo) / math.log10(hi / lo) * length * points_per_pixel

        def room(v: float) -> float:  # half a label's extent along the axis, in points
            return (0.62 * size * len(tick_text(v)) if is_x else size) / 2

        def apart(a: float, b: float) -> bool:
            a, b = sorted((a, b))
            return at(b) - at(a) >= room(a) + room(b) + TICK_GAP * size

        xs = self.values
        ticks = [xs[0]]
        for v in xs[1:]:
            if apart(ticks[-1], v):
                ticks.append(v)
        if ticks[-1] != xs[-1] and len(ticks) > 1 and apart(ticks[-2], xs[-1]):
            ticks[-1] = xs[-1]  # end on the largest value rather than next to it
        # the paper's points beyond our range (a shrunk rehearsal of a paper spec) get an end tick
        # each, else the axis would read one value across decades
        for v in self.beyond:
            if all(apart(t, v) for t in ticks):
                ticks = sorted(ticks + [v])
        return ticks


def whole_numbers(axis) -> None:
    """Ticks at whole numbers only: an axis of epochs or trial numbers has no epoch 2.5."""
    axis.set_major_locator(MaxNLocator(integer=True))
    axis.set_minor_locator(NullLocator())


def tick_text(v: float) -> str:
    """Three significant digits, without a trailing ``.0``: 6.31, 25.2, 1.5, 140."""
    text = f"{v:.3g}"
    return text if "e" not in text else f"{v:,.0f}"


def legend_outside(fig, handles: list, title: Optional[str] = None) -> None:
    """One legend for the figure, to the right of the axes, where it cannot cover a point; one
    wider than :data:`LEGEND_SHARE` of the figure (long setting values) goes below the axes
    instead, in as many columns as fit, and the figure grows by its height, so that the plot
    keeps its size either way."""
    if not handles:
        return
    style = dict(handles=handles, fontsize=8, title=title, title_fontsize=8, frameon=False)
    legend = fig.legend(loc="outside right upper", **style)
    renderer = fig.canvas.get_renderer()
    width = legend.get_window_extent(renderer).width
    if width <= LEGEND_SHARE * fig.bbox.width:
        return
    legend.remove()
    columns = max(1, min(len(handles), int(0.95 * fig.bbox.width // width)))
    legend = fig.legend(loc="outside lower center", ncols=columns, **style)
    fig.set_figheight(fig.get_figheight() + legend.get_window_extent(renderer).height / fig.dpi)


def titled(fig, title: str, subtitle: str) -> None:
    """The figure's title and subtitle at its top, over the plot beside a legend to the right
    (which starts at the figure's top too, so a title across the whole width would run into
    it), each wrapped to the width it has. Call after :func:`legend_outside`."""
    renderer = fig.canvas.get_renderer()
    beside = sum(leg.get_window_extent(renderer).width + TITLE_SIZE * fig.dpi / 72
                 for leg in fig.legends if getattr(leg, "_outside_loc", None) == "right")
    room = max(fig.bbox.width - beside, fig.bbox.width / 3)  # pixels
    chars = max(20, int(room * 72 / fig.dpi / (0.6 * TITLE_SIZE)))
    lines = [line for part in (title, subtitle) for line in textwrap.wrap(part, chars) or [""]]
    fig.suptitle("\n".join(lines), x=room / 2 / fig.bbox.width, fontsize=TITLE_SIZE)


def save(fig: Figure, folder: Path, stem: str) -> list[str]:
    """``stem.png`` and ``stem.svg`` in ``folder``; returns their names."""
    fig.savefig(folder / f"{stem}.png")
    fig.savefig(folder / f"{stem}.svg", metadata={"Date": None})  # no date: reruns differ only in data
    return [f"{stem}.png", f"{stem}.svg"]


def metric_axis(metric: str, values: Sequence[Optional[float]] = ()) -> tuple[str, float]:
    """(label, divisor) for an objective: cost counts in a readable unit, other metrics as is."""
    if metric in ("macs", "flops"):
        prefix, divisor = count_unit(values or [1e9])
        return f"{prefix}{'MACs' if metric == 'macs' else 'FLOPs'}", divisor
    if metric.startswith("params"):
        prefix, divisor = count_unit(values or [1e6])
        return f"{metric} ({prefix})" if prefix else metric, divisor
    if metric.startswith("latency:"):  # a search objective measured by ablate.latency
        return f"latency on {metric.split(':', 1)[1]} (ms per image)", 1.0
    return metric, 1.0


def macs_label(prefix: str) -> str:
    words = {"G": "10⁹", "M": "10⁶", "k": "10³"}
    unit = f"{prefix}MACs" if prefix else "MACs"
    return f"{unit} per image ({prefix} = {words[prefix]}; log scale)" if prefix in words else f"{unit} per image (log scale)"
