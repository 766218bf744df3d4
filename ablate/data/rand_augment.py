"""timm's RandAugment on uint8 image batches: the same policy as the folder loader, per image.

The folder loader runs timm's RandAugment on PIL images (``create_transform``). The tensor
path (cache and in-memory data) must train the same recipe, so this module takes the policy
timm itself builds from the policy string (ops, number of layers, probability, magnitude,
magnitude noise, ``inc`` variants, weighted choice) and applies it to a batch with every
image drawing its own ops, magnitudes and signs, as timm does per image. Each op is a
vectorised tensor version of timm's PIL op, written to PIL's formulas (its grey level,
blend truncation, autocontrast and equalize look-up tables, smoothing kernel, and affine
sampling at pixel centres with the fill colour outside), so the images match PIL's within a
grey level or so (``tests/test_augment.py`` compares every op with timm's on PIL).

Work per batch: one pass per (layer, op) over the images that drew that op, whatever the
batch size, so it runs on the GPU at the speed of the rest of the pipeline.

One deliberate difference from timm 1.0.31, applied to both loaders: posterize keeps at
least one bit (:data:`MIN_POSTERIZE_BITS`). timm's increasing posterize asks for ``4 - int(4 m
/ 10)`` bits, which reaches 0 only when magnitude noise pushes ``m`` to the top of its range;
Pillow refuses 0 bits (``ValueError``), and 0 bits would turn the image black.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from ablate.data.packed import host_to
from ablate.errors import AblateError

#: posterize never keeps fewer bits than this (see the module docstring)
MIN_POSTERIZE_BITS = 1
_LEVEL_DENOM = 10.0  # timm's magnitude scale: 0..10


# ---- level -> op argument, vectorised (timm's auto_augment level_to_arg functions) ----------

def _signed(v: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
    return torch.where(negate, -v, v)


def _frac(level: torch.Tensor) -> torch.Tensor:
    return level / _LEVEL_DENOM


def _posterize_bits(level: torch.Tensor) -> torch.Tensor:
    return torch.trunc(_frac(level) * 4)


def _solarize_threshold(level: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.trunc(_frac(level) * 256), max=256)


def _enhance_increasing(level: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
    return torch.clamp(1.0 + _signed(_frac(level) * 0.9, negate), min=0.1)


LevelFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]

LEVEL_TO_ARG: dict[str, LevelFn] = {
    "AutoContrast": lambda level, negate, hp: torch.zeros_like(level),
    "Equalize": lambda level, negate, hp: torch.zeros_like(level),
    "Invert": lambda level, negate, hp: torch.zeros_like(level),
    "Rotate": lambda level, negate, hp: _signed(_frac(level) * 30.0, negate),
    "Posterize": lambda level, negate, hp: torch.clamp(_posterize_bits(level), min=MIN_POSTERIZE_BITS),
    "PosterizeIncreasing": lambda level, negate, hp: torch.clamp(4 - _posterize_bits(level), min=MIN_POSTERIZE_BITS),
    "PosterizeOriginal": lambda level, negate, hp: _posterize_bits(level) + 4,
    "Solarize": lambda level, negate, hp: _solarize_threshold(level),
    "SolarizeIncreasing": lambda level, negate, hp: 256 - _solarize_threshold(level),
    "SolarizeAdd": lambda level, negate, hp: torch.clamp(torch.trunc(_frac(level) * 110), max=128),
    "Color": lambda level, negate, hp: _frac(level) * 1.8 + 0.1,
    "ColorIncreasing": lambda level, negate, hp: _enhance_increasing(level, negate),
    "Contrast": lambda level, negate, hp: _frac(level) * 1.8 + 0.1,
    "ContrastIncreasing": lambda level, negate, hp: _enhance_increasing(level, negate),
    "Brightness": lambda level, negate, hp: _frac(level) * 1.8 + 0.1,
    "BrightnessIncreasing": lambda level, negate, hp: _enhance_increasing(level, negate),
    "Sharpness": lambda level, negate, hp: _frac(level) * 1.8 + 0.1,
    "SharpnessIncreasing": lambda level, negate, hp: _enhance_increasing(level, negate),
    "ShearX": lambda level, negate, hp: _signed(_frac(level) * 0.3, negate),
    "ShearY": lambda level, negate, hp: _signed(_frac(level) * 0.3, negate),
    "TranslateX": lambda level, negate, hp: _signed(_frac(level) * float(hp["translate_const"]), negate),
    "TranslateY": lambda level, negate, hp: _signed(_frac(level) * float(hp["translate_const"]), negate),
    "TranslateXRel": lambda level, negate, hp: _signed(_frac(level) * hp.get("translate_pct", 0.45), negate),
    "TranslateYRel": lambda level, negate, hp: _signed(_frac(level) * hp.get("translate_pct", 0.45), negate),
}


# ---- the ops, on uint8 (k, C, H, W) with one argument per image (PIL's formulas) ------------

def _beside(t: torch.Tensor, x: torch.Tensor, dtype=None) -> torch.Tensor:
    """``t`` (drawn on the CPU, or computed beside ``x``) on ``x``'s device, without waiting
    for the device (see ``host_to``)."""
    t = t if dtype is None else t.to(dtype)
    return t if t.device == x.device else host_to(t, x.device)


def _per_image(arg: torch.Tensor, x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return _beside(arg, x, dtype).view(-1, 1, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` (ITU-R 601-2 luma in 16-bit fixed point, rounded); int32 (k, 1, H, W)."""
    if x.shape[1] == 1:
        return x.to(torch.int32)
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)``: clipped to 0..255, truncated."""
    d = degenerate.to(torch.float32)
    out = d + _per_image(factor, x) * (x.to(torch.float32) - d)
    return out.clamp_(0, 255).floor_().to(torch.uint8)


def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Apply one 256-entry look-up table per (image, channel): ``lut`` (k*C, 256)."""
    k, c, h, w = x.shape
    flat = x.reshape(k * c, h * w).to(torch.int64)
    return lut.to(torch.uint8).gather(1, flat).view(k, c, h, w)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    k, c, h, w = x.shape
    flat = x.reshape(k * c, h * w).to(torch.int64)
    hist = torch.zeros(k * c, 256, dtype=torch.int64, device=x.device)
    return hist.scatter_add_(1, flat, torch.ones_like(flat))


