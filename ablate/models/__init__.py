"""S²-MLP models (arXiv 2106.07477): the spatial shift, the network, its analytic cost.

Importing this package registers the paper's two settings with timm
(``s2mlp_wide_16_224``, ``s2mlp_deep_16_224``). :mod:`ablate.models.shift_patterns` is torch-free
and imported by :mod:`ablate.config`; everything else here needs torch.
"""
from ablate.models.cost import Cost, model_cost
from ablate.models.s2mlp import VARIANTS, Affine, PreNormS2Block, S2Block, S2MLP, build_model
from ablate.models.shift import SpatialShift, spatial_shift
from ablate.models.shift_patterns import SHIFT_PATTERNS, resolve_offsets

__all__ = ["Affine", "Cost", "PreNormS2Block", "S2Block", "S2MLP", "SHIFT_PATTERNS", "SpatialShift",
           "VARIANTS", "build_model", "model_cost", "resolve_offsets", "spatial_shift"]
