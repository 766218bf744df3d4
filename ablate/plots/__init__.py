"""The report's figures, each written as PNG and SVG: accuracy against cost
(:mod:`.cost`), MACs against a measured latency (:mod:`.latency`), learning curves
(:mod:`.curves`), a search's Pareto front and history (:mod:`.search`); what they share
(canvas, colour and marker encoding, log axes) is in :mod:`.style`.
"""
from ablate.plots.cost import ConfigPoint, plot_top1_vs_macs, top1_vs_macs_figure
from ablate.plots.curves import Curves, learning_curves_figure, mean_band, plot_learning_curves
from ablate.plots.latency import LatencyPoint, macs_vs_latency_figure, plot_macs_vs_latency
from ablate.plots.search import history_figure, pareto_figure, plot_history, plot_pareto
from ablate.plots.style import Encoding, log_axis_at, metric_axis
from ablate.units import count_unit

__all__ = ["ConfigPoint", "Curves", "Encoding", "LatencyPoint", "count_unit", "history_figure",
           "learning_curves_figure", "log_axis_at", "macs_vs_latency_figure", "mean_band", "metric_axis",
           "pareto_figure", "plot_history", "plot_learning_curves", "plot_macs_vs_latency", "plot_pareto",
           "plot_top1_vs_macs", "top1_vs_macs_figure"]