def auto_contrast(x: torch.Tensor, arg: torch.Tensor, ctx: "_Context") -> torch.Tensor:
    """``ImageOps.autocontrast`` (no cutoff): each channel's range stretched to 0..255."""
    k, c, h, w = x.shape
    flat = x.reshape(k * c, h * w)
    lo, hi = flat.amin(1).to(torch.float64), flat.amax(1).to(torch.float64)
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp(min=1)  # not 255.0 / t: torch multiplies by a reciprocal
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    lut = torch.trunc(levels * scale[:, None] - (lo * scale)[:, None]).clamp_(0, 255)
    lut = torch.where((hi <= lo)[:, None], levels, lut)
    return _lut(x, lut.to(torch.int64))


def equalize(x: torch.Tensor, arg: torch.Tensor, ctx: "_Context") -> torch.Tensor:
    """``ImageOps.equalize``: each channel's histogram flattened (PIL's integer steps)."""
    hist = _histogram(x)
    present = hist > 0
    last_bin = 255 - present.flip(1).to(torch.int64).argmax(1)
    last = hist.gather(1, last_bin[:, None]).squeeze(1)
    step = (hist.sum(1) - last) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2)[:, None] + below) // step.clamp(min=1)[:, None]
    levels = torch.arange(256, device=x.device, dtype=torch.int64).expand_as(lut)
    keep = (present.sum(1) <= 1) | (step == 0)
    return _lut(x, torch.where(keep[:, None], levels, lut).clamp_(0, 255))


def invert(x: torch.Tensor, arg: torch.Tensor, ctx: "_Context") -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, bits: torch.Tensor, ctx: "_Context") -> torch.Tensor:
    """``ImageOps.posterize``: keep the ``bits`` most significant bits (8 or more: unchanged)."""
    drop = (8 - bits.to(torch.int64)).clamp(min=0)
    mask = ((255 >> drop) << drop).to(torch.uint8)
    return x & _beside(mask, x).view(-1, 1, 1, 1)


def solarize(x: torch.Tensor, threshold: torch.Tensor, ctx: "_Context") -> torch.Tensor:
    """``ImageOps.solarize``: values at or above ``threshold`` inverted."""
    return torch.where(x >= _per_image(threshold, x, torch.int32), 255 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor, ctx: "_Context") -> torch.Tensor:
    """timm's ``solarize_add``: ``add`` added (clipped) to values below 128."""
    added = (x.to(torch.int32) + _per_image(add, x, torch.int32)).clamp_(max=255).to(torch.uint8)
    return torch.where(x < 128, added, x)


def color(x: torch.Tensor, factor: torch.Tensor, ctx: "_Context") -> torch.Tensor:
    """``ImageEnhance.Color``: blend with the grey image."""
    return _blend(_grey(x).expand_as(x), x, factor)


