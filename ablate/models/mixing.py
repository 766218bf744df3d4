"""What mixes the patches inside an S²-MLP block: the operator between FC1's GELU and FC2.

The paper's argument (Yu et al., arXiv 2106.07477, §3) is a comparison of these operators.
MLP-Mixer's token-mixing MLP equals a depthwise convolution with a global receptive field and
weights specific to each position; the paper argues that both properties overfit without huge
pre-training, and replaces it with the spatial shift: local, position-agnostic, parameter-free.
Swapping only this operator, with everything else in the block and the recipe equal, asks which
property matters:

======== ================ ================== ========== =======================================
name     receptive field  weights per patch  learned    module
======== ================ ================== ========== =======================================
shift    local (±1)       shared             no         :class:`~ablate.models.shift.SpatialShift`
dwconv   local (k x k)    shared             yes        :class:`DepthwiseConv`
mlp      global           one per position   yes        :class:`TokenMixingMlp` (MLP-Mixer)
none     none             -                  -          ``SpatialShift("none")``: the paper's FF
======== ================ ================== ========== =======================================

Every operator maps (B, H, W, C) to (B, H, W, C), the layout of the whole network.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import Mlp
from torch import nn

from ablate.models.shift import Border, SpatialShift
from ablate.models.shift_patterns import ShiftSpec

__all__ = ["TOKEN_MIXERS", "DepthwiseConv", "TokenMixingMlp", "make_token_mixer"]


class TokenMixingMlp(nn.Module):
    """MLP-Mixer's token mixing (Tolstikhin et al., arXiv 2105.01601): per channel, an MLP across
    the ``H * W`` patches (``H*W -> hidden -> H*W``, GELU), as timm's ``MixerBlock.mlp_tokens``.

    Its weights are sized by the number of patches, so it ties the model to one image and patch size.
    """

    def __init__(self, grid: int, hidden: int):
        super().__init__()
        self.grid = grid
        self.mlp_tokens = Mlp(grid * grid, hidden, act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        torch._assert(h == self.grid and w == self.grid, "token-mixing MLP: the patch grid differs from the one "
                      "it was built for (its weights are sized by the number of patches)")
        tokens = self.mlp_tokens(x.reshape(b, h * w, c).transpose(1, 2))  # (B, C, M): mix along M
        return tokens.transpose(1, 2).reshape(b, h, w, c)


class DepthwiseConv(nn.Module):
    """A learned ``k x k`` depthwise convolution over the patch grid, zero-padded to keep its size:
    local and position-agnostic like the shift (a fixed depthwise 3 x 3 convolution), but learned.

    The (B, H, W, C) input is viewed as channels-last (B, C, H, W) without a copy, so the
    convolution runs in the network's own layout, as the shift does.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


TOKEN_MIXERS = ("shift", "mlp", "dwconv", "none")


def make_token_mixer(token_mixing: str, dim: int, grid: int, shift: ShiftSpec = "four", border: Border = "keep",
                     token_hidden: Optional[int] = None, kernel_size: int = 3) -> nn.Module:
    """The operator ``token_mixing`` names for a block of width ``dim`` on a ``grid x grid`` patch grid;
    the MLP's hidden size defaults to half the width, as MLP-Mixer's."""
    if token_mixing == "mlp":
        return TokenMixingMlp(grid, token_hidden or max(1, int(0.5 * dim)))
    if token_mixing == "dwconv":
        return DepthwiseConv(dim, kernel_size)
    if token_mixing in ("shift", "none"):
        return SpatialShift("none" if token_mixing == "none" else shift, border)
    raise ValueError(f"unknown token_mixing {token_mixing!r} (allowed: {', '.join(TOKEN_MIXERS)})")
