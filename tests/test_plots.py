"""The report's figures, checked as drawn: no text on top of other text, colour and marker
encode the varied settings, ticks at the data's MACs, the paper's rows hollow, one legend."""
from __future__ import annotations

import itertools
import math
import random

import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.text import Text

from ablate.plots import (ConfigPoint, Curves, Encoding, history_figure, learning_curves_figure, mean_band,
                          pareto_figure, plot_top1_vs_macs, top1_vs_macs_figure)
from ablate.plots.style import figure, log_axis_at

SHIFT, PATCH = "model.shift", "model.patch_size"
KEYS = [SHIFT, PATCH]


def drawn_texts(fig: Figure) -> list[Text]:
    """Every non-empty text the figure draws: titles, axis labels, legend entries, annotations,
    and the tick labels of ticks inside the axis limits (matplotlib keeps others, undrawn)."""
    fig.canvas.draw()
    ticks, shown = set(), []
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = min(lo, hi), max(lo, hi)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks.update(map(id, (tick.label1, tick.label2)))
                if lo <= tick.get_loc() <= hi:
                    shown += [t for t in (tick.label1, tick.label2) if t.get_visible()]
    for t in fig.findobj(Text):
        if id(t) not in ticks and t.get_visible():
            shown.append(t)
    return [t for t in shown if t.get_text().strip()]


def overlapping(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose boxes intersect (by more than half a pixel)."""
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer).expanded(1.0, 1.0).padded(-0.5)) for t in drawn_texts(fig)]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


def quickstart_points(paper: bool = False) -> list[ConfigPoint]:
    """The quickstart grid's shape: shift none/four/eight x patch 2/4, MACs per patch size."""
    points = []
    for shift, top1 in (("none", 80.0), ("four", 95.0), ("eight", 95.5)):
        for patch, macs in (("2", 6.31e6), ("4", 1.58e6)):
            p = ConfigPoint({SHIFT: shift, PATCH: patch}, macs, top1 - (3.0 if patch == "4" else 0.0), 0.8)
            if paper:
                p.paper_macs, p.paper_top1 = macs * 1.1, p.top1 + 1.5
            points.append(p)
    return points


def marks(fig: Figure) -> list[dict]:
    """The markers drawn on the first axes: position, face and edge colour, marker."""
    out = []
    for line in fig.axes[0].get_lines():
        if line.get_marker() in ("None", None, "", "_", "|") or len(line.get_xdata()) != 1:  # not error-bar caps
            continue
        out.append({"xy": (float(line.get_xdata()[0]), float(line.get_ydata()[0])), "marker": line.get_marker(),
                    "edge": to_rgba(line.get_markeredgecolor()), "face": line.get_markerfacecolor()})
    return out


# ---------------------------------------------------------------- the overlap check itself


def test_the_overlap_check_finds_text_drawn_on_text():
    fig = figure()
    ax = fig.add_subplot()
    ax.plot([1, 2, 100], [1, 1.01, 5], "o")  # two points close together on the axes' scale
    ax.annotate("shift=four, patch=2", (1, 1), xytext=(4, 4), textcoords="offset points")
    ax.annotate("shift=eight, patch=2", (2, 1.01), xytext=(4, 4), textcoords="offset points")
    assert ("shift=four, patch=2", "shift=eight, patch=2") in overlapping(fig)


# ---------------------------------------------------------------- top-1 against MACs


def test_top1_vs_macs_has_no_overlapping_text_and_ticks_at_the_data():
    points = quickstart_points(paper=True)
    fig = top1_vs_macs_figure(points, Encoding.choose([p.settings for p in points], KEYS),
                              title="quickstart: top-1 against MACs",
                              subtitle="digits, 12 epochs, top-1 on the validation split, ± std over 3 seeds")
    assert overlapping(fig) == []
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [round(t, 4) for t in ax.get_xticks()] == [1.58, 6.31]  # our MACs, in MMACs
    lo, hi = ax.get_xlim()
    assert lo < 1.58 and hi > 6.941  # the paper's points are inside
    assert "MMACs per image" in ax.get_xlabel()  # the unit the ticks are in
    title = " ".join(fig.get_suptitle().split())  # the figure's title, wrapped to the width beside the legend
    assert "digits" in title and "12 epochs" in title and "validation" in title
    # one legend, outside the axes, and no text on the points
    assert len(fig.legends) == 1 and ax.get_legend() is None and len(ax.texts) == 0


def test_colour_encodes_the_shift_and_marker_the_patch_size():
    points = quickstart_points()
    enc = Encoding.choose([p.settings for p in points], KEYS)
    assert (enc.colour_key, enc.marker_key) == (SHIFT, PATCH)  # the categorical setting gets the colour
    fig = top1_vs_macs_figure(points, enc, title="t", subtitle="s")
    drawn = {m["xy"][1]: m for m in marks(fig)}  # the top-1 values are distinct
    assert len(drawn) == len(points)
    by_point = [(p.settings, drawn[p.top1]) for p in points]
    for (s1, m1), (s2, m2) in itertools.combinations(by_point, 2):
        assert (m1["edge"] == m2["edge"]) == (s1[SHIFT] == s2[SHIFT]), (s1, s2)
        assert (m1["marker"] == m2["marker"]) == (s1[PATCH] == s2[PATCH]), (s1, s2)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:5] == ["shift = none", "shift = four", "shift = eight", "patch_size = 2", "patch_size = 4"]


