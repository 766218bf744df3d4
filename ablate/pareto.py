"""Pareto fronts: which configurations no other one beats on every objective at once.

The accuracy-vs-cost trade-off of the paper (top-1 against MACs, §3.4 and Table 7) is read
from the non-dominated configurations: those for which no other configuration is at least as
good on every objective and strictly better on one.
"""
from __future__ import annotations

import math
from typing import Sequence

DIRECTIONS = {"maximize": 1.0, "max": 1.0, "minimize": -1.0, "min": -1.0}


def _signs(directions: Sequence[str]) -> list[float]:
    try:
        return [DIRECTIONS[str(d).lower()] for d in directions]
    except KeyError as e:
        raise ValueError(f"unknown direction {e.args[0]!r} (allowed: maximize, minimize)") from None


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """True when ``a`` is at least as good as ``b`` on every objective and better on one."""
    signs = _signs(directions)
    better = False
    for x, y, s in zip(a, b, signs):
        if s * x < s * y:
            return False
        better = better or s * x > s * y
    return better


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices (ascending) of the non-dominated points.

    ``points[i]`` holds one value per objective, ``directions[k]`` is ``"maximize"`` or
    ``"minimize"`` for objective ``k``. Equal points do not dominate each other, so ties are
    all kept. A point with a missing value (NaN or None) is never on the front: it cannot be
    compared. With one objective the front is the best point(s).
    """
    signs = _signs(directions)
    for i, p in enumerate(points):
        if len(p) != len(signs):
            raise ValueError(f"point {i} has {len(p)} values for {len(signs)} directions")
    # Orient every objective as "larger is better" once, then compare.
    oriented = [None if any(v is None or math.isnan(v) for v in p) else [s * v for s, v in zip(signs, p)]
                for p in points]
    up = ["maximize"] * len(signs)
    front = []
    for i, p in enumerate(oriented):
        if p is None:
            continue
        if not any(q is not None and j != i and dominates(q, p, up) for j, q in enumerate(oriented)):
            front.append(i)
    return front
