"""S²-MLP: Spatial-Shift MLP Architecture for Vision.

Yu, Li, Cai, Sun, Li. WACV 2022, arXiv 2106.07477 (no official code was released).

    image (B, 3, H, W)
      -> patch FC (a Conv2d with kernel = stride = p) -> (B, H/p, W/p, c) -> Norm
      -> N blocks, each (paper figures, norm at the END of each residual branch):
             x = x + Norm(FC2(Shift(GELU(FC1(x)))))      FC1, FC2: c -> c
             x = x + Norm(FC4(GELU(FC3(x))))             FC3: c -> r*c, FC4: r*c -> c
      -> global average pool over the patches -> FC to the classes

Activations stay (B, H, W, C) throughout, so every FC is an ``nn.Linear`` on the last axis
and the shift moves along H and W. ``norm_position="pre"`` gives the block most public ports
use (``x + f(Norm(x))``, plus a final norm before pooling, as in MLP-Mixer and ResMLP, since a
pre-norm residual stream is otherwise never normalised). ``norm="affine"`` is ResMLP's
per-channel scale and shift (Touvron et al., arXiv 2105.03404), which the paper's deep model
uses in place of LayerNorm.

The paper's two ImageNet-1K settings are registered with timm: ``s2mlp_wide_16_224``
(c = 768, N = 12) and ``s2mlp_deep_16_224`` (c = 384, N = 36, Affine).
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, lecun_normal_, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ablate.models.shift import Border, SpatialShift
from ablate.models.shift_patterns import ShiftSpec

if TYPE_CHECKING:
    from ablate.config import ModelConfig

__all__ = ["Affine", "S2Block", "S2MLP", "VARIANTS", "build_model"]

NormName = Literal["layernorm", "affine"]


class Affine(nn.Module):
    """ResMLP's Affine: ``alpha * x + beta`` with per-channel ``alpha`` (init 1) and ``beta`` (init 0)."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, self.alpha, x)


def norm_layer(name: NormName) -> type[nn.Module] | partial:
    if name == "layernorm":
        return partial(nn.LayerNorm, eps=1e-6)
    if name == "affine":
        return Affine
    raise ValueError(f"unknown norm {name!r} (allowed: layernorm, affine)")


class ShiftMlp(nn.Module):
    """The spatial-mixing branch of a block: FC1 -> GELU -> spatial shift -> FC2 (all c -> c)."""

    def __init__(self, dim: int, shift: ShiftSpec, border: Border):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.shift = SpatialShift(shift, border)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.shift(self.act(self.fc1(x))))


