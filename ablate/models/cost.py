"""Analytic parameter and multiply-add counts of S²-MLP (Yu et al., arXiv 2106.07477, §3.4).

With c the width, h = round(r c) the hidden width, p the patch side, M the number of patches,
N the depth, k the number of classes and C the input channels:

* patch FC:  params (C p² + 1) c                        MACs M c C p²
* one block: params 2c² + 2ch + 3c + h  (= c²(2r+2) + c(3+r), norms excluded)
                                                        MACs M (2c² + 2ch)  (= M c²(2r+2))
* norms:     2c each (LayerNorm weight and bias, or Affine alpha and beta): one after the
             patch FC, two per block, and a final one for pre-norm models. No MACs counted.
* head:      params (c + 1) k                           MACs c k

The token mixer inside each block (``model.token_mixing``, :mod:`ablate.models.mixing`) adds,
per block, nothing for ``shift`` and ``none``, and for

* ``mlp`` (hidden t, across the M patches): params 2Mt + t + M       MACs 2 c M t
* ``dwconv`` (kernel k x k, depthwise):     params c k² + c          MACs M c k²

``macs`` counts one per multiply-add, as the paper (and DeiT, MLP-Mixer) does under the name
"FLOPs"; ``flops = 2 * macs`` is what ``torch.utils.flop_counter`` reports. GELU, norms,
pooling, residual additions and the shift (a copy) are not counted, as in the paper.

Paper units. The paper's parameter columns exclude the classifier (and we exclude the norms,
like its formula). Its "M" is not used consistently:

* every row at width 768 (S²-MLP-wide, the depth, ratio, patch and input-size ablations)
  matches ``params_paper / 1e6`` (wide: 71.43 -> "71M"; 2^20 would give 68.1);
* S²-MLP-deep (53.48 -> "51M") and the width ablations at c = 192, 384, 576, 960
  (4.59 / 18.03 / 40.30 / 111.41 -> "4.3M" / "17M" / "38M" / "106M") match
  ``params_paper / 2**20`` only (4.37 / 17.19 / 38.44 / 106.25).

No single unit reproduces all rows within 2%, so :class:`Cost` offers both: ``params_m``
(10^6, the SI reading and the headline model's) and ``params_mi`` (2^20). The MAC columns are
decimal billions (``gmacs``) except width 960, whose "20B" fits only 2^30 (21.82e9 = 20.32 Gi),
like its params column; patch 32 ("3.5B" against 3.58, +2.4%) fits no unit within 2% and
matches the block MACs alone (3.47B). ``tests/test_cost.py`` lists every row with the unit it
matches.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ablate.units import PaperUnits

if TYPE_CHECKING:
    from ablate.config import ModelConfig


@dataclass(frozen=True)
class Cost(PaperUnits):
    """Parameter and multiply-add counts of one S²-MLP configuration (all plain ints)."""

    params_patch: int   # patch FC (conv) weight and bias
    params_blocks: int  # the N blocks' four FCs, norms excluded
    params_norm: int    # every LayerNorm / Affine parameter
    params_head: int    # classifier weight and bias
    params: int         # total: equals the module's parameter count
    params_paper: int   # paper convention: patch FC + blocks (classifier and norms excluded)
    macs: int           # multiply-adds per image: patch FC + blocks + head
    flops: int          # 2 * macs (what torch.utils.flop_counter counts)
    counted: bool = False  # counted on a forward pass (a timm model: no breakdown, the parts are 0)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "counted"}


def model_cost(model_cfg: "ModelConfig", num_classes: int) -> Cost:
    """Analytic cost of the :class:`~ablate.models.S2MLP` that ``build_model(model_cfg, num_classes)`` builds."""
    c, h, n = model_cfg.width, model_cfg.hidden, model_cfg.depth
    p, m, k = model_cfg.patch_size, model_cfg.num_patches, num_classes
    patch_in = model_cfg.in_chans * p * p

    params_patch = (patch_in + 1) * c
    mixer_params, mixer_macs = token_mixer_cost(model_cfg)
    params_blocks = n * (2 * c * c + 2 * c * h + 3 * c + h + mixer_params)
    norms = 1 + 2 * n + (1 if model_cfg.norm_position == "pre" else 0)
    params_norm = norms * 2 * c
    params_head = (c + 1) * k if k > 0 else 0
    macs = m * c * patch_in + n * (m * (2 * c * c + 2 * c * h) + mixer_macs) + c * k
    return Cost(
        params_patch=params_patch, params_blocks=params_blocks, params_norm=params_norm,
        params_head=params_head, params=params_patch + params_blocks + params_norm + params_head,
        params_paper=params_patch + params_blocks, macs=macs, flops=2 * macs)


def token_mixer_cost(model_cfg: "ModelConfig") -> tuple[int, int]:
    """(params, multiply-adds per image) of one block's token mixer; the shift's are zero."""
    c, m = model_cfg.width, model_cfg.num_patches
    if model_cfg.token_mixing == "mlp":
        t = model_cfg.token_mlp_hidden
        return 2 * m * t + t + m, 2 * c * m * t
    if model_cfg.token_mixing == "dwconv":
        k2 = model_cfg.kernel_size ** 2
        return c * k2 + c, m * c * k2
    return 0, 0