def contrast(x: torch.Tensor, factor: torch.Tensor, ctx: "_Context") -> torch.Tensor:
    """``ImageEnhance.Contrast``: blend with the image's mean grey level (rounded)."""
    mean = torch.floor(_grey(x).to(torch.float64).mean(dim=(1, 2, 3)) + 0.5)
    return _blend(_per_image(mean, x).expand_as(x), x, factor)


def brightness(x: torch.Tensor, factor: torch.Tensor, ctx: "_Context") -> torch.Tensor:
    """``ImageEnhance.Brightness``: blend with black."""
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor, ctx: "_Context") -> torch.Tensor:
    """``ImageEnhance.Sharpness``: blend with PIL's SMOOTH filter (3x3, centre 5, /13; the
    one-pixel border stays as it is)."""
    k, c, h, w = x.shape
    kernel = torch.ones(3, 3, device=x.device, dtype=torch.float32)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    smooth = torch.nn.functional.conv2d(x.to(torch.float32), kernel, groups=c)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = (smooth + 0.5).floor_().clamp_(0, 255).to(torch.uint8)
    return _blend(degenerate, x, factor)


def _affine(x: torch.Tensor, matrices: torch.Tensor, ctx: "_Context") -> torch.Tensor:
    """PIL's ``Image.transform(AFFINE, (a, b, c, d, e, f), BILINEAR, fillcolor)`` per image.

    The output pixel centred at (x + .5, y + .5) samples the input at (a x' + b y' + c,
    d x' + e y' + f) with x' = x + .5, y' = y + .5: bilinear with edge pixels repeated
    inside the image, the fill colour outside it.
    """
    k, c, h, w = x.shape
    m = _beside(matrices, x, torch.float32).view(k, 6, 1, 1)
    ys = torch.arange(h, device=x.device, dtype=torch.float32).add_(0.5).view(1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=torch.float32).add_(0.5).view(1, 1, w)
    x_in = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]
    y_in = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    grid = torch.stack([x_in * (2.0 / w) - 1, y_in * (2.0 / h) - 1], dim=-1)
    out = torch.nn.functional.grid_sample(x.to(torch.float32), grid, mode="bilinear", padding_mode="border",
                                          align_corners=False)
    out = torch.where(inside.unsqueeze(1), out, ctx.fill_for(x))
    return out.floor_().clamp_(0, 255).to(torch.uint8)


def _matrices(a, b, c, d, e, f) -> torch.Tensor:
    return torch.stack(torch.broadcast_tensors(*[torch.as_tensor(v, dtype=torch.float64) for v in (a, b, c, d, e, f)]),
                       dim=1)


def rotate(x: torch.Tensor, degrees: torch.Tensor, ctx: "_Context") -> torch.Tensor:
    """``Image.rotate(degrees)`` about the image centre, counter-clockwise, same size."""
    h, w = x.shape[-2:]
    angle = -torch.deg2rad(degrees.to(torch.float64))
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    return _affine(x, _matrices(cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy), ctx)


def shear_x(x, factor, ctx):
    return _affine(x, _matrices(1, factor, 0, 0, 1, 0), ctx)


def shear_y(x, factor, ctx):
    return _affine(x, _matrices(1, 0, 0, factor, 1, 0), ctx)


def translate_x(x, pixels, ctx):
    return _affine(x, _matrices(1, 0, pixels, 0, 1, 0), ctx)


def translate_y(x, pixels, ctx):
    return _affine(x, _matrices(1, 0, 0, 0, 1, pixels), ctx)


def translate_x_rel(x, fraction, ctx):
    return translate_x(x, fraction * x.shape[-1], ctx)


def translate_y_rel(x, fraction, ctx):
    return translate_y(x, fraction * x.shape[-2], ctx)


OpFn = Callable[[torch.Tensor, torch.Tensor, "_Context"], torch.Tensor]

NAME_TO_OP: dict[str, OpFn] = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert, "Rotate": rotate,
    "Posterize": posterize, "PosterizeIncreasing": posterize, "PosterizeOriginal": posterize,
    "Solarize": solarize, "SolarizeIncreasing": solarize, "SolarizeAdd": solarize_add,
    "Color": color, "ColorIncreasing": color, "Contrast": contrast, "ContrastIncreasing": contrast,
    "Brightness": brightness, "BrightnessIncreasing": brightness,
    "Sharpness": sharpness, "SharpnessIncreasing": sharpness,
    "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x, "TranslateY": translate_y,
    "TranslateXRel": translate_x_rel, "TranslateYRel": translate_y_rel,
}