def test_paper_rows_are_hollow_markers_in_their_configuration_colour():
    points = quickstart_points(paper=True)
    enc = Encoding.choose([p.settings for p in points], KEYS)
    fig = top1_vs_macs_figure(points, enc, title="t", subtitle="s")
    hollow = [m for m in marks(fig) if m["face"] == "none"]
    assert len(hollow) == len(points)
    for p in points:
        m = next(m for m in hollow if m["xy"][1] == p.paper_top1)
        assert m["edge"] == to_rgba(enc.colour(p.settings)) and m["marker"] == enc.marker(p.settings)
    assert "paper (hollow)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_equal_macs_are_spread_sideways_in_legend_order_around_their_value():
    points = quickstart_points()
    enc = Encoding.choose([p.settings for p in points], KEYS)
    fig = top1_vs_macs_figure(points, enc, title="t", subtitle="s")
    xs = {m["xy"][1]: m["xy"][0] for m in marks(fig)}
    for patch, macs in (("2", 6.31), ("4", 1.58)):
        row = [xs[p.top1] for p in points if p.settings[PATCH] == patch]  # none, four, eight
        assert row == sorted(row) and len(set(row)) == 3
        assert math.prod(row) ** (1 / 3) == pytest.approx(macs)  # centred on the value, on the log axis


def test_error_bars_are_the_seed_spread():
    points = quickstart_points()
    fig = top1_vs_macs_figure(points, Encoding.choose([p.settings for p in points], KEYS), title="t", subtitle="s")
    spans = sorted(round(seg[1][1] - seg[0][1], 6) for c in fig.axes[0].collections
                   if type(c).__name__ == "LineCollection" for seg in c.get_segments())
    assert spans == [1.6] * len(points)  # ± 0.8


