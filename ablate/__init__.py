"""ablate: ablation studies of the S²-MLP vision model (Yu et al., WACV 2022)."""
__version__ = "0.1.0"

from ablate import models  # registers the timm variants  # noqa: E402,F401