class S2Block(nn.Module):
    """One S²-MLP block on (B, H, W, C): a shift branch and a channel-MLP branch, each residual."""

    def __init__(self, dim: int, hidden: int, shift: ShiftSpec = "four", border: Border = "keep",
                 norm: NormName = "layernorm", norm_position: Literal["post", "pre"] = "post",
                 drop_path: float = 0.0):
        super().__init__()
        if norm_position not in ("post", "pre"):
            raise ValueError(f"unknown norm_position {norm_position!r} (allowed: post, pre)")
        self.pre_norm = norm_position == "pre"
        make_norm = norm_layer(norm)
        self.norm1 = make_norm(dim)
        self.spatial_mlp = ShiftMlp(dim, shift, border)
        self.norm2 = make_norm(dim)
        self.channel_mlp = Mlp(dim, hidden, act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop_path(self.spatial_mlp(self.norm1(x)))
            return x + self.drop_path(self.channel_mlp(self.norm2(x)))
        x = x + self.drop_path(self.norm1(self.spatial_mlp(x)))
        return x + self.drop_path(self.norm2(self.channel_mlp(x)))


class S2MLP(nn.Module):
    """S²-MLP (arXiv 2106.07477): patch FC + norm, ``depth`` shift blocks of constant width, GAP + FC.

    Args:
        image_size: input height and width; must be divisible by ``patch_size``.
        patch_size: side p of the non-overlapping patches.
        width: channels c of every block.
        depth: number of blocks N.
        mlp_ratio: expansion r of the channel MLP (hidden = round(r * c)).
        shift: pattern name (``four``, ``eight``, ``up_right``, ..., ``none``) or (dy, dx) offsets.
        border: ``keep`` (paper) or ``zero``; see :mod:`ablate.models.shift`.
        norm: ``layernorm`` or ``affine`` (ResMLP; the paper's deep model).
        norm_position: ``post`` (paper figures: norm ends each branch) or ``pre``.
        drop_path: stochastic-depth rate of the last block; rises linearly from 0 over the blocks.
        num_classes: classifier outputs (0 = no classifier, features only).
        in_chans: input image channels.
    """

    def __init__(self, image_size: int = 224, patch_size: int = 16, width: int = 768, depth: int = 12,
                 mlp_ratio: float = 4.0, shift: ShiftSpec = "four", border: Border = "keep",
                 norm: NormName = "layernorm", norm_position: Literal["post", "pre"] = "post",
                 drop_path: float = 0.0, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = width
        self.hidden = int(round(mlp_ratio * width))
        self.norm_position = norm_position
        make_norm = norm_layer(norm)
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, width, norm_layer=make_norm,
                                      output_fmt="NHWC")
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.Sequential(*[
            S2Block(width, self.hidden, shift, border, norm, norm_position, rate) for rate in rates])
        self.norm = make_norm(width) if norm_position == "pre" else nn.Identity()
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"unsupported global_pool {global_pool!r} (allowed: avg)")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch features (B, H/p, W/p, c)."""
        return self.norm(self.blocks(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    # ViT/Mixer-style: small truncated-normal linears with zero bias; the patch FC scaled by its
    # fan-in (LeCun) so the embedded patches start with unit variance whatever p is.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        lecun_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_model(model_cfg: "ModelConfig", num_classes: int) -> S2MLP:
    """An :class:`S2MLP` from a validated :class:`ablate.config.ModelConfig`."""
    m = model_cfg
    return S2MLP(image_size=m.image_size, patch_size=m.patch_size, width=m.width, depth=m.depth,
                 mlp_ratio=m.mlp_ratio, shift=m.shift, border=m.border, norm=m.norm,
                 norm_position=m.norm_position, drop_path=m.drop_path, num_classes=num_classes,
                 in_chans=m.in_chans)


# ---- timm registration: the paper's two ImageNet-1K settings (224 x 224, p = 16, r = 4) ----

#: registered name -> S2MLP keyword arguments (also listed by ``ablate models``)
VARIANTS: dict[str, dict[str, Any]] = {
    "s2mlp_wide_16_224": dict(image_size=224, patch_size=16, width=768, depth=12, mlp_ratio=4.0),
    "s2mlp_deep_16_224": dict(image_size=224, patch_size=16, width=384, depth=36, mlp_ratio=4.0,
                              norm="affine"),
}

default_cfgs = generate_default_cfgs({
    name: {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
           "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
           "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
           "first_conv": "patch_embed.proj", "classifier": "head",
           "paper_ids": "arXiv:2106.07477"}
    for name in VARIANTS})


def _create(variant: str, pretrained: bool = False, **kwargs) -> S2MLP:
    if pretrained:
        raise RuntimeError(f"{variant}: no pretrained weights exist (the S²-MLP authors released "
                           "none); create it with pretrained=False and train it")
    # timm's convention names the pixel size img_size (an int or an (H, W) pair); S2MLP takes a
    # square image_size. The filter drops the img_size timm itself fills in from the default cfg.
    if "img_size" in kwargs:
        size = kwargs.pop("img_size")
        if not isinstance(size, int):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"{variant}: img_size {size!r} is not square (allowed: an int or (s, s))")
            size = int(size[0])
        kwargs["image_size"] = size
    return build_model_with_cfg(S2MLP, variant, pretrained, kwargs_filter=("img_size",),
                                **{**VARIANTS[variant], **kwargs})


@register_model
def s2mlp_wide_16_224(pretrained: bool = False, **kwargs) -> S2MLP:
    """S²-MLP-wide: c = 768, N = 12 (paper: 71M params, 14.0B MACs, 80.0% ImageNet-1K top-1)."""
    return _create("s2mlp_wide_16_224", pretrained, **kwargs)


@register_model
def s2mlp_deep_16_224(pretrained: bool = False, **kwargs) -> S2MLP:
    """S²-MLP-deep: c = 384, N = 36, Affine norm (paper: 51M params, 10.5B MACs, 80.7% top-1)."""
    return _create("s2mlp_deep_16_224", pretrained, **kwargs)
