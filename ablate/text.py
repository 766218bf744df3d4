"""How values, durations, counts and tables are written for people, in one place.

Every command that prints a cell (``run``'s summary, ``status``, ``plan``, ``report``) writes a
setting's value, a duration and an aligned table with these functions, so the same cell reads
the same everywhere. Plain Python: the fast commands import it without torch.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Optional, Sequence

from ablate.models.shift_patterns import SHIFT_PATTERNS, resolve_offsets

#: offsets an offset list shows before the rest is elided: a legend entry or a table column
#: stays short, however many channel groups a custom pattern has
SHOWN_OFFSETS = 4


def offsets(v: Any) -> Optional[str]:
    """A shift pattern as every table, legend and run name shows it, or None where ``v`` is
    not one: a named pattern by its name (also where it is written out as that pattern's
    offsets, in that order), any other list as ``[+0+1 +0-1 +1+0 -1+0]`` (dy then dx, signed),
    and past :data:`SHOWN_OFFSETS` offsets its first ones, the last and their number,
    ``[+0+1 +0-1 +1+0 … -1+1] (9 offsets)``: as long as the list's ends and length tell
    apart, and the same list always reads the same. ``v`` is the list itself or its MLflow
    param (the JSON text)."""
    if isinstance(v, str):
        if not v.startswith("["):
            return None
        try:
            v = json.loads(v)
        except ValueError:
            return None
    if not isinstance(v, (list, tuple)):
        return None
    try:
        pairs = resolve_offsets(v)
    except (ValueError, TypeError):  # not a list of offsets
        return None
    for name, (_, named) in SHIFT_PATTERNS.items():
        if pairs == named:
            return name
    written = [f"{dy:+d}{dx:+d}" for dy, dx in pairs]
    if len(written) <= SHOWN_OFFSETS:
        return "[" + " ".join(written) + "]"
    return "[" + " ".join(written[:SHOWN_OFFSETS - 1]) + f" … {written[-1]}] ({len(written)} offsets)"


def value(v: Any) -> str:
    """A setting's value, short, for a table or a run name: floats to 3 significant digits,
    offset lists as :func:`offsets` writes them, nothing for None."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return offsets(v) or compact_json(v)
    if isinstance(v, dict):
        return compact_json(v)
    return str(v)


def exact(v: Any) -> str:
    """A setting's value exactly as a spec writes it, for errors: strings bare, lists and maps
    as compact JSON, booleans as YAML's ``true``/``false``, numbers as Python reads them."""
    if isinstance(v, str):
        return v
    if isinstance(v, (list, dict)):
        return compact_json(v)
    return str(v).lower() if isinstance(v, bool) else repr(v)


def number(v: Any) -> str:
    """A number in a plan or a search space: ``768``, ``0.001``, ``3e-05`` (Python's ``g``);
    offset lists as :func:`offsets` writes them."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list) and offsets(v) is not None:
        return offsets(v)
    if isinstance(v, (list, dict)):
        return compact_json(v)
    return str(v)


def compact_json(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"))


def param(text: str, whole_offsets: bool = False) -> str:
    """A param as MLflow stored it (a string), shortened for tables and legends: floats to 4
    significant digits, offset lists as :func:`offsets` writes them (as stored with
    ``whole_offsets``: a CSV for other programs keeps every offset)."""
    shown = None if whole_offsets else offsets(text)
    if shown is not None:
        return shown
    try:
        n = float(text)
    except (TypeError, ValueError):
        return text
    return text if n.is_integer() or len(text) <= 7 else f"{n:.4g}"


def fixed(x: Optional[float], fmt: str) -> str:
    """``x`` in ``fmt``; nothing for a missing or non-finite number."""
    return "" if x is None or not math.isfinite(x) else format(x, fmt)


def mean_std(mean: float, std: float) -> str:
    """``71.23 ± 0.40``; the mean alone where there is no spread; nothing for no mean."""
    if not math.isfinite(mean):
        return ""
    return f"{mean:.2f} ± {std:.2f}" if math.isfinite(std) else f"{mean:.2f}"


def duration(seconds: float) -> str:
    """``4m07s``, ``2h13m``."""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def clock(epoch_seconds: float) -> str:
    """A moment: the time of day within the last 20 hours, else the date too."""
    fmt = "%H:%M:%S" if time.time() - epoch_seconds < 20 * 3600 else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(epoch_seconds))


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def aligned(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """An aligned text table, header first: the first ``left`` columns left-aligned, the rest
    (numbers) right-aligned; trailing blanks stripped."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header)] + [line(r) for r in rows]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(s: Any) -> str:
        return str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)
