"""Named spatial-shift patterns of S²-MLP (paper Table 7) as (dy, dx) offsets.

Kept free of torch so that specs can be validated without importing it.

Convention: ``dy`` moves content along the height axis (+1 = down), ``dx`` along the
width axis (+1 = right). Channel group ``i`` is moved by ``offsets[i]``; the order of the
four-direction pattern follows the paper's pseudo-code: right, left, down, up.
"""
from __future__ import annotations

from typing import Sequence, Union

Offset = tuple[int, int]
ShiftSpec = Union[str, Sequence[Sequence[int]]]

RIGHT, LEFT, DOWN, UP = (0, 1), (0, -1), (1, 0), (-1, 0)
DIAGONALS = [(1, 1), (1, -1), (-1, 1), (-1, -1)]

#: name -> (paper Table 7 row id, offsets)
SHIFT_PATTERNS: dict[str, tuple[str, list[Offset]]] = {
    "four": ("a", [RIGHT, LEFT, DOWN, UP]),
    "eight": ("b", [RIGHT, LEFT, DOWN, UP, *DIAGONALS]),
    "up_right": ("c", [UP, RIGHT]),
    "left_down": ("d", [LEFT, DOWN]),
    "up_down": ("e", [UP, DOWN]),
    "left_right": ("f", [LEFT, RIGHT]),
    "up": ("g", [UP]),
    "down": ("h", [DOWN]),
    "left": ("i", [LEFT]),
    "right": ("j", [RIGHT]),
    "none": ("w/o", []),
}


def resolve_offsets(shift: ShiftSpec) -> list[Offset]:
    """Offsets of a named pattern or of an explicit ``[[dy, dx], ...]`` list.

    Raises ``ValueError`` with the allowed values when the pattern is unknown or malformed.
    """
    if isinstance(shift, str):
        if shift not in SHIFT_PATTERNS:
            raise ValueError(f"unknown shift pattern {shift!r} (allowed: {', '.join(SHIFT_PATTERNS)} "
                             "or a list of [dy, dx] integer offsets)")
        return list(SHIFT_PATTERNS[shift][1])
    offsets = []
    for item in shift:
        if (isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise ValueError(f"malformed shift offset {item!r} (allowed: a pair of integers [dy, dx])")
        offsets.append((int(item[0]), int(item[1])))
    return offsets


def shift_label(shift: ShiftSpec) -> str:
    """A short printable name: the preset name, or the offsets written out."""
    if isinstance(shift, str):
        return shift
    return "[" + " ".join(f"{dy:+d}{dx:+d}" for dy, dx in resolve_offsets(shift)) + "]"
