"""The spatial-shift operation of S²-MLP (Yu et al., arXiv 2106.07477, §3.2).

The channels of a (..., H, W, C) tensor are split into ``len(offsets)`` equal contiguous
groups; group ``i`` is moved by ``offsets[i] = (dy, dx)``: ``dy`` along H (+1 = down), ``dx``
along W (+1 = right). Steps larger than one and diagonal moves are allowed. The paper's
default (pattern "a", :data:`ablate.models.shift_patterns.SHIFT_PATTERNS` ``four``) is
right, left, down, up, in that channel order.

Borders. Only the part of the output that receives moved content (the "interior") is taken
from the shifted input; the rest is

* ``keep`` (the paper's pseudo-code): the input's ORIGINAL value at that position. Along W,
  ``[0, 1, 2, 3, 4]`` becomes ``[0, 0, 1, 2, 3]`` for dx = +1 and ``[1, 2, 3, 4, 4]`` for -1;
  for dx = +2, ``[0, 1, 0, 1, 2]``.
* ``zero``: zero, as a fixed depthwise convolution with one-hot kernels would give.

Out of place, always. Running the paper's pseudo-code in place on a PyTorch tensor copies
over overlapping memory and smears the first row across the whole axis (PAPER.md pitfall 1),
and torch.compile may drop the defensive ``clone()`` of in-place versions (pitfall 2). Here
the input is only read and one freshly allocated output is written, once per element: a
single read and a single write of the activation, no roll and no concatenation. The backward
pass is the exact adjoint, written the same way, so autograd does not materialise one
full-size gradient buffer per slice assignment.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import nn

from ablate.models.shift_patterns import Offset, ShiftSpec, resolve_offsets, shift_label

Border = Literal["keep", "zero"]
BORDERS = ("keep", "zero")

# A rectangle of the (H, W) plane as a pair of slices.
_Rect = tuple[slice, slice]


def _axis_ranges(size: int, step: int) -> Optional[tuple[slice, slice]]:
    """(destination, source) ranges along one axis for a move by ``step``; None if nothing lands."""
    n = size - abs(step)
    if n <= 0:
        return None
    if step >= 0:
        return slice(step, size), slice(0, n)
    return slice(0, n), slice(-step, size)


def _complement(rect: Optional[_Rect], h: int, w: int) -> list[_Rect]:
    """Non-empty rectangles that tile the (h, w) plane minus ``rect``."""
    if rect is None:
        return [(slice(0, h), slice(0, w))]
    (r0, r1), (c0, c1) = (rect[0].start, rect[0].stop), (rect[1].start, rect[1].stop)
    strips = [(slice(0, r0), slice(0, w)), (slice(r1, h), slice(0, w)),
              (slice(r0, r1), slice(0, c0)), (slice(r0, r1), slice(c1, w))]
    return [(rs, cs) for rs, cs in strips if rs.stop > rs.start and cs.stop > cs.start]


class _GroupPlan:
    """Where one channel group's content goes: interior rectangles and the uncovered border."""

    def __init__(self, h: int, w: int, dy: int, dx: int):
        ys, xs = _axis_ranges(h, dy), _axis_ranges(w, dx)
        if ys is None or xs is None:
            self.dst = self.src = None
        else:
            self.dst, self.src = (ys[0], xs[0]), (ys[1], xs[1])
        self.border = _complement(self.dst, h, w)      # output cells no content lands on
        self.unread = _complement(self.src, h, w)      # input cells no content comes from


def _plans(shape: torch.Size, offsets: Sequence[Offset]) -> list[tuple[slice, _GroupPlan]]:
    h, w, c = shape[-3], shape[-2], shape[-1]
    size = c // len(offsets)
    return [(slice(i * size, (i + 1) * size), _GroupPlan(h, w, dy, dx))
            for i, (dy, dx) in enumerate(offsets)]


def _at(t: torch.Tensor, rect: _Rect, channels: slice) -> torch.Tensor:
    return t[..., rect[0], rect[1], channels]


def _shift_forward(x: torch.Tensor, offsets: Sequence[Offset], border: Border) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for ch, plan in _plans(x.shape, offsets):
        if plan.dst is not None:
            _at(out, plan.dst, ch).copy_(_at(x, plan.src, ch))
        for rect in plan.border:
            if border == "keep":
                _at(out, rect, ch).copy_(_at(x, rect, ch))
            else:
                _at(out, rect, ch).zero_()
    return out


def _shift_adjoint(grad: torch.Tensor, offsets: Sequence[Offset], border: Border) -> torch.Tensor:
    """Transpose of :func:`_shift_forward`: each output cell sends its gradient where it came from."""
    out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    for ch, plan in _plans(grad.shape, offsets):
        if plan.dst is not None:
            _at(out, plan.src, ch).copy_(_at(grad, plan.dst, ch))
        for rect in plan.unread:
            _at(out, rect, ch).zero_()
        if border == "keep":  # border cells kept their own input value: add their gradient back
            for rect in plan.border:
                _at(out, rect, ch).add_(_at(grad, rect, ch))
    return out


class _SpatialShiftFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offsets, border):
        ctx.offsets, ctx.border = offsets, border
        return _shift_forward(x, offsets, border)

    @staticmethod
    def backward(ctx, grad):
        return _shift_adjoint(grad, ctx.offsets, ctx.border), None, None


def _check(x: torch.Tensor, offsets: Sequence[Offset], border: str) -> None:
    if border not in BORDERS:
        raise ValueError(f"unknown border {border!r} (allowed: {', '.join(BORDERS)})")
    if x.dim() < 3:
        raise ValueError(f"spatial shift expects a (..., H, W, C) tensor, got shape {tuple(x.shape)}")
    if x.shape[-1] % len(offsets):
        raise ValueError(f"{x.shape[-1]} channels cannot be split into {len(offsets)} equal shift "
                         f"groups (allowed: a multiple of {len(offsets)})")


def spatial_shift(x: torch.Tensor, offsets: ShiftSpec, border: Border = "keep") -> torch.Tensor:
    """Shift channel group ``i`` of a (..., H, W, C) tensor by ``offsets[i] = (dy, dx)``.

    ``offsets`` may also be a pattern name (``"four"``, ``"eight"``, ...). Returns a new tensor
    (the input is never written); with no offsets, returns ``x`` itself (the identity).
    """
    offsets = tuple(resolve_offsets(offsets))
    if not offsets:
        return x
    _check(x, offsets, border)
    return _SpatialShiftFn.apply(x, offsets, border)


class SpatialShift(nn.Module):
    """Parameter-free spatial shift on (B, H, W, C) activations; see :func:`spatial_shift`.

    Args:
        offsets: one (dy, dx) per channel group, or a pattern name; empty = identity.
        border: ``keep`` (paper pseudo-code: uncovered cells keep their value) or ``zero``.
    """

    def __init__(self, offsets: ShiftSpec = "four", border: Border = "keep"):
        super().__init__()
        if border not in BORDERS:
            raise ValueError(f"unknown border {border!r} (allowed: {', '.join(BORDERS)})")
        self.offsets = tuple(resolve_offsets(offsets))
        self.border = border

    @property
    def groups(self) -> int:
        return len(self.offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offsets:
            return x
        _check(x, self.offsets, self.border)
        return _SpatialShiftFn.apply(x, self.offsets, self.border)

    def extra_repr(self) -> str:
        return f"offsets={shift_label([list(o) for o in self.offsets])}, border={self.border}"