def test_many_configurations_keep_their_ticks_apart(tmp_path):
    rng = random.Random(0)
    points = [ConfigPoint({SHIFT: rng.choice(["none", "four", "eight"]), PATCH: rng.choice(["2", "4"]),
                           "model.width": str(w), "train.lr": f"{rng.uniform(5e-4, 5e-3):.5g}"},
                          macs=w * rng.uniform(0.5e5, 2e5), top1=rng.uniform(60, 98), top1_std=math.nan)
              for w in range(16, 112, 2)]
    keys = [SHIFT, PATCH, "model.width", "train.lr"]
    enc = Encoding.choose([p.settings for p in points], keys)
    assert enc.unencoded == ["model.width", "train.lr"]  # more values than colours or markers
    fig = top1_vs_macs_figure(points, enc, title="search: top-1 against MACs", subtitle=f"digits; {enc.note()}")
    assert overlapping(fig) == []
    assert 3 <= len(fig.axes[0].get_xticks()) < len(points)
    files = plot_top1_vs_macs(points, enc, tmp_path, "top1_vs_macs", title="t", subtitle="s")
    assert files == ["top1_vs_macs.png", "top1_vs_macs.svg"]
    assert (tmp_path / "top1_vs_macs.png").read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in (tmp_path / "top1_vs_macs.svg").read_text()


# ---------------------------------------------------------------- learning curves


