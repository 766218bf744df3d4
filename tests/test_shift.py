"""The spatial shift against a plain loop reference, hand-made direction checks, gradients, compile."""
from __future__ import annotations

import pytest
import torch

from ablate.models.shift import SpatialShift, spatial_shift
from ablate.models.shift_patterns import SHIFT_PATTERNS, resolve_offsets

EXPLICIT = {
    "steps_of_two": [[2, 0], [0, -2]],
    "diagonals": [[1, 1], [-1, -1], [1, -1], [-1, 1]],
    "mixed_large": [[0, 3], [-2, 1], [0, 0], [9, 0]],  # 9 >= H: nothing lands, all border
}
CASES = {name: name for name in SHIFT_PATTERNS} | EXPLICIT


def reference_shift(x: torch.Tensor, offsets, border: str) -> torch.Tensor:
    """Element by element, straight from the definition: out[y, x] = in[y - dy, x - dx] if that exists."""
    offsets = resolve_offsets(offsets)
    if not offsets:
        return x.clone()
    *_, h, w, c = x.shape
    size = c // len(offsets)
    out = torch.empty_like(x)
    for g, (dy, dx) in enumerate(offsets):
        for ch in range(g * size, (g + 1) * size):
            for y in range(h):
                for xx in range(w):
                    sy, sx = y - dy, xx - dx
                    if 0 <= sy < h and 0 <= sx < w:
                        out[..., y, xx, ch] = x[..., sy, sx, ch]
                    elif border == "keep":
                        out[..., y, xx, ch] = x[..., y, xx, ch]
                    else:
                        out[..., y, xx, ch] = 0
    return out


@pytest.mark.parametrize("border", ["keep", "zero"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, border):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 8)
    before = x.clone()
    out = SpatialShift(CASES[case], border)(x)
    torch.testing.assert_close(out, reference_shift(x, CASES[case], border), rtol=0, atol=0)
    assert torch.equal(x, before), "the input must not be modified"


def row(values, shift, border="keep", axis="w"):
    """Shift a single line of values with one group; axis w = along W, h = along H."""
    t = torch.tensor(values, dtype=torch.float32)
    x = t.view(1, 1, -1, 1) if axis == "w" else t.view(1, -1, 1, 1)
    return spatial_shift(x, shift, border).flatten().tolist()


def test_directions_by_hand():
    line = [1, 2, 3, 4, 5]
    assert row(line, "right") == [1, 1, 2, 3, 4]           # paper: [0,1,2,3,4] -> [0,0,1,2,3]
    assert row(line, "left") == [2, 3, 4, 5, 5]            # paper: -> [1,2,3,4,4]
    assert row(line, "down", axis="h") == [1, 1, 2, 3, 4]  # content moves to larger row index
    assert row(line, "up", axis="h") == [2, 3, 4, 5, 5]
    assert row(line, "right", "zero") == [0, 1, 2, 3, 4]
    assert row(line, "up", "zero", axis="h") == [2, 3, 4, 5, 0]
    assert row(line, [[0, 2]]) == [1, 2, 1, 2, 3]          # keep: the two left cells keep their values
    assert row(line, [[0, -2]], "zero") == [3, 4, 5, 0, 0]
    assert row(line, [[0, 0]]) == line


def test_groups_follow_offset_order():
    # four channels, pattern "four" = right, left, down, up: channel i is moved by offsets[i]
    x = torch.zeros(1, 3, 3, 4)
    x[0, 1, 1] = 1.0  # a single hot pixel in every channel
    out = spatial_shift(x, "four", "zero")
    hot = [tuple((out[0, :, :, ch] == 1).nonzero()[0].tolist()) for ch in range(4)]
    assert hot == [(1, 2), (1, 0), (2, 1), (0, 1)]
    diag = spatial_shift(x[..., :1], [[1, -1]], "zero")
    assert (diag[0, :, :, 0] == 1).nonzero().tolist() == [[2, 0]]  # down-left


