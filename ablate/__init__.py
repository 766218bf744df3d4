"""ablate: ablation studies of the S²-MLP vision model (Yu et al., WACV 2022).

Importing ``ablate`` imports neither torch nor timm, so the command line starts fast. The timm
model names (``s2mlp_wide_16_224``, ``s2mlp_deep_16_224``) are registered by ``import
ablate.models`` (see :mod:`ablate.models`).
"""
__version__ = "0.1.0"
