"""``ablate models``: the timm-registered S²-MLP variants, and the cost of any configuration.

The rows are :func:`~ablate.models.cost.model_cost` in the paper's units; the variants are
:data:`ablate.models.s2mlp.VARIANTS`, so listing them imports torch and timm (``ablate models``
does, ``ablate plan`` does not).
"""
from __future__ import annotations

from typing import Iterable, Sequence

from ablate.config import ModelConfig
from ablate.errors import AblateError
from ablate.models import timm_baselines
from ablate.models.zoo import model_cost
from ablate.models.s2mlp import VARIANTS
from ablate.spec.overrides import parse_overrides
from ablate.spec.problems import Problems, option_where, validate_cell
from ablate.text import aligned
from ablate.units import paper_number

COLUMNS = ("name", "width", "depth", "patch", "image", "ratio", "norm", "params_M", "params_Mi", "GMACs")


def cost_row(name: str, model_cfg: ModelConfig, num_classes: int) -> dict[str, object]:
    """A row of the listing; a timm model's is counted (its S²-MLP columns are '-')."""
    if model_cfg.timm is not None:
        problem = timm_baselines.problem(model_cfg, num_classes)
        if problem:
            raise AblateError(f"--set model.timm={model_cfg.timm}: {problem}")
        cost = model_cost(model_cfg, num_classes)
        return {"name": model_cfg.timm, "width": "-", "depth": "-", "patch": "-", "image": model_cfg.image_size,
                "ratio": "-", "norm": "-", "params_M": paper_number(cost.params_m) + " c",
                "params_Mi": paper_number(cost.params_mi) + " c", "GMACs": paper_number(cost.gmacs) + " c"}
    cost = model_cost(model_cfg, num_classes)
    return {"name": name, "width": model_cfg.width, "depth": model_cfg.depth,
            "patch": model_cfg.patch_size, "image": model_cfg.image_size,
            "ratio": f"{model_cfg.mlp_ratio:g}", "norm": model_cfg.norm,
            "params_M": paper_number(cost.params_m), "params_Mi": paper_number(cost.params_mi),
            "GMACs": paper_number(cost.gmacs)}


def variant_rows(num_classes: int = 1000) -> list[dict[str, object]]:
    """One row per timm-registered S²-MLP variant."""
    return [cost_row(name, ModelConfig(**kwargs), num_classes) for name, kwargs in VARIANTS.items()]


def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str] = COLUMNS) -> str:
    """A plain aligned text table (the name left-aligned, the numbers right-aligned)."""
    return "\n".join(aligned(columns, [[str(row[col]) for col in columns] for row in rows]))


def model_config_from_overrides(assignments: Iterable[str], base: str = "s2mlp_wide_16_224") -> ModelConfig:
    """A :class:`ModelConfig` from a registered variant's settings and ``key=value`` overrides.

    Keys are model settings, with or without the ``model.`` prefix; values are YAML
    (``shift=[[0,1],[0,-1]]``), read and checked as a spec's ``--set`` is. Raises
    :class:`AblateError` with one line per problem, each naming its option.
    """
    if base not in VARIANTS:
        raise AblateError(f"--base {base}: unknown variant (allowed: {', '.join(VARIANTS)})")
    settings = [f"model.{name}" for name in ModelConfig.model_fields]
    problems = Problems("--set")
    overrides = parse_overrides(assignments, problems, settings=settings, extra=(), bare_prefix="model.",
                                allowed=", ".join(settings))
    problems.raise_if_any()
    given = {o.key: o for o in overrides}
    values = {f"model.{k}": v for k, v in VARIANTS[base].items()} | {k: o.value for k, o in given.items()}
    config, errors = validate_cell({}, values)
    for dotted, involved, message in errors:
        mine = [k for k in involved if k in given]
        problems.add(given[mine[0]].where if mine else option_where(f"--base {base}"), None, message)
    problems.raise_if_any()
    return config.model
