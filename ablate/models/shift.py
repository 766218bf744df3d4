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
over overlapping memory and smears the first row across the whole axis (docs/paper.md, "Pitfall 1"),
and torch.compile may drop the defensive ``clone()`` of in-place versions (pitfall 2). Here
the input is only read and one freshly allocated output is written, once per element: a
single read and a single write of the activation, no roll and no concatenation. The backward
pass is the exact adjoint, written the same way, so autograd does not materialise one
full-size gradient buffer per slice assignment.

Scripting and tracing. The rectangles are plain integers, so the forward copy compiles under
TorchScript. A custom ``autograd.Function`` cannot be scripted, so a scripted model runs the
same copy and lets autograd transpose it: each input cell gets at most two gradient terms (its
moved copy and, with ``keep``, its own border cell), so that gradient equals the custom
adjoint bit for bit. ``torch.fx`` records :func:`shift_channels` as one call (its rectangles
depend on the input's shape, which a symbolic trace does not know); ``torch.compile`` traces
through the custom function.
"""
from typing import List, Literal, Tuple

import torch
from torch import nn

from ablate.models.shift_patterns import ShiftSpec, resolve_offsets, shift_label

Border = Literal["keep", "zero"]
BORDERS = ("keep", "zero")

# A rectangle of the (H, W) plane: rows [r0, r1), columns [c0, c1). Integers rather than slice
# objects, which TorchScript cannot hold.
Rect = Tuple[int, int, int, int]


def _axis_ranges(size: int, step: int) -> Tuple[int, int, int, int]:
    """(destination start, stop, source start, stop) along one axis for a move by ``step``."""
    n = max(size - abs(step), 0)  # n == 0: nothing lands (|step| >= size)
    if step >= 0:
        return step, step + n, 0, n
    return 0, n, -step, -step + n


def _interior(h: int, w: int, dy: int, dx: int) -> Tuple[Rect, Rect]:
    """(destination, source) rectangles of a move by (dy, dx); both empty if nothing lands."""
    r0, r1, sr0, sr1 = _axis_ranges(h, dy)
    c0, c1, sc0, sc1 = _axis_ranges(w, dx)
    if r1 == r0 or c1 == c0:
        return (0, 0, 0, 0), (0, 0, 0, 0)
    return (r0, r1, c0, c1), (sr0, sr1, sc0, sc1)


def _complement(rect: Rect, h: int, w: int) -> List[Rect]:
    """Non-empty rectangles that tile the (h, w) plane minus ``rect`` (all of it if ``rect`` is empty)."""
    r0, r1, c0, c1 = rect
    rects: List[Rect] = []
    for s in [(0, r0, 0, w), (r1, h, 0, w), (r0, r1, 0, c0), (r0, r1, c1, w)]:  # top, bottom, left, right
        if s[1] > s[0] and s[3] > s[2]:
            rects.append(s)
    return rects


def _at(t: torch.Tensor, rect: Rect, c0: int, c1: int) -> torch.Tensor:
    return t[..., rect[0]:rect[1], rect[2]:rect[3], c0:c1]


def _is_empty(rect: Rect) -> bool:
    return rect[1] == rect[0]


def _shift_forward(x: torch.Tensor, offsets: List[Tuple[int, int]], border: str) -> torch.Tensor:
    h, w = x.shape[-3], x.shape[-2]
    size = x.shape[-1] // len(offsets)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for i, (dy, dx) in enumerate(offsets):
        c0, c1 = i * size, (i + 1) * size
        dst, src = _interior(h, w, dy, dx)
        if not _is_empty(dst):
            _at(out, dst, c0, c1).copy_(_at(x, src, c0, c1))
        for rect in _complement(dst, h, w):  # output cells no content lands on
            if border == "keep":
                _at(out, rect, c0, c1).copy_(_at(x, rect, c0, c1))
            else:
                _at(out, rect, c0, c1).zero_()
    return out


def _shift_adjoint(grad: torch.Tensor, offsets: List[Tuple[int, int]], border: str) -> torch.Tensor:
    """Transpose of :func:`_shift_forward`: each output cell sends its gradient where it came from."""
    h, w = grad.shape[-3], grad.shape[-2]
    size = grad.shape[-1] // len(offsets)
    out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    for i, (dy, dx) in enumerate(offsets):
        c0, c1 = i * size, (i + 1) * size
        dst, src = _interior(h, w, dy, dx)
        if not _is_empty(dst):
            _at(out, src, c0, c1).copy_(_at(grad, dst, c0, c1))
        for rect in _complement(src, h, w):  # input cells no content comes from
            _at(out, rect, c0, c1).zero_()
        if border == "keep":  # border cells kept their own input value: add their gradient back
            for rect in _complement(dst, h, w):
                _at(out, rect, c0, c1).add_(_at(grad, rect, c0, c1))
    return out


class _SpatialShiftFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offsets, border):
        ctx.offsets, ctx.border = offsets, border
        return _shift_forward(x, offsets, border)

    @staticmethod
    def backward(ctx, grad):
        return _shift_adjoint(grad, ctx.offsets, ctx.border), None, None


def _check(x: torch.Tensor, offsets: List[Tuple[int, int]], border: str) -> None:
    if border != "keep" and border != "zero":
        raise ValueError("unknown border '" + border + "' (allowed: keep, zero)")
    if x.dim() < 3:
        raise ValueError("spatial shift expects a (..., H, W, C) tensor, got shape " + str(list(x.shape)))
    if x.shape[-1] % len(offsets) != 0:
        raise ValueError(str(x.shape[-1]) + " channels cannot be split into " + str(len(offsets))
                         + " equal shift groups (allowed: a multiple of " + str(len(offsets)) + ")")


def shift_channels(x: torch.Tensor, offsets: List[Tuple[int, int]], border: str = "keep") -> torch.Tensor:
    """Shift channel group ``i`` of a (..., H, W, C) tensor by ``offsets[i]``; ``offsets`` non-empty.

    Eager and compiled: the custom function with its exact adjoint. Scripted: the same forward
    copy, differentiated by autograd.
    """
    _check(x, offsets, border)
    if torch.jit.is_scripting():
        return _shift_forward(x, offsets, border)
    return _SpatialShiftFn.apply(x, offsets, border)


# One opaque call to torch.fx: the rectangles depend on the input's shape, unknown to a symbolic trace.
torch.fx.wrap("shift_channels")


def spatial_shift(x: torch.Tensor, offsets: ShiftSpec, border: Border = "keep") -> torch.Tensor:
    """Shift channel group ``i`` of a (..., H, W, C) tensor by ``offsets[i] = (dy, dx)``.

    ``offsets`` may also be a pattern name (``"four"``, ``"eight"``, ...). Returns a new tensor
    (the input is never written); with no offsets, returns ``x`` itself (the identity).
    """
    offsets = resolve_offsets(offsets)
    return shift_channels(x, offsets, border) if offsets else x


class SpatialShift(nn.Module):
    """Parameter-free spatial shift on (B, H, W, C) activations; see :func:`spatial_shift`.

    Args:
        offsets: one (dy, dx) per channel group, or a pattern name; empty = identity.
        border: ``keep`` (paper pseudo-code: uncovered cells keep their value) or ``zero``.
    """

    # TorchScript holds the offsets as a typed list; ``offsets`` shows them as a tuple.
    offset_list: List[Tuple[int, int]]
    __jit_unused_properties__ = ["offsets", "groups"]

    def __init__(self, offsets: ShiftSpec = "four", border: Border = "keep"):
        super().__init__()
        if border not in BORDERS:
            raise ValueError(f"unknown border {border!r} (allowed: {', '.join(BORDERS)})")
        self.offset_list = resolve_offsets(offsets)
        self.border = border

    @property
    def offsets(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.offset_list)

    @property
    def groups(self) -> int:
        return len(self.offset_list)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.offset_list) == 0:
            return x
        return shift_channels(x, self.offset_list, self.border)

    def extra_repr(self) -> str:
        return f"offsets={shift_label([list(o) for o in self.offset_list])}, border={self.border}"
