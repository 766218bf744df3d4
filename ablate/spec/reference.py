"""A paper table's numbers in a spec (``reference``) and which configuration each row describes.

``reference: {source, rows: [{when: {dotted: value}, top1, top5, params_m, gmacs, ...}]}``.
:func:`matching_row` is the one definition of "this row describes that configuration", used by
the loader (every row must pick out exactly one configuration of the grid), by ``ablate plan``
and by ``ablate report``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from ablate.config import flat_params
from ablate.spec.problems import Checker, did_you_mean, format_value
from ablate.units import MACS_UNITS, PARAMS_UNITS

REFERENCE_KEYS = ("source", "rows")
REFERENCE_ROW_KEYS = ("when", "top1", "top5", "params_m", "gmacs", "params_unit", "macs_unit", "note")


def same_value(a: Any, b: Any) -> bool:
    """Equality of setting values across spellings: 4 == 4.0, offset lists as lists, a boolean
    only equals a boolean."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def row_matches(row: Mapping, settings: Mapping[str, Any]) -> bool:
    """Whether every setting a row's ``when`` names has that value in ``settings`` (dotted -> value)."""
    return all(k in settings and same_value(settings[k], v) for k, v in (row.get("when") or {}).items())


def matching_row(reference: Optional[Mapping], settings: Mapping[str, Any]) -> Optional[dict]:
    """The first reference row that describes the configuration ``settings``, or ``None``."""
    for row in (reference or {}).get("rows") or []:
        if row_matches(row, settings):
            return row
    return None


def read_reference(reference: Any, check: Checker) -> Optional[dict]:
    if reference is None:
        return None
    path = ("reference",)
    if not isinstance(reference, dict):
        check.add(path, "expected {source, rows} (allowed: see docs/specs.md)")
        return None
    for key in reference:
        if key not in REFERENCE_KEYS:
            check.add(path + (key,), f"unknown key{did_you_mean(key, REFERENCE_KEYS)} "
                      f"(allowed: {', '.join(REFERENCE_KEYS)})")
    if not isinstance(reference.get("source"), str):
        check.add(path + ("source",), "expected a string naming the paper table (allowed: e.g. "
                  "\"S2-MLP paper, Table 7 (ImageNet100)\")", "reference.source")
    rows = reference.get("rows")
    if not isinstance(rows, list) or not rows:
        check.add(path + ("rows",), "expected a non-empty list of rows (allowed: e.g. "
                  "- {when: {model.shift: four}, top1: 87.1, top5: 97.1})", "reference.rows")
        return None
    for i, row in enumerate(rows):
        _read_row(row, path + ("rows", i), f"reference.rows[{i}]", check)
    return reference


def _read_row(row: Any, path: tuple, shown: str, check: Checker) -> None:
    if not isinstance(row, dict):
        check.add(path, "expected a mapping (allowed: {when: {...}, top1, top5, params_m, gmacs})", shown)
        return
    for key in row:
        if key not in REFERENCE_ROW_KEYS:
            check.add(path + (key,), f"unknown key{did_you_mean(key, REFERENCE_ROW_KEYS)} "
                      f"(allowed: {', '.join(REFERENCE_ROW_KEYS)})", f"{shown}.{key}")
    when = row.get("when")
    if not isinstance(when, dict) or not when:
        check.add(path + ("when",), "expected a mapping of dotted settings to values (allowed: e.g. "
                  "when: {model.shift: four})", f"{shown}.when")
    else:
        for key in when:
            check.setting_key(key, path + ("when", key))
    for key in ("top1", "top5", "params_m", "gmacs"):
        if key in row and (not isinstance(row[key], (int, float)) or isinstance(row[key], bool)):
            check.add(path + (key,), f"expected a number, got {format_value(row[key])} "
                      "(allowed: the paper's printed number)", f"{shown}.{key}")
    for key, units in (("params_unit", PARAMS_UNITS), ("macs_unit", MACS_UNITS)):
        if key in row and row[key] not in units:
            check.add(path + (key,), f"unknown unit {format_value(row[key])} (allowed: {', '.join(units)})",
                      f"{shown}.{key}")


def check_reference(reference: Optional[dict], cells: list, check: Checker) -> None:
    """Every reference row describes exactly one configuration of the grid."""
    if not reference:
        return
    first_seed = cells[0].seed if cells else 0
    configs = [flat_params(c.config) for c in cells if c.seed == first_seed]
    for i, row in enumerate(reference.get("rows") or []):
        hits = sum(row_matches(row, flat) for flat in configs)
        if hits != 1:
            check.add(("reference", "rows", i, "when"),
                      f"matches {hits} configurations of the grid (allowed: values that pick out exactly one)",
                      f"reference.rows[{i}].when")


def rows_for_overrides(reference: Optional[dict], fixed: Mapping[str, Any]) -> Optional[dict]:
    """The reference with only the rows that can describe a configuration whose settings
    ``fixed`` (command-line overrides of varied settings) holds; ``None`` when none is left."""
    if not reference or not fixed:
        return reference
    rows = [row for row in reference.get("rows") or []
            if all(same_value(fixed[k], v) for k, v in (row.get("when") or {}).items() if k in fixed)]
    return {**reference, "rows": rows} if rows else None