def test_learning_curves_mean_and_band_over_seeds():
    assert mean_band([{1: 10.0, 2: 20.0}, {1: 12.0, 2: 22.0, 3: 30.0}]) == ([1, 2], [11.0, 21.0],
                                                                            [pytest.approx(math.sqrt(2))] * 2)
    curves = []
    for shift, base in (("none", 60.0), ("four", 80.0), ("eight", 82.0)):
        for patch in ("2", "4"):
            seeds = 1 if (shift, patch) == ("none", "4") else 3
            curves.append(Curves({SHIFT: shift, PATCH: patch}, {
                "val_top1": [{e: base - 30 / e + s for e in range(1, 13)} for s in range(seeds)],
                "train_loss": [{e: 2.3 / e + 0.01 * s for e in range(1, 13)} for s in range(seeds)]}))
    enc = Encoding.choose([c.settings for c in curves], KEYS)
    fig = learning_curves_figure(curves, enc, title="quickstart: learning curves, mean ± std over seeds",
                                 subtitle="digits, 12 epochs, top-1 on the validation split, ± std over 1–3 seeds")
    assert overlapping(fig) == []
    top1_ax, loss_ax = fig.axes
    assert len(top1_ax.get_lines()) == len(loss_ax.get_lines()) == 6
    bands = [c for c in top1_ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 5  # one per configuration with several seeds
    for curve, line in zip(curves, top1_ax.get_lines()):
        assert to_rgba(line.get_color()) == to_rgba(enc.colour(curve.settings))
        assert line.get_marker() == enc.marker(curve.settings)
        assert list(line.get_xdata()) == list(range(1, 13))
    assert len(fig.legends) == 1 and top1_ax.get_xlabel() == "epoch" and "loss" in loss_ax.get_ylabel()



def test_training_top1_is_dashed_beside_validation_in_the_same_colour_where_measured():
    curves = []
    for shift, base in (("none", 60.0), ("four", 80.0), ("eight", 82.0)):
        for patch, worse in (("2", 0.0), ("4", 3.0)):
            base -= worse
            history = {"val_top1": [{e: base - 30 / e + s for e in range(1, 7)} for s in range(2)],
                       "train_loss": [{e: 2.3 / e for e in range(1, 7)} for _ in range(2)]}
            if shift != "none":  # "none" was recorded before train_top1 was measured
                history["train_top1"] = [{e: base + 5 - 30 / e + s for e in range(1, 7)} for s in range(2)]
            curves.append(Curves({SHIFT: shift, PATCH: patch}, history))
    enc = Encoding.choose([c.settings for c in curves], KEYS)
    fig = learning_curves_figure(curves, enc, title="t", subtitle="s")
    assert overlapping(fig) == []
    top1_ax, loss_ax = fig.axes
    lines = top1_ax.get_lines()
    assert len(lines) == 6 + 4 and len(loss_ax.get_lines()) == 6
    train = [line for line in lines if line.get_marker() in ("None", None, "")]
    assert len(train) == 4
    for curve in curves[2:]:
        val = next(line for line in lines if line.get_marker() == enc.marker(curve.settings)
                   and to_rgba(line.get_color()) == to_rgba(enc.colour(curve.settings)))
        dashed = [line for line in train if to_rgba(line.get_color()) == to_rgba(val.get_color())
                  and line.get_ydata()[-1] == pytest.approx(val.get_ydata()[-1] + 5)]
        assert len(dashed) == 1 and dashed[0].get_linestyle() == "--"
        assert list(dashed[0].get_xdata()) == list(val.get_xdata())
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "top-1, training subset (eval mode)" in labels and "top-1, validation" in labels
    assert "training" in top1_ax.get_ylabel()
    # runs without train_top1 draw as before: no dashed line, no legend entry for it
    old = learning_curves_figure(curves[:2], enc, title="t", subtitle="s")
    assert len(old.axes[0].get_lines()) == 2 and old.axes[0].get_ylabel() == "top-1 (%), validation"
    assert not any("training subset" in t.get_text() for t in old.legends[0].get_texts())


# ---------------------------------------------------------------- a search


def _search(n: int = 40):
    rng = random.Random(1)
    settings, values = [], []
    for _ in range(n):
        s = {SHIFT: rng.choice(["none", "four", "eight"]), PATCH: rng.choice(["2", "4"]),
             "model.width": str(rng.choice(range(16, 97, 16))), "model.depth": str(rng.randint(1, 4))}
        macs = int(s["model.width"]) ** 2 * int(s["model.depth"]) * (64 if s[PATCH] == "2" else 16) * 4.0
        settings.append(s)
        values.append([rng.uniform(50, 98), macs])
    from ablate.pareto import pareto_front
    return settings, values, pareto_front(values, ["maximize", "minimize"])


def test_pareto_and_history_have_no_overlapping_text_and_encode_the_settings():
    settings, values, front = _search()
    keys = [SHIFT, PATCH, "model.width", "model.depth"]
    enc = Encoding.choose(settings, keys)
    assert (enc.colour_key, enc.marker_key) == (SHIFT, PATCH)
    objectives = [("val_top1", "maximize"), ("macs", "minimize")]
    fig = pareto_figure(values, settings, front, objectives, enc, title="search: Pareto front of 40 trials",
                        subtitle="digits, 8 epochs, top-1 on the validation split; not encoded: width, depth")
    assert overlapping(fig) == []
    assert len(fig.axes[0].texts) == 0 and len(fig.legends) == 1
    colour_of = {m["xy"]: m["edge"] for m in marks(fig)}  # the search's plot is not dodged
    for s, v in zip(settings, values):
        assert colour_of[(v[1] / 1e6, v[0])] == to_rgba(enc.colour(s))
    fig = history_figure(values, list(range(len(values))), settings, objectives, enc,
                         title="search: optimization history", subtitle="digits, 8 epochs")
    assert overlapping(fig) == []


def test_table_7s_eleven_shift_patterns_get_eleven_colours():
    patterns = ["four", "eight", "up_right", "left_down", "up_down", "left_right", "up", "down", "left", "right", "none"]
    enc = Encoding.choose([{SHIFT: p} for p in patterns], [SHIFT])
    assert enc.colour_key == SHIFT and not enc.unencoded
    assert len({enc.colour({SHIFT: p}) for p in patterns}) == len(patterns)


def test_paper_points_beyond_the_data_get_a_tick():
    fig = figure()
    ax = fig.add_subplot()
    log_axis_at(ax, [0.0257e9], also=[14.0e9, 14.1e9])
    ticks = list(ax.get_xticks())
    assert ticks[0] == 0.0257e9 and any(abs(t - 14.0e9) < 0.2e9 for t in ticks) and len(ticks) == 2


def test_trials_equal_in_both_objectives_are_spread_apart_and_others_stay():
    settings = [{SHIFT: "none"}, {SHIFT: "four"}, {SHIFT: "eight"}, {SHIFT: "four"}]
    values = [[1.0, 25.7e6], [1.0, 25.7e6], [3.0, 13.7e6], [2.0, 13.7e6]]
    enc = Encoding.choose(settings, [SHIFT])
    fig = pareto_figure(values, settings, [2], [("val_top1", "maximize"), ("macs", "minimize")], enc,
                        title="t", subtitle="s")
    xs = [line.get_xdata()[0] for line in fig.axes[0].lines if line.get_linestyle() == "None"]
    assert xs[0] != xs[1] and abs(math.log10(xs[0] / xs[1])) < 0.1  # apart, both near 25.7
    assert xs[2] == xs[3] == pytest.approx(13.7)  # equal cost, different top-1: left where they are


# ---------------------------------------------------------------- a long custom shift pattern

#: a custom pattern of twelve offsets, as a report reads it from MLflow (the param's JSON)
LONG = [[0, 1], [0, -1], [1, 0], [-1, 0], [1, 1], [-1, -1], [1, -1], [-1, 1], [0, 2], [2, 0], [0, -2], [-2, 0]]
LONG_TITLE = "a-grid-with-a-custom-shift-pattern-and-a-long-name: top-1 against MACs"
LONG_SUBTITLE = "digits, 8 epochs, top-1 on the validation split, mean ± std over 3 seeds; not encoded: width"


def _long_pattern_figures() -> dict[str, Figure]:
    """Each figure of a report whose grid has two named and two long custom shift patterns
    (the settings as the report has them: MLflow's param strings)."""
    from ablate.plots import macs_vs_latency_figure
    from ablate.plots.curves import Curves
    from ablate.plots.latency import LatencyPoint
    from ablate.tracking import param_text
    shifts = ["four", "eight", param_text(LONG), param_text(LONG[::-1])]
    settings = [{SHIFT: s, PATCH: p} for s in shifts for p in ("2", "4")]
    enc = Encoding.choose(settings, KEYS)
    points = [ConfigPoint(s, (0.784e6 if s[PATCH] == "2" else 1.68e6), 90.0 + i, 0.5) for i, s in enumerate(settings)]
    latency = [LatencyPoint(s, p.macs, 0.784 + 0.9 * i, 0.7 + 0.9 * i, 0.9 + 0.9 * i)
               for i, (s, p) in enumerate(zip(settings, points))]
    by_latency = [ConfigPoint(s, q.latency_ms, p.top1) for s, p, q in zip(settings, points, latency)]
    curves = [Curves(s, {"val_top1": [{1: 50.0 + i, 2: 60.0, 3: 70.0}], "train_loss": [{1: 2.0, 2: 1.0, 3: 0.5}]})
              for i, s in enumerate(settings)]
    values = [[90.0 + (i * 7) % 5, 1e6 * (1 + i / 8)] for i in range(len(settings))]
    objectives = [("val_top1", "maximize"), ("macs", "minimize")]
    kw = dict(title=LONG_TITLE, subtitle=LONG_SUBTITLE)
    return {
        "top1 vs MACs": top1_vs_macs_figure(points, enc, **kw),
        "top1 vs latency": top1_vs_macs_figure(by_latency, enc, **kw, x_label=lambda v: (
            "latency on cpu, ms per image (median; log scale)", 1.0)),
        "latency vs MACs": macs_vs_latency_figure(latency, enc, target="cpu", **kw),
        "learning curves": learning_curves_figure(curves, enc, **kw),
        "search history": history_figure(values, list(range(len(values))), settings, objectives, enc, **kw),
        "search Pareto": pareto_figure(values, settings, [0, 1], objectives, enc, **kw),
    }


def _shown_tick_labels(axis, limits) -> list[Text]:
    lo, hi = sorted(limits)
    return [t.label1 for t in axis.get_major_ticks()
            if lo <= t.get_loc() <= hi and t.label1.get_visible() and t.label1.get_text().strip()]


@pytest.mark.parametrize("name", ["top1 vs MACs", "top1 vs latency", "latency vs MACs", "learning curves",
                                  "search history", "search Pareto"])
def test_figures_of_a_long_custom_shift_pattern_stay_readable(name):
    fig = _long_pattern_figures()[name]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    plot = fig.axes[0].bbox.union([ax.bbox for ax in fig.axes])
    assert plot.width >= 0.6 * page.width, f"{name}: the axes keep {plot.width / page.width:.0%} of the width"
    [legend] = fig.legends
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(ax.bbox) for ax in fig.axes), f"{name}: the legend lies on the axes"
    assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0
    # the offsets are shown in their short notation, never as the stored JSON
    labels = [t.get_text() for t in legend.get_texts()]
    assert "shift = [+0+1 +0-1 +1+0 … -2+0] (12 offsets)" in labels and not any("[[" in s for s in labels)
    title = fig._suptitle if fig._suptitle is not None else fig.axes[0].title
    assert not title.get_window_extent(renderer).overlaps(box), f"{name}: the title runs into the legend"
    for ax in fig.axes:
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            shown = _shown_tick_labels(axis, limits)
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in shown]
            touching = [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]
            assert touching == [], f"{name}: tick labels run together: {touching}"
            label = axis.label
            if label.get_text() and label.get_visible():
                lb = label.get_window_extent(renderer)
                assert page.x0 - 1 <= lb.x0 and lb.x1 <= page.x1 + 1 and page.y0 - 1 <= lb.y0 and lb.y1 <= page.y1 + 1, \
                    f"{name}: the axis label {label.get_text()!r} is cut"
            if label.get_text() in ("epoch", "trial number"):
                ticks = [t.get_loc() for t in axis.get_major_ticks() if min(limits) <= t.get_loc() <= max(limits)]
                assert ticks and all(float(t).is_integer() for t in ticks), f"{name}: {label.get_text()} at {ticks}"


