"""The training augmentation as batched tensor ops on uint8 images (the fast data path).

Decoding JPEGs, not the model, limits a small S²-MLP on a big GPU. The cache path
(:mod:`ablate.data.cache`) and the in-memory digits therefore hand whole uint8 batches
``(B, C, H, W)`` to the transforms here, which run where the batch lives (the GPU when
there is one) and stay uint8 until the last step:

1. random resized crop: per-sample boxes drawn exactly as torchvision's
   ``RandomResizedCrop.get_params`` does (scale ``(crop_scale, 1)``, aspect ratio (3/4, 4/3),
   ten tries, then a centre crop), each box resized to ``size x size`` with bilinear
   interpolation;
2. horizontal flip with probability ``hflip``;
3. RandAugment (optional; torchvision's ops on uint8 tensors, see :class:`TensorRandAugment`);
4. conversion to float32 and normalisation;
5. random erasing (optional; timm's ``RandomErasing`` in pixel mode, vectorised).

Two resize back-ends give the same crops:

* ``"loop"`` (CPU): one antialiased bilinear resize per image on uint8 (PyTorch's
  vectorised uint8 kernel, the same filter as PIL's ``resize``), output uint8;
* ``"roi_align"`` (CUDA): one batched ``torchvision.ops.roi_align`` call with adaptive
  sampling (bilinear when enlarging, an average over ``ceil(box/size)`` points per output
  pixel when shrinking), on float.

All randomness comes from generators seeded by the ``seed`` argument (see
:mod:`ablate.data.seeding`), so a batch is a function of (its pixels, seed) only.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Sequence

import torch

from ablate.data.seeding import derive_seed, generator, seeded_global_rngs
from ablate.errors import AblateError

CROP_RATIO = (3 / 4, 4 / 3)
#: timm ``RandomErasing`` defaults
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
_ATTEMPTS = 10


# ---- crop boxes -------------------------------------------------------------------------

def sample_crop_boxes(n: int, height: int, width: int, scale: Sequence[float],
                      ratio: Sequence[float] = CROP_RATIO, *, g: torch.Generator) -> torch.Tensor:
    """``n`` random-resized-crop boxes ``(x0, y0, x1, y1)`` (int64, pixel edges).

    Vectorised ``torchvision.transforms.RandomResizedCrop.get_params``: ten tries of an
    area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``; the first
    that fits wins, otherwise the largest centre crop within ``ratio``.
    """
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, _ATTEMPTS, generator=g, dtype=torch.float64))
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(n, _ATTEMPTS, generator=g, dtype=torch.float64))
    w = torch.sqrt(target * aspect).round().long()
    h = torch.sqrt(target / aspect).round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    y0 = (u[:, 0] * (height - h + 1).clamp(min=1)).floor().long()
    x0 = (u[:, 1] * (width - w + 1).clamp(min=1)).floor().long()

    found = fits.any(dim=1)
    if not bool(found.all()):  # fallback: centre crop, clamped to the ratio range
        in_ratio = width / height
        if in_ratio < min(ratio):
            cw, ch = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            cw, ch = int(round(height * max(ratio))), height
        else:
            cw, ch = width, height
        w, h = torch.where(found, w, cw), torch.where(found, h, ch)
        x0 = torch.where(found, x0, (width - cw) // 2)
        y0 = torch.where(found, y0, (height - ch) // 2)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def center_boxes(n: int, height: int, width: int, fraction: float = 1.0) -> torch.Tensor:
    """``n`` identical centre boxes covering ``fraction`` of each side (evaluation crops)."""
    ch, cw = max(1, round(height * fraction)), max(1, round(width * fraction))
    y0, x0 = (height - ch) // 2, (width - cw) // 2
    return torch.tensor([[x0, y0, x0 + cw, y0 + ch]], dtype=torch.long).expand(n, 4)


# ---- resize -----------------------------------------------------------------------------

def default_backend(device: torch.device) -> str:
    return "roi_align" if device.type == "cuda" else "loop"


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


def resize_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, backend: str = "loop") -> torch.Tensor:
    """Crop ``boxes`` out of ``images`` (uint8, B x C x H x W) and resize each to ``size x size``.

    ``loop`` returns uint8; ``roi_align`` returns float32 in 0..255 (see module docstring).
    """
    if backend == "loop":
        from torchvision.transforms.v2 import functional as TF

        out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8, device=images.device)
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            out[i] = TF.resize(images[i, :, y0:y1, x0:x1], [size, size], antialias=True)
        return out
    if backend == "roi_align":
        from torchvision.ops import roi_align

        rois = torch.cat([torch.arange(len(images), dtype=torch.float32).unsqueeze(1),
                          boxes.to(torch.float32)], dim=1)
        rois = host_to(rois, images.device)
        return roi_align(images.float(), rois, output_size=(size, size), spatial_scale=1.0,
                         sampling_ratio=0, aligned=True)
    raise ValueError(f"unknown resize backend {backend!r} (allowed: loop, roi_align)")


def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor (boxes, masks) to ``device``. On CUDA through pinned memory and
    non-blocking, so the CPU never waits for the GPU to finish the previous training step."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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


# ---- RandAugment and random erasing -------------------------------------------------------

class TensorRandAugment:
    """A timm RandAugment policy string (``rand-m9-n2-mstd0.5-inc1``) on uint8 tensors.

    Runs torchvision's ``RandAugment`` (``num_ops = n``, magnitude ``m`` on timm's 0..10 scale,
    a Gaussian magnitude jitter of ``mstd`` as timm does; ``inc``/``mmax``/``w`` sections are
    accepted and not modelled: torchvision's ops are already the "increasing" variants). The
    ops and magnitude are drawn per group of ``group_size`` consecutive images of a batch
    (timm draws them per image): each op call costs about a millisecond of Python whatever
    the image size, so per-image ops would make RandAugment the slowest step of the tensor
    path; crops and flips stay per image. Empty-space fill is the dataset mean.
    """

    def __init__(self, policy: str, fill: Sequence[int], group_size: int = 8):
        sections = policy.split("-")
        if sections[0] != "rand":
            raise AblateError(f"train.randaugment: {policy!r} is not supported by the tensor data path "
                              "(allowed: a RandAugment policy rand-m<M>[-n<N>][-mstd<S>]..., or data.loader: folder)")
        self.magnitude, self.num_ops, self.magnitude_std = 10.0, 2, 0.0  # timm's defaults
        for section in sections[1:]:
            m = re.fullmatch(r"([a-z]+)(.*)", section)
            if not m:
                raise AblateError(f"train.randaugment: {policy!r}: cannot read section {section!r}")
            key, value = m.groups()
            try:
                if key == "m":
                    self.magnitude = float(value)
                elif key == "n":
                    self.num_ops = int(value)
                elif key == "mstd":
                    self.magnitude_std = float(value)
                elif key not in ("inc", "mmax", "w", "p"):
                    raise ValueError
            except ValueError:
                raise AblateError(f"train.randaugment: {policy!r}: bad section {section!r} "
                                  "(allowed: m<float>, n<int>, mstd<float>, inc<0|1>, mmax<float>)") from None
        self.fill = list(fill)
        self.group_size = group_size
        self._ops: dict[int, torch.nn.Module] = {}

    def _op(self, magnitude: float) -> torch.nn.Module:
        from torchvision.transforms import v2

        level = round(min(10.0, max(0.0, magnitude)) * 10)  # timm's 0..10 scale, in steps of 0.1
        if level not in self._ops:
            self._ops[level] = v2.RandAugment(num_ops=self.num_ops, magnitude=level, num_magnitude_bins=101,
                                              fill=self.fill)
        return self._ops[level]

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        import random

        out = images.clone()
        with seeded_global_rngs(seed):  # torchvision draws the ops from torch's global RNG
            for start in range(0, len(out), self.group_size):
                m = random.gauss(self.magnitude, self.magnitude_std) if self.magnitude_std > 0 else self.magnitude
                group = slice(start, start + self.group_size)
                out[group] = self._op(m)(out[group])
        return out


def random_erase(x: torch.Tensor, prob: float, *, g: torch.Generator, noise_seed: int) -> torch.Tensor:
    """timm ``RandomErasing(prob, mode="pixel")`` for a whole normalised batch, vectorised.

    With probability ``prob`` per image, one rectangle of area fraction U(0.02, 1/3) and
    log-uniform aspect ratio in (0.3, 1/0.3) (first of ten tries that fits) is replaced by
    per-pixel standard normal noise.
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
    dev = x.device
    rows = torch.arange(height, device=dev).view(1, height, 1)
    cols = torch.arange(width, device=dev).view(1, 1, width)
    params = host_to(torch.stack([top, left, h, w, apply.long()]), dev).view(5, n, 1, 1)
    top, left, h, w, apply = params[0], params[1], params[2], params[3], params[4].bool()
    mask = apply & (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    noise = torch.randn(x.shape, generator=generator(noise_seed, device=dev), device=dev, dtype=x.dtype)
    return torch.where(mask.unsqueeze(1), noise, x)


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
    _rand_augment: Optional[TensorRandAugment] = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.randaugment:
            fill = [min(255, round(255 * m)) for m in self.mean]
            self._rand_augment = TensorRandAugment(self.randaugment, fill)

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        with one_thread(images.device):
            return self._augment(images, seed)

    def _augment(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        n, _, height, width = images.shape
        g = generator(seed)
        boxes = sample_crop_boxes(n, height, width, self.scale, CROP_RATIO, g=g)
        flip = torch.rand(n, generator=g) < self.hflip
        x = resize_crops(images, boxes, self.size, self.backend)
        if bool(flip.any()):
            x = torch.where(host_to(flip, x.device).view(n, 1, 1, 1), x.flip(-1), x)
        if self._rand_augment is not None:
            x = self._rand_augment(to_uint8(x), derive_seed(seed, 1))
        x = normalize(x, self.mean, self.std)
        if self.random_erasing > 0:
            x = random_erase(x, self.random_erasing, g=g, noise_seed=derive_seed(seed, 2))
        return _expand_channels(x, self.out_chans)


@dataclass
class EvalBatchTransform:
    """Centre crop of ``crop_fraction`` of each side, resize to ``size``, normalise."""
    size: int
    mean: Sequence[float]
    std: Sequence[float]
    out_chans: int
    crop_fraction: float = 1.0
    backend: str = "loop"

    def __call__(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        n, _, height, width = images.shape
        boxes = center_boxes(n, height, width, self.crop_fraction)
        with one_thread(images.device):
            if self.backend == "loop" and (boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]) == (self.size, self.size):
                x0, y0, x1, y1 = boxes[0].tolist()
                x = images[:, :, y0:y1, x0:x1]  # already the right size: a plain crop
            else:
                x = resize_crops(images, boxes, self.size, self.backend)
            return _expand_channels(normalize(x, self.mean, self.std), self.out_chans)
