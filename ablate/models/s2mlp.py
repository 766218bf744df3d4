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
(c = 768, N = 12) and ``s2mlp_deep_16_224`` (c = 384, N = 36, Affine). They follow timm's model
interface as its MLP-Mixer does: ``forward_features`` / ``forward_head`` / ``reset_classifier``
with ``global_pool`` ``'avg'`` or ``''``, ``forward_intermediates`` and
``prune_intermediate_layers``, one feature per block for ``features_only=True``, gradient
checkpointing, TorchScript, ``torch.fx`` and ``torch.compile``. Features are (B, H, W, C), which
timm calls ``output_fmt = 'NHWC'``.
"""
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Sequence, Union

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, get_device_dtype, lecun_normal_, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
# timm's own models take their indices from here; timm.models does not re-export it
from timm.models._features import feature_take_indices
from torch import nn

from ablate.data.constants import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from ablate.models.mixing import make_token_mixer
from ablate.models.shift import Border, SpatialShift
from ablate.models.shift_patterns import ShiftSpec

if TYPE_CHECKING:
    from ablate.config import ModelConfig

__all__ = ["Affine", "PreNormS2Block", "S2Block", "S2MLP", "VARIANTS", "build_model"]

NormName = Literal["layernorm", "affine"]
GLOBAL_POOLS = ("avg", "")  # "" = no pooling: forward_head keeps (B, H, W, C)
INTERMEDIATE_FORMATS = ("NCHW", "NHWC")


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


class SpatialMlp(nn.Module):
    """The spatial-mixing branch of a block: FC1 -> GELU -> token mixer -> FC2 (all c -> c).

    The mixer is the spatial shift in S²-MLP; :mod:`ablate.models.mixing` has the others.
    """

    def __init__(self, dim: int, make_mixer: Callable[[], nn.Module]):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.mix = make_mixer()
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.mix(self.act(self.fc1(x))))


class S2Block(nn.Module):
    """One S²-MLP block on (B, H, W, C) as the paper draws it: each residual branch ends in a norm.

    ``make_mixer`` builds the token mixer (default: the spatial shift ``shift`` with ``border``).
    """

    def __init__(self, dim: int, hidden: int, shift: ShiftSpec = "four", border: Border = "keep",
                 norm: NormName = "layernorm", drop_path: float = 0.0,
                 make_mixer: Optional[Callable[[], nn.Module]] = None):
        super().__init__()
        make_norm = norm_layer(norm)
        self.norm1 = make_norm(dim)
        self.spatial_mlp = SpatialMlp(dim, make_mixer or partial(SpatialShift, shift, border))
        self.norm2 = make_norm(dim)
        self.channel_mlp = Mlp(dim, hidden, act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.norm1(self.spatial_mlp(x)))
        return x + self.drop_path(self.norm2(self.channel_mlp(x)))


class PreNormS2Block(S2Block):
    """The block most public ports use: each residual branch starts with the norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.spatial_mlp(self.norm1(x)))
        return x + self.drop_path(self.channel_mlp(self.norm2(x)))


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
        token_mixing: the operator between FC1's GELU and FC2: ``shift`` (the paper), ``mlp``
            (MLP-Mixer's token MLP), ``dwconv`` (a learned depthwise conv) or ``none``; see
            :mod:`ablate.models.mixing`.
        token_hidden: hidden size of the ``mlp`` operator (default: half the width).
        kernel_size: side of the ``dwconv`` operator.
        norm: ``layernorm`` or ``affine`` (ResMLP; the paper's deep model).
        norm_position: ``post`` (paper figures: norm ends each branch) or ``pre``.
        drop_path: stochastic-depth rate of the last block; rises linearly from 0 over the blocks.
        num_classes: classifier outputs (0 = no classifier, features only).
        in_chans: input image channels.
        global_pool: ``avg`` (mean over the patches) or ``''`` (none: the head sees (B, H, W, C)).
        drop_rate: dropout before the classifier.
    """

    def __init__(self, image_size: int = 224, patch_size: int = 16, width: int = 768, depth: int = 12,
                 mlp_ratio: float = 4.0, shift: ShiftSpec = "four", border: Border = "keep",
                 norm: NormName = "layernorm", norm_position: Literal["post", "pre"] = "post",
                 drop_path: float = 0.0, num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0, token_mixing: str = "shift",
                 token_hidden: Optional[int] = None, kernel_size: int = 3):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if norm_position not in ("post", "pre"):
            raise ValueError(f"unknown norm_position {norm_position!r} (allowed: post, pre)")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = _check_pool(global_pool)
        self.num_features = self.head_hidden_size = self.embed_dim = width
        self.hidden = int(round(mlp_ratio * width))
        self.norm_position = norm_position
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False
        make_norm = norm_layer(norm)
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, width, norm_layer=make_norm,
                                      output_fmt="NHWC")
        rates = torch.linspace(0, drop_path, depth).tolist()
        block = PreNormS2Block if norm_position == "pre" else S2Block
        make_mixer = partial(make_token_mixer, token_mixing, width, image_size // patch_size, shift, border,
                             token_hidden, kernel_size)
        self.blocks = nn.Sequential(*[block(width, self.hidden, norm=norm, drop_path=rate, make_mixer=make_mixer)
                                      for rate in rates])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=width, reduction=patch_size)
                             for i in range(depth)]
        self.norm = make_norm(width) if norm_position == "pre" else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.head = (nn.Linear(self.num_features, num_classes, **get_device_dtype(self)) if num_classes > 0
                     else nn.Identity())
        _init_weights(self.head)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, list[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Images -> (final features, block outputs), as timm's MLP-Mixer.

        Args:
            indices: blocks to return: the last n if an int, these if a list (negative = from the
                end), all if None.
            norm: pass each returned block output through the final norm (an identity for post-norm models).
            stop_early: run no block after the last one asked for.
            output_fmt: ``NCHW`` (timm's default for intermediates) or ``NHWC`` (as the blocks compute).
            intermediates_only: return only the list of block outputs.
        """
        if output_fmt not in INTERMEDIATE_FORMATS:
            raise ValueError(f"unsupported output_fmt {output_fmt!r} (allowed: NCHW, NHWC)")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.patch_embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            intermediates = [y.permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the norm, the head) for feature extraction."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch features (B, H/p, W/p, c)."""
        x = self.patch_embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self.norm(checkpoint_seq(self.blocks, x))
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"unsupported global_pool {global_pool!r} (allowed: avg, '' for none)")
    return global_pool


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
                 in_chans=m.in_chans, token_mixing=m.token_mixing, token_hidden=m.token_hidden,
                 kernel_size=m.kernel_size)


