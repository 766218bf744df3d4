"""The training augmentation as batched tensor ops on uint8 images (the fast data path).

Decoding JPEGs, not the model, limits a small S²-MLP on a big GPU. The cache path
(:mod:`ablate.data.cache`) and the in-memory digits therefore hand whole uint8 batches to
the transforms here, which run where the batch lives (the GPU when there is one) and stay
uint8 until the last step. The recipe is the folder loader's (timm's ``create_transform``):

1. random resized crop: per-image boxes drawn as torchvision's
   ``RandomResizedCrop.get_params`` draws them, relative to the whole image (area fraction
   in ``(crop_scale, 1)``, aspect ratio in (3/4, 4/3), ten tries, then the centre-crop
   fallback), each box resized to ``size x size`` with bilinear interpolation;
2. horizontal flip with probability ``hflip``;
3. RandAugment (optional): timm's policy, per image (:mod:`ablate.data.rand_augment`);
4. conversion to float32 and normalisation;
5. random erasing (optional; timm's ``RandomErasing`` in pixel mode, vectorised).

A batch is a :class:`~ablate.data.packed.PackedBatch`: images of different sizes (the cache keeps every image
whole, its short side resized) stacked along one axis of one uint8 tensor. Two resize
back-ends crop it, with the same boxes:

* ``"loop"`` (the CPU default): one antialiased bilinear resize per image on uint8
  (PyTorch's uint8 kernel, the same filter as PIL's ``resize``), output uint8;
* ``"roi_align"`` (the CUDA default): one ``torchvision.ops.roi_align`` call over the
  whole packed batch with adaptive sampling (bilinear when enlarging, an average over
  ``ceil(box/size)`` points per output pixel when shrinking), on float.

Both back-ends are plain tensor code that runs on any device; the tests run both on CPU.

All randomness comes from generators seeded by the ``seed`` argument (see
:mod:`ablate.data.seeding`), so a batch is a function of (its pixels, seed) only.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Sequence

import torch
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from ablate.data.constants import CROP_RATIO
from ablate.data.packed import Images, PackedBatch, as_packed, host_to
from ablate.data.rand_augment import BatchRandAugment, timm_hparams
from ablate.data.seeding import derive_seed, generator
from ablate.errors import AblateError

#: timm ``RandomErasing`` defaults
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
_ATTEMPTS = 10


# ---- crop boxes -------------------------------------------------------------------------

def _sizes(n: int, size) -> torch.Tensor:
    return torch.as_tensor(size, dtype=torch.int64).expand(n)


def sample_crop_boxes(heights, widths, scale: Sequence[float], ratio: Sequence[float] = CROP_RATIO, *,
                      g: torch.Generator, n: Optional[int] = None) -> torch.Tensor:
    """Random-resized-crop boxes ``(x0, y0, x1, y1)`` (int64, pixel edges), one per image of
    ``heights`` x ``widths`` (tensors, or ints with ``n``).

    Vectorised ``torchvision.transforms.RandomResizedCrop.get_params``: ten tries of an
    area fraction (of the whole image) uniform in ``scale`` and a log-uniform aspect ratio
    in ``ratio``; the first that fits wins, otherwise the largest centre crop within
    ``ratio``.
    """
    n = len(heights) if n is None else n
    height, width = _sizes(n, heights), _sizes(n, widths)
    area = (height * width).to(torch.float64).unsqueeze(1)
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, _ATTEMPTS, generator=g, dtype=torch.float64))
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(n, _ATTEMPTS, generator=g, dtype=torch.float64))
    w = torch.sqrt(target * aspect).round().long()
    h = torch.sqrt(target / aspect).round().long()
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.long().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    y0 = (u[:, 0] * (height - h + 1).clamp(min=1)).floor().long()
    x0 = (u[:, 1] * (width - w + 1).clamp(min=1)).floor().long()

    found = fits.any(dim=1)
    if not bool(found.all()):  # fallback: centre crop, clamped to the ratio range
        in_ratio = width.double() / height.double()
        narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
        cw = torch.where(wide, (height.double() * max(ratio)).round().long(), width)
        ch = torch.where(narrow, (width.double() / min(ratio)).round().long(), height)
        w, h = torch.where(found, w, cw), torch.where(found, h, ch)
        x0 = torch.where(found, x0, (width - cw) // 2)
        y0 = torch.where(found, y0, (height - ch) // 2)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def center_boxes(heights, widths, fraction: float = 1.0, *, n: Optional[int] = None) -> torch.Tensor:
    """Evaluation boxes: the centre square of side ``round(short side * fraction)`` of each
    image, placed as torchvision's ``CenterCrop`` places it."""
    n = len(heights) if n is None else n
    height, width = _sizes(n, heights), _sizes(n, widths)
    side = (torch.minimum(height, width).double() * fraction).round().long().clamp(min=1)
    y0 = ((height - side).double() / 2).round().long()
    x0 = ((width - side).double() / 2).round().long()
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=1)


