"""What a report compares each configuration with: its baseline (the difference in top-1, with
a confidence interval over seeds, :mod:`ablate.report.stats`) and the paper's numbers for it
(the spec's ``reference`` table)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from ablate import names
from ablate.report.collect import ConfigRow
from ablate.report.stats import difference
from ablate.spec import matching_row, same_value
from ablate.spec.types import Reference
from ablate.text import exact
from ablate.tracking import param_value
from ablate.units import MACS_UNITS


def _matches(row: ConfigRow, wanted: dict[str, Any]) -> bool:
    return all(k in row.settings and same_value(param_value(row.settings[k]), v) for k, v in wanted.items())


def compare_with_baseline(rows: Sequence[ConfigRow], baseline: Optional[dict[str, Any]]) -> str:
    """Set every row's baseline and its difference in top-1 from it; returns how the baseline
    was chosen, for the report.

    With ``baseline`` (a spec's ``report.baseline``: varied setting -> value), each row is
    compared with the configuration that has the baseline's values and the row's other
    settings (shift none at patch size 2 with shift four at patch size 2), or, where none has
    them, with the first configuration that has the baseline's values. Without it, or where no
    finished configuration has its values, with the first configuration.
    """
    if not rows:
        return ""
    described = ", ".join(f"{k}={exact(v)}" for k, v in (baseline or {}).items())
    matching = [r for r in rows if _matches(r, baseline)] if baseline else []
    if baseline and not matching:
        note = (f"baseline: no finished configuration has {described} (the spec's report.baseline); "
                f"compared with the first configuration, {rows[0].label}")
    elif baseline:
        note = (f"baseline: {described} (the spec's report.baseline)"
                + (", with each row's other settings" if len({id(b) for b in _pick(rows, matching, baseline)}) > 1
                   else ""))
    else:
        note = f"baseline: the first configuration, {rows[0].label}"
    chosen = _pick(rows, matching, baseline) if matching else [rows[0]] * len(rows)
    for row, base in zip(rows, chosen):
        row.baseline = base
        if row is not base:
            try:
                row.delta = difference(row.by_seed(names.VAL_TOP1), base.by_seed(names.VAL_TOP1))
            except ValueError:  # no finite top-1 on one side
                row.delta = None
    return note


def _pick(rows: Sequence[ConfigRow], matching: list[ConfigRow], baseline: dict[str, Any]) -> list[ConfigRow]:
    """For each row, the matching configuration that shares its other settings, else the first.
    Settings only one of the two has (a token mixer's own, a timm model's arguments) are not
    compared: the baseline of an ``mlp`` row without a shift is ``none`` at the row's patch size."""
    def others(r: ConfigRow) -> dict[str, str]:
        return {k: v for k, v in r.settings.items() if k not in baseline}

    def shares(m: ConfigRow, r: ConfigRow) -> bool:
        mine, theirs = others(m), others(r)
        return all(mine[k] == theirs[k] for k in mine.keys() & theirs.keys())
    return [next((m for m in matching if shares(m, r)), matching[0]) for r in rows]


def attach_reference(rows: Sequence[ConfigRow], reference: Reference) -> None:
    """Set each row's paper top-1/top-5 (and MACs) from the first reference row that describes
    the row's configuration (:func:`ablate.spec.matching_row`, on the params read back as values)."""
    for row in rows:
        ref = matching_row(reference, {k: param_value(v) for k, v in row.runs[0].params.items()})
        if ref is not None:
            row.paper_top1, row.paper_top5 = ref.top1, ref.top5
            if ref.gmacs is not None:
                row.paper_macs = ref.gmacs * MACS_UNITS[ref.macs_unit or "G"]
