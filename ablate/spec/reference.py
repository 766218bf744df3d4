"""A paper table's numbers in a spec (``reference``) and which configuration each row describes.

``reference: {source, rows: [{when: {dotted: value}, top1, top5, params_m, gmacs, ...}]}``, read
into a typed :class:`~ablate.spec.types.Reference` where the spec is checked. :func:`matching_row`
is the one definition of "this row describes that configuration", used by the loader (every row
must pick out exactly one configuration of the grid), by ``ablate plan`` and by ``ablate report``.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping, Optional

from ablate.config import flat_params
from ablate.spec.problems import Checker, did_you_mean, format_value
from ablate.spec.types import Reference, ReferenceRow
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


def row_matches(row: ReferenceRow, settings: Mapping[str, Any]) -> bool:
    """Whether every setting a row's ``when`` names has that value in ``settings`` (dotted -> value)."""
    return all(k in settings and same_value(settings[k], v) for k, v in row.when.items())


def matching_row(reference: Optional[Reference], settings: Mapping[str, Any]) -> Optional[ReferenceRow]:
    """The first reference row that describes the configuration ``settings``, or ``None``."""
    for row in reference.rows if reference is not None else ():
        if row_matches(row, settings):
            return row
    return None


def read_reference(reference: Any, check: Checker) -> Optional[Reference]:
    """The spec's ``reference``, every problem in it added to ``check``; ``None`` where there is
    none or it has a problem (the spec then fails to load)."""
    if reference is None:
        return None
    path = ("reference",)
    if not isinstance(reference, dict):
        check.add(path, "expected {source, rows} (allowed: see docs/specs.md)")
        return None
    valid = True
    for key in reference:
        if key not in REFERENCE_KEYS:
            check.add(path + (key,), f"unknown key{did_you_mean(key, REFERENCE_KEYS)} "
                      f"(allowed: {', '.join(REFERENCE_KEYS)})")
            valid = False
    source = reference.get("source")
    if not isinstance(source, str):
        check.add(path + ("source",), "expected a string naming the paper table (allowed: e.g. "
                  "\"S2-MLP paper, Table 7 (ImageNet100)\")", "reference.source")
        valid = False
    rows = reference.get("rows")
    if not isinstance(rows, list) or not rows:
        check.add(path + ("rows",), "expected a non-empty list of rows (allowed: e.g. "
                  "- {when: {model.shift: four}, top1: 87.1, top5: 97.1})", "reference.rows")
        return None
    read = [_read_row(row, path + ("rows", i), f"reference.rows[{i}]", check) for i, row in enumerate(rows)]
    typed = [row for row in read if row is not None]
    return Reference(source, tuple(typed)) if valid and len(typed) == len(read) else None


def _read_row(row: Any, path: tuple, shown: str, check: Checker) -> Optional[ReferenceRow]:
    """The row, or ``None`` where it has a problem (added to ``check``)."""
    if not isinstance(row, dict):
        check.add(path, "expected a mapping (allowed: {when: {...}, top1, top5, params_m, gmacs})", shown)
        return None
    valid = True
    for key in row:
        if key not in REFERENCE_ROW_KEYS:
            check.add(path + (key,), f"unknown key{did_you_mean(key, REFERENCE_ROW_KEYS)} "
                      f"(allowed: {', '.join(REFERENCE_ROW_KEYS)})", f"{shown}.{key}")
            valid = False
    when = row.get("when")
    if not isinstance(when, dict) or not when:
        check.add(path + ("when",), "expected a mapping of dotted settings to values (allowed: e.g. "
                  "when: {model.shift: four})", f"{shown}.when")
        valid = False
    else:
        for key in when:
            if not check.setting_key(key, path + ("when", key)):
                valid = False
                continue
            problem = check.invalid_reference(path + ("when", key), key, when[key])
            if problem:
                check.add(path + ("when", key), f"{problem} (allowed: {check.valid_listed(key)})",
                          f"{shown}.when.{key}")
                valid = False
    for key in ("top1", "top5", "params_m", "gmacs"):
        if key in row and (not isinstance(row[key], (int, float)) or isinstance(row[key], bool)):
            check.add(path + (key,), f"expected a number, got {format_value(row[key])} "
                      "(allowed: the paper's printed number)", f"{shown}.{key}")
            valid = False
    for key, units in (("params_unit", PARAMS_UNITS), ("macs_unit", MACS_UNITS)):
        if key in row and row[key] not in units:
            check.add(path + (key,), f"unknown unit {format_value(row[key])} (allowed: {', '.join(units)})",
                      f"{shown}.{key}")
            valid = False
    return ReferenceRow(**row) if valid else None


def check_reference(reference: Optional[Reference], cells: list, check: Checker) -> None:
    """Every reference row describes exactly one configuration of the grid."""
    if reference is None:
        return
    first_seed = cells[0].seed if cells else 0
    configs = [flat_params(c.config) for c in cells if c.seed == first_seed]
    for i, row in enumerate(reference.rows):
        hits = sum(row_matches(row, flat) for flat in configs)
        if hits != 1:
            check.add(("reference", "rows", i, "when"),
                      f"matches {hits} configurations of the grid (allowed: values that pick out exactly one)",
                      f"reference.rows[{i}].when")


def rows_for_overrides(reference: Optional[Reference], fixed: Mapping[str, Any]) -> Optional[Reference]:
    """The reference with only the rows that can describe a configuration whose settings
    ``fixed`` (command-line overrides of varied settings) holds; ``None`` when none is left."""
    if reference is None or not fixed:
        return reference
    rows = tuple(row for row in reference.rows
                 if all(same_value(fixed[k], v) for k, v in row.when.items() if k in fixed))
    return replace(reference, rows=rows) if rows else None
