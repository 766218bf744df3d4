"""``report``: how ``ablate report`` compares the configurations of a spec.

``report: {baseline: {model.shift: four}}`` names the configuration every other is compared
with (its difference in top-1, with a confidence interval over seeds). The baseline names
varied settings only; where it leaves some out, each configuration is compared with the
baseline that shares its other settings (shift none at patch size 2 with shift four at patch
size 2). Without it, the first configuration is the baseline.
"""
from __future__ import annotations

from typing import Any, Mapping

from ablate.spec.problems import Checker, did_you_mean, format_value, format_values
from ablate.spec.reference import same_value

REPORT_KEYS = ("baseline",)
EXAMPLE = "e.g. report: {baseline: {model.shift: four}}"


def read_report(report: Any, varied: list[str], choices: Mapping[str, list],
                ranges: Mapping[str, tuple], fixed: Mapping[str, Any], check: Checker) -> dict[str, Any]:
    """The baseline, varied setting -> value (``{}`` when the spec names none).

    ``choices`` are the values a grid, zip or search choice lists for a setting; ``ranges`` the
    ``(low, high)`` of a numeric search parameter. ``fixed`` are the ``--set`` overrides: a
    baseline value they also fix is dropped; a baseline that wants another value of a fixed
    setting describes no configuration of this run and is dropped whole.
    """
    if report is None:
        return {}
    path = ("report",)
    if not isinstance(report, dict):
        check.add(path, f"expected a mapping, got {format_value(report)} (allowed: {', '.join(REPORT_KEYS)}; "
                  f"{EXAMPLE})")
        return {}
    for key in report:
        if key not in REPORT_KEYS:
            check.add(path + (key,), f"unknown key{did_you_mean(key, REPORT_KEYS)} "
                      f"(allowed: {', '.join(REPORT_KEYS)})")
    baseline = report.get("baseline")
    if baseline is None:
        return {}
    path += ("baseline",)
    allowed = ", ".join(varied) or "none: the spec varies no setting"
    if not isinstance(baseline, dict) or not baseline:
        check.add(path, f"expected a mapping of varied settings to values, got {format_value(baseline)} "
                  f"(allowed: {allowed}; {EXAMPLE})", "report.baseline")
        return {}
    if any(k in fixed and not same_value(fixed[k], v) for k, v in baseline.items()):
        return {}
    out = {}
    for key, value in baseline.items():
        if key in fixed:
            continue
        shown = f"report.baseline.{key}"
        problem = check.invalid_reference(path + (key,), key, value)
        if problem:  # a value the grid, zip or search lists, itself invalid: refused at its own line
            check.add(path + (key,), f"{problem} (allowed: {check.valid_listed(key)})", shown)
            continue
        if key not in varied:
            check.add(path + (key,), f"not a varied setting{did_you_mean(key, varied)} (allowed: {allowed})", shown)
            continue
        values = choices.get(key)
        if values is not None and not any(same_value(value, v) for v in values):
            # a value listed that is itself invalid (a typo, eigth) is no value to choose: named
            # with the line that refuses it, not offered as allowed
            invalid = [p for p in (check.invalid_reference(path + (key,), key, v) for v in values) if p]
            note = "".join(f"; {p}" for p in invalid)
            allowed = check.valid_listed(key) if invalid else ", ".join(format_value(v) for v in values)
            check.add(path + (key,), f"{format_value(value)} is not one of its values{note} "
                      f"(allowed: {allowed})", shown)
            continue
        if key in ranges and not _in_range(value, *ranges[key]):
            low, high = ranges[key]
            check.add(path + (key,), f"{format_value(value)} is outside the search range "
                      f"(allowed: numbers from {format_value(low)} to {format_value(high)})", shown)
            continue
        out[key] = value
    return out


def _in_range(value: Any, low: Any, high: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return low is None or high is None or low <= value <= high


def check_baseline(baseline: Mapping[str, Any], configs: list[Mapping[str, Any]], check: Checker) -> None:
    """The baseline describes at least one configuration of the grid (``exclude`` may drop it)."""
    if baseline and configs and not any(all(same_value(c[k], v) for k, v in baseline.items()) for c in configs):
        check.add(("report", "baseline"), f"matches no configuration of the grid: {format_values(baseline)} "
                  "(allowed: values of a configuration that exclude keeps)", "report.baseline")