# ---- timm registration: the paper's two ImageNet-1K settings (224 x 224, p = 16, r = 4) ----

#: registered name -> S2MLP keyword arguments (also listed by ``ablate models``)
VARIANTS: dict[str, dict[str, Any]] = {
    "s2mlp_wide_16_224": dict(image_size=224, patch_size=16, width=768, depth=12, mlp_ratio=4.0),
    "s2mlp_deep_16_224": dict(image_size=224, patch_size=16, width=384, depth=36, mlp_ratio=4.0,
                              norm="affine"),
}

default_cfgs = generate_default_cfgs({
    name: {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (14, 14),
           "crop_pct": EVAL_CROP_PCT, "interpolation": "bicubic", "fixed_input_size": True,
           "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
           "first_conv": "patch_embed.proj", "classifier": "head",
           "paper_ids": "arXiv:2106.07477"}
    for name in VARIANTS})

#: S2MLP's keyword -> timm's (S2MLP takes ``ablate.config.ModelConfig``'s names)
_TIMM_NAMES = {"image_size": "img_size", "drop_path": "drop_path_rate"}


def _timm_names(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    for ours, timms in _TIMM_NAMES.items():
        if ours in kwargs:
            if timms in kwargs:
                raise ValueError(f"{variant}: give {timms} or {ours}, not both")
            kwargs[timms] = kwargs.pop(ours)
    return kwargs


def _s2mlp(variant: str, img_size: Union[int, Sequence[int]], drop_path_rate: float = 0.0,
           **kwargs) -> S2MLP:
    """S2MLP from timm's keywords: ``img_size`` (an int or a square (H, W)) and ``drop_path_rate``."""
    if not isinstance(img_size, int):
        if len(img_size) != 2 or img_size[0] != img_size[1]:
            raise ValueError(f"{variant}: img_size {img_size!r} is not square (allowed: an int or (s, s))")
        img_size = int(img_size[0])
    return S2MLP(image_size=img_size, drop_path=drop_path_rate, **kwargs)


def _create(variant: str, pretrained: bool = False, **kwargs) -> S2MLP:
    if pretrained:
        raise RuntimeError(f"{variant}: no pretrained weights exist (the S²-MLP authors released "
                           "none); create it with pretrained=False and train it")
    # features_only: as timm's MLP-Mixer, the last three blocks through forward_intermediates by
    # default; feature_cls="list", "hook" or "fx" take them from the blocks themselves (in NHWC).
    out_indices = kwargs.pop("out_indices", 3)
    # timm's names all the way to the constructor: the builder records img_size as the model's
    # input size, which timm's scripts read to size their data.
    kwargs = {**_timm_names(variant, VARIANTS[variant]), **_timm_names(variant, kwargs)}
    feature_cfg = dict(out_indices=out_indices, feature_cls="getter", flatten_sequential=True)
    return build_model_with_cfg(partial(_s2mlp, variant), variant, pretrained, feature_cfg=feature_cfg, **kwargs)


@register_model
def s2mlp_wide_16_224(pretrained: bool = False, **kwargs) -> S2MLP:
    """S²-MLP-wide: c = 768, N = 12 (paper: 71M params, 14.0B MACs, 80.0% ImageNet-1K top-1)."""
    return _create("s2mlp_wide_16_224", pretrained, **kwargs)


@register_model
def s2mlp_deep_16_224(pretrained: bool = False, **kwargs) -> S2MLP:
    """S²-MLP-deep: c = 384, N = 36, Affine norm (paper: 51M params, 10.5B MACs, 80.7% top-1)."""
    return _create("s2mlp_deep_16_224", pretrained, **kwargs)