def test_status_plan_and_the_report_table_write_an_offset_list_alike(workdir):
    """One notation for a custom pattern wherever a cell is shown: a named pattern by its name,
    a list of more offsets than fit shortened the same way (and the report's CSV keeps it whole)."""
    from click.testing import CliRunner
    from conftest import write_spec

    from ablate.cli import cli
    from ablate.report import CellResult, Report, group_by_config
    from ablate.report.render import config_table, render_csv
    from ablate.tracking import param_text
    eight = LONG[:8]  # "eight"'s offsets in another order: a custom pattern, not the named one
    spec = write_spec(workdir / "p.yaml", name="offsets", extra=f"grid:\n  model.shift: [four, {eight}]\n")
    shown = "[+0+1 +0-1 +1+0 … -1+1] (8 offsets)"

    def cells(output: str) -> list[str]:
        return [line for line in output.splitlines() if "+0+1" in line or "[[" in line]
    plan = CliRunner().invoke(cli, ["plan", str(spec), "--gpu", "cpu"])
    status = CliRunner().invoke(cli, ["status", str(spec)])
    assert plan.exit_code == 0 and status.exit_code == 0, plan.output + status.output
    for output in (plan.output, status.output):
        [line] = cells(output)
        assert shown in line and "[[" not in line, line
    runs = [CellResult(f"r{i}", {SHIFT: param_text(s), "train.seed": "0"}, {"val_top1": 90.0}, {}, i)
            for i, s in enumerate(["four", eight])]
    rows, _ = group_by_config(runs, [SHIFT])
    report = Report("offsets", "sqlite:///mlflow.db", [SHIFT], rows, {}, workdir)
    header, body = config_table(report)
    assert sorted(line[0] for line in body) == sorted(["four", shown])
    assert param_text(eight) in render_csv(report)  # the CSV is for programs: every offset
