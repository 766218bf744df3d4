"""Every model a cell can train, by its ``model`` settings: S²-MLP (with any token mixer), or a
timm model (``model.timm``). One answer to what a cell's model is, what it costs and what it keeps
in memory, whichever kind it is: analytic for S²-MLP (paper §3.4, :mod:`.cost`, checked against a
counted pass by the tests), counted for a timm model (:mod:`.timm_baselines`, cached).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ablate.memory import activation_bytes as s2mlp_activation_bytes
from ablate.models import timm_baselines
from ablate.models.cost import Cost
from ablate.models.cost import model_cost as s2mlp_cost

if TYPE_CHECKING:
    from ablate.config import ModelConfig


def build_model(model_cfg: "ModelConfig", num_classes: int):
    """The cell's network: :class:`~ablate.models.s2mlp.S2MLP`, or the timm model it names."""
    if model_cfg.timm is not None:
        return timm_baselines.create(model_cfg, num_classes)
    from ablate.models.s2mlp import build_model as build_s2mlp  # lazy: torch and timm (plan costs without them)

    return build_s2mlp(model_cfg, num_classes)


def model_cost(model_cfg: "ModelConfig", num_classes: int) -> Cost:
    """Parameters and multiply-adds per image; ``Cost.counted`` says whether they were counted."""
    if model_cfg.timm is None:
        return s2mlp_cost(model_cfg, num_classes)
    n = timm_baselines.counted(model_cfg, num_classes)
    return Cost(params_patch=0, params_blocks=0, params_norm=0, params_head=n.params_head, params=n.params,
                params_paper=n.params - n.params_head, macs=n.macs, flops=2 * n.macs, counted=True)


def activation_bytes(model_cfg: "ModelConfig", num_classes: int, precision: str = "bf16", *,
                     grad_checkpointing: bool = False) -> int:
    """Bytes autograd keeps per image in training on CUDA: analytic for S²-MLP; for a timm model,
    counted in fp32 and halved in bf16/fp16 (an estimate: autocast keeps some tensors in fp32), with
    no saving assumed from activation checkpointing."""
    if model_cfg.timm is None:
        return s2mlp_activation_bytes(model_cfg, precision, grad_checkpointing=grad_checkpointing)
    counted = timm_baselines.counted(model_cfg, num_classes).activation_bytes
    return counted // 2 if precision in ("bf16", "fp16") else counted
