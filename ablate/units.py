"""Units of parameter and multiply-add counts, and how counts are written, in one place.

The paper prints parameter counts in 10^6 ("M") on most rows and in 2^20 ("Mi") on some, MACs
in 10^9 ("G") and once in 2^30 ("Gi") (see :mod:`ablate.models.cost`): a spec's reference row
says which, so that ours can be shown alike. Reports of small models read better in M or k.
Plain Python: ``ablate plan`` imports this without torch or matplotlib.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

#: parameter units a reference row may name
PARAMS_UNITS = {"M": 1e6, "Mi": 2.0 ** 20}
#: multiply-add units a reference row may name
MACS_UNITS = {"G": 1e9, "Gi": 2.0 ** 30}
#: decimal prefixes for counts, largest first
PREFIXES = (("G", 1e9), ("M", 1e6), ("k", 1e3))


def params_in(count: float, unit: str = "M") -> float:
    """A parameter count in ``unit`` (M = 10^6, Mi = 2^20)."""
    return count / PARAMS_UNITS[unit]


def macs_in(count: float, unit: str = "G") -> float:
    """A multiply-add count in ``unit`` (G = 10^9, Gi = 2^30)."""
    return count / MACS_UNITS[unit]


class PaperUnits:
    """``params_m``, ``params_mi`` and ``gmacs`` of anything with ``params_paper`` and ``macs`` counts
    (a model's cost, a plan's row): the paper's columns in the paper's units."""
    params_paper: int
    macs: int

    @property
    def params_m(self) -> float:
        """Paper-convention parameters in millions (10^6): the unit of the paper's c = 768 rows."""
        return params_in(self.params_paper, "M")

    @property
    def params_mi(self) -> float:
        """Paper-convention parameters in 2^20 units: the unit of the paper's deep and other-width rows."""
        return params_in(self.params_paper, "Mi")

    @property
    def gmacs(self) -> float:
        """Multiply-adds per image in billions (10^9): the paper's "FLOPs" column."""
        return macs_in(self.macs, "G")


def count_unit(values: Sequence[Optional[float]]) -> tuple[str, float]:
    """(prefix, divisor) for counts such as MACs or parameters: the largest of G, M, k in
    which the largest value reads at least 0.1. ImageNet models read in G like the paper
    (0.9 to 31 GMACs); a 16x16 digits model reads 6.3 MMACs rather than 0.0063 GMACs."""
    top = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0.0)
    for prefix, divisor in PREFIXES:
        if top / divisor >= 0.1:
            return prefix, divisor
    return "", 1.0


def paper_number(x: float) -> str:
    """A count in the paper's units as its tables print it: two decimals from 1 up, three
    significant digits below (0.00282 M rather than 0.00)."""
    return f"{x:.2f}" if x >= 1 else f"{x:.3g}"