@dataclass
class _Context:
    fill: tuple[int, ...]

    def fill_for(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        fill = self.fill if len(self.fill) == c else self.fill[:1] * c
        return torch.tensor(fill, dtype=torch.float32, device=x.device).view(1, c, 1, 1)


# ---- the policy ---------------------------------------------------------------------------

def timm_hparams(image_size: int, mean: Sequence[float]) -> dict:
    """The hyper-parameters timm's ``create_transform`` hands its augmentation policies
    (``translate_const``, ``img_mean``; bilinear resampling, as the folder loader asks)."""
    return {"translate_const": int(image_size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean),
            "interpolation": Image.BILINEAR}


class BatchRandAugment:
    """A timm RandAugment policy string (e.g. ``rand-m9-mstd0.5-inc1``) applied per image to a
    uint8 batch ``(B, C, H, W)``.

    timm parses the string and builds its policy; this class reads that policy (op names,
    layers, probability, magnitude and its noise and maximum, choice weights) and runs it
    with the ops above. Randomness comes from the generator passed to each call.
    """

    def __init__(self, policy: str, hparams: dict):
        if not policy.startswith("rand"):
            raise AblateError(f"train.randaugment: {policy!r}: the tensor data path runs RandAugment policies only "
                              "(allowed: rand-m<M>[-n<N>][-mstd<S>][-inc1]..., or data.loader: folder for "
                              "AutoAugment and AugMix)")
        try:
            timm_policy = rand_augment_transform(policy, dict(hparams))
        except (AssertionError, ValueError, KeyError) as e:
            raise AblateError(f"train.randaugment: {policy!r} is not a timm augmentation policy "
                              f"({e or 'unknown section'}; allowed: e.g. rand-m9-mstd0.5-inc1)") from None
        ops = timm_policy.ops
        unknown = sorted({op.name for op in ops} - set(NAME_TO_OP))
        if unknown:
            raise AblateError(f"train.randaugment: {policy!r} uses {', '.join(unknown)}, which the tensor data "
                              "path does not implement (allowed: the default RandAugment op sets, or "
                              "data.loader: folder)")
        first = ops[0]
        self.names = [op.name for op in ops]
        self.num_layers = timm_policy.num_layers
        self.weights = None if timm_policy.choice_weights is None else torch.as_tensor(timm_policy.choice_weights)
        self.prob = first.prob
        self.magnitude = float(first.magnitude)
        self.magnitude_std = float(first.magnitude_std)
        self.magnitude_max = float(first.magnitude_max or _LEVEL_DENOM)
        self.hparams = first.hparams
        self.context = _Context(tuple(int(v) for v in hparams["img_mean"]))

    def _choices(self, n: int, g: torch.Generator) -> torch.Tensor:
        """(n, layers) op indices: uniform with replacement, or weighted without (as timm's
        ``np.random.choice``; Gumbel top-k is sequential weighted sampling without replacement)."""
        if self.weights is None:
            return torch.randint(len(self.names), (n, self.num_layers), generator=g)
        gumbel = -torch.log(-torch.log(torch.rand(n, len(self.names), generator=g, dtype=torch.float64)))
        return (self.weights.log() + gumbel).topk(self.num_layers, dim=1).indices

    def _magnitudes(self, n: int, g: torch.Generator) -> torch.Tensor:
        if self.magnitude_std == math.inf:
            m = self.magnitude * torch.rand(n, generator=g, dtype=torch.float64)
        elif self.magnitude_std > 0:
            m = self.magnitude + self.magnitude_std * torch.randn(n, generator=g, dtype=torch.float64)
        else:
            m = torch.full((n,), self.magnitude, dtype=torch.float64)
        return m.clamp(0.0, self.magnitude_max)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = len(x)
        choices = self._choices(n, g)
        out = x.clone()
        for layer in range(self.num_layers):
            applied = torch.rand(n, generator=g, dtype=torch.float64) <= self.prob
            level = self._magnitudes(n, g)
            negate = torch.rand(n, generator=g, dtype=torch.float64) > 0.5
            for k, name in enumerate(self.names):
                rows = torch.nonzero(applied & (choices[:, layer] == k)).squeeze(1)
                if len(rows) == 0:
                    continue
                arg = LEVEL_TO_ARG[name](level[rows], negate[rows], self.hparams)
                index = _beside(rows, x)
                out[index] = NAME_TO_OP[name](out[index], arg, self.context)
        return out