def test_paper_pseudocode_on_a_w_h_c_tensor():
    # The paper's pseudo-code indexes (w, h, c): its first group is x[1:, :, :c/4] = x[:w-1, :, :c/4],
    # i.e. +1 along w; computed out of place it must equal our first group ("right", dx = +1).
    torch.manual_seed(1)
    x = torch.randn(6, 5, 8)  # (H, W, C) for us
    c, w, h = 8, 5, 6
    xw = x.permute(1, 0, 2)   # (w, h, c) as in the paper
    expected = xw.clone()
    expected[1:, :, :c // 4] = xw[:w - 1, :, :c // 4]
    expected[:w - 1, :, c // 4:c // 2] = xw[1:, :, c // 4:c // 2]
    expected[:, 1:, c // 2:3 * c // 4] = xw[:, :h - 1, c // 2:3 * c // 4]
    expected[:, :h - 1, 3 * c // 4:] = xw[:, 1:, 3 * c // 4:]
    torch.testing.assert_close(spatial_shift(x, "four").permute(1, 0, 2), expected, rtol=0, atol=0)


def test_in_place_pseudocode_would_smear():
    # Why the shift is out of place (docs/paper.md, "Pitfall 1"): the naive in-place copy smears row 0.
    x = torch.arange(6.0)
    smeared = x.clone()
    for i in range(1, 6):  # what an overlapping forward copy does element by element
        smeared[i] = smeared[i - 1]
    assert smeared.tolist() == [0.0] * 6
    assert row(list(range(6)), "right") == [0, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("border", ["keep", "zero"])
def test_gradcheck(border):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    for offsets in ("four", "eight", [[2, -1], [0, 0]], [[-3, 2], [5, 0]]):
        assert torch.autograd.gradcheck(lambda t: spatial_shift(t, offsets, border), (x,))


def test_no_offsets_is_identity_and_bad_width_is_an_error():
    x = torch.randn(1, 3, 3, 6)
    assert SpatialShift([])(x) is x
    assert spatial_shift(x, "none") is x
    with pytest.raises(ValueError, match="6 channels cannot be split into 4 equal shift groups"):
        SpatialShift("four")(x)
    with pytest.raises(ValueError, match="unknown border"):
        SpatialShift("four", border="wrap")
    with pytest.raises(ValueError, match="unknown shift pattern"):
        SpatialShift("sideways")


@pytest.mark.slow  # inductor's first compile on a CPU takes tens of seconds
def test_compiled_equals_eager():
    # docs/paper.md, "Pitfall 2": torch.compile has dropped clones in shift code; compare values and gradients.
    torch.manual_seed(0)
    shift = SpatialShift([[0, 1], [-1, 0], [1, -1], [2, 0]], "keep")
    x = torch.randn(2, 4, 4, 8, requires_grad=True)
    compiled = torch.compile(shift, backend="inductor", fullgraph=True)
    eager_out = shift(x)
    compiled_out = compiled(x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=0)
    weight = torch.randn_like(eager_out)
    (g_eager,) = torch.autograd.grad((eager_out * weight).sum(), x)
    (g_compiled,) = torch.autograd.grad((compiled_out * weight).sum(), x)
    torch.testing.assert_close(g_compiled, g_eager, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("border", ["keep", "zero"])
def test_scripted_equals_eager_with_gradients(border):
    # Scripted, the forward copy runs under autograd (a custom Function cannot be scripted); its
    # gradient must be exactly the custom adjoint's.
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 8, requires_grad=True)
    weight = torch.randn(2, 5, 6, 8)
    for case in CASES.values():
        shift = SpatialShift(case, border)
        scripted = torch.jit.script(shift)
        eager_out, scripted_out = shift(x), scripted(x)
        torch.testing.assert_close(scripted_out, eager_out, rtol=0, atol=0)
        (g_eager,) = torch.autograd.grad((eager_out * weight).sum(), x)
        (g_scripted,) = torch.autograd.grad((scripted_out * weight).sum(), x)
        torch.testing.assert_close(g_scripted, g_eager, rtol=0, atol=0)
    with pytest.raises(torch.jit.Error, match="6 channels cannot be split into 4 equal shift groups"):
        torch.jit.script(SpatialShift("four"))(torch.randn(1, 3, 3, 6))


def test_fx_traces_the_shift_as_one_call():
    # The rectangles depend on the input's shape, which a symbolic trace does not know.
    traced = torch.fx.symbolic_trace(SpatialShift("eight", "zero"))
    calls = [n for n in traced.graph.nodes if n.op == "call_function"]
    assert [n.target.__name__ for n in calls] == ["shift_channels"]
    x = torch.randn(2, 4, 4, 16)
    torch.testing.assert_close(traced(x), spatial_shift(x, "eight", "zero"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="12 channels cannot be split into 8 equal shift groups"):
        traced(torch.randn(1, 3, 3, 12))  # the checks run when the traced module runs