# ---- crop and resize ----------------------------------------------------------------------

def default_backend(device: torch.device) -> str:
    return "roi_align" if torch.device(device).type == "cuda" else "loop"


@contextlib.contextmanager
def one_thread(device: torch.device):
    """On CPU, run the batch transform without intra-op threads (a no-op on other devices).

    Most of its ops work on one image or on a few KB of parameters: too small to gain from
    splitting, while each parallel region waits for the slowest thread, which on a busy
    machine made the pipeline 10x slower than one thread. The data loader's gather thread
    keeps a second core busy meanwhile.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _canvas_boxes(batch: PackedBatch, boxes: torch.Tensor) -> torch.Tensor:
    """Boxes in each image's own orientation -> boxes on ``batch.canvas``."""
    x0, y0, x1, y1 = boxes.unbind(1)
    t, s = batch.transposed, batch.start
    return torch.stack([torch.where(t, y0, x0), s + torch.where(t, x0, y0),
                        torch.where(t, y1, x1), s + torch.where(t, x1, y1)], dim=1)


def resize_crops(images: Images, boxes: torch.Tensor, size: int, backend: str = "loop") -> torch.Tensor:
    """Crop ``boxes`` (each image's own coordinates) out of ``images`` and resize each crop to
    ``size x size``: ``(B, C, size, size)``.

    ``loop`` returns uint8; ``roi_align`` returns float32 in 0..255 (see module docstring).
    A box that already has the output size is copied, not resampled, by both.
    """
    batch = as_packed(images)
    canvas, on_canvas, n = batch.canvas, _canvas_boxes(batch, boxes), len(batch)
    if backend == "loop":
        out = torch.empty((n, canvas.shape[1], size, size), dtype=torch.uint8, device=canvas.device)
        for i, ((x0, y0, x1, y1), transposed) in enumerate(zip(on_canvas.tolist(), batch.transposed.tolist())):
            crop = canvas[0, :, y0:y1, x0:x1]
            if transposed:
                crop = crop.transpose(1, 2)
            out[i] = crop if crop.shape[1:] == (size, size) else TF.resize(crop, [size, size], antialias=True)
        return out
    if backend == "roi_align":
        rois = torch.cat([torch.zeros(n, 1), on_canvas.to(torch.float32)], dim=1)
        out = roi_align(canvas.float(), host_to(rois, canvas.device), output_size=(size, size), spatial_scale=1.0,
                        sampling_ratio=0, aligned=True)
        if bool(batch.transposed.any()):
            out = torch.where(host_to(batch.transposed, out.device).view(n, 1, 1, 1), out.transpose(-1, -2), out)
        return out
    raise ValueError(f"unknown resize backend {backend!r} (allowed: loop, roi_align)")


@lru_cache(maxsize=16)
def _normalization(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
    c = len(mean)
    mean255 = torch.tensor(mean, dtype=torch.float32).mul_(255).view(1, c, 1, 1)
    inv_std255 = torch.tensor(std, dtype=torch.float32).mul_(255).reciprocal_().view(1, c, 1, 1)
    return host_to(mean255, device), host_to(inv_std255, device)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else x.round().clamp_(0, 255).to(torch.uint8)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or float in 0..255) -> float32 ``(x/255 - mean) / std``, contiguous NCHW."""
    mean255, inv_std255 = _normalization(tuple(mean), tuple(std), x.device)
    out = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return out.sub_(mean255).mul_(inv_std255)


# ---- random erasing -----------------------------------------------------------------------

def random_erase(x: torch.Tensor, prob: float, *, g: torch.Generator, noise_seed: int) -> torch.Tensor:
    """timm ``RandomErasing(prob, mode="pixel")`` for a whole normalised batch, vectorised.

    With probability ``prob`` per image, one rectangle of area fraction U(0.02, 1/3) and
    log-uniform aspect ratio in (0.3, 1/0.3) (first of ten tries that fits) is replaced by
    per-pixel standard normal noise. ``x`` is changed in place and returned.
    """
    n, _, height, width = x.shape
    apply = torch.rand(n, generator=g) < prob
    target = height * width * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * torch.rand(n, _ATTEMPTS, generator=g))
    aspect = torch.exp(ERASE_LOG_RATIO[0] + (ERASE_LOG_RATIO[1] - ERASE_LOG_RATIO[0]) * torch.rand(n, _ATTEMPTS, generator=g))
    h = torch.sqrt(target * aspect).round().long()
    w = torch.sqrt(target / aspect).round().long()
    fits = (h > 0) & (h < height) & (w > 0) & (w < width)
    first = fits.long().argmax(dim=1, keepdim=True)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    u = torch.rand(n, 2, generator=g)
    top = (u[:, 0] * (height - h + 1)).floor().long()
    left = (u[:, 1] * (width - w + 1)).floor().long()
    apply &= fits.any(dim=1)
    if not bool(apply.any()):
        return x
    # only the erased images, and noise only for the erased pixels: most of a batch is untouched
    chosen = torch.nonzero(apply).squeeze(1)
    dev = x.device
    rows = torch.arange(height, device=dev).view(1, height, 1)
    cols = torch.arange(width, device=dev).view(1, 1, width)
    params = host_to(torch.stack([top[chosen], left[chosen], h[chosen], w[chosen]]), dev).view(4, -1, 1, 1)
    t, l, hh, ww = params[0], params[1], params[2], params[3]
    mask = ((rows >= t) & (rows < t + hh) & (cols >= l) & (cols < l + ww)).unsqueeze(1).expand(-1, x.shape[1], -1, -1)
    count = int((h[chosen] * w[chosen]).sum()) * x.shape[1]  # known on the host: no device sync
    noise = torch.randn(count, generator=generator(noise_seed, device=dev), device=dev, dtype=x.dtype)
    index = host_to(chosen, dev)
    x[index] = x[index].masked_scatter_(mask, noise)
    return x


# ---- the two pipelines --------------------------------------------------------------------

def _expand_channels(x: torch.Tensor, out_chans: int) -> torch.Tensor:
    """Grayscale data (digits) for a model with ``in_chans`` > 1: replicate the channel."""
    if x.shape[1] == out_chans:
        return x
    if x.shape[1] != 1:
        raise AblateError(f"model.in_chans: {out_chans} does not fit {x.shape[1]}-channel images "
                          f"(allowed: {x.shape[1]})")
    return x.expand(-1, out_chans, -1, -1).contiguous()


@dataclass
class TrainBatchTransform:
    """Random resized crop, flip, [RandAugment], normalise, [random erasing] on a uint8 batch."""
    size: int
    scale: tuple[float, float]
    hflip: float
    mean: Sequence[float]
    std: Sequence[float]
    out_chans: int
    randaugment: Optional[str] = None
    random_erasing: float = 0.0
    backend: str = "loop"
    _rand_augment: Optional[BatchRandAugment] = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.randaugment:
            self._rand_augment = BatchRandAugment(self.randaugment, timm_hparams(self.size, self.mean))

    def __call__(self, images: Images, seed: int) -> torch.Tensor:
        batch = as_packed(images)
        with one_thread(batch.pixels.device):
            return self._augment(batch, seed)

    def _augment(self, batch: PackedBatch, seed: int) -> torch.Tensor:
        n = len(batch)
        g = generator(seed)
        boxes = sample_crop_boxes(batch.heights, batch.widths, self.scale, CROP_RATIO, g=g)
        flip = torch.rand(n, generator=g) < self.hflip
        x = resize_crops(batch, boxes, self.size, self.backend)
        if bool(flip.any()):
            flipped = host_to(torch.nonzero(flip).squeeze(1), x.device)
            x[flipped] = x[flipped].flip(-1)
        if self._rand_augment is not None:
            x = self._rand_augment(to_uint8(x), generator(derive_seed(seed, 1)))
        x = normalize(x, self.mean, self.std)
        if self.random_erasing > 0:
            x = random_erase(x, self.random_erasing, g=g, noise_seed=derive_seed(seed, 2))
        return _expand_channels(x, self.out_chans)


@dataclass
class EvalBatchTransform:
    """The centre square of ``crop_fraction`` of each image's short side, resized to ``size``
    (a plain copy when it has that size already), normalised."""
    size: int
    mean: Sequence[float]
    std: Sequence[float]
    out_chans: int
    crop_fraction: float = 1.0
    backend: str = "loop"

    def __call__(self, images: Images, seed: int = 0) -> torch.Tensor:
        batch = as_packed(images)
        boxes = center_boxes(batch.heights, batch.widths, self.crop_fraction)
        with one_thread(batch.pixels.device):
            x = resize_crops(batch, boxes, self.size, self.backend)
            return _expand_channels(normalize(x, self.mean, self.std), self.out_chans)
