"""Analytic cost against a counted pass of the real module, and against every number in the paper."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from ablate.cli import cli
from ablate.config import ModelConfig
from ablate.models import model_cost
from ablate.models.s2mlp import build_model

CONFIGS = [
    dict(image_size=32, patch_size=8, width=16, depth=1, mlp_ratio=4),
    dict(image_size=32, patch_size=4, width=24, depth=2, mlp_ratio=1.5, norm="affine"),
    dict(image_size=48, patch_size=16, width=32, depth=3, mlp_ratio=3, norm_position="pre",
         shift="eight", in_chans=1),
    dict(image_size=24, patch_size=6, width=20, depth=2, mlp_ratio=2, shift="none", border="zero"),
    # the other token mixers (ablate/models/mixing.py): their weights counted as the module holds them
    dict(image_size=32, patch_size=4, width=16, depth=2, mlp_ratio=2, token_mixing="mlp"),
    dict(image_size=30, patch_size=5, width=12, depth=1, mlp_ratio=3, token_mixing="mlp", token_hidden=7,
         norm_position="pre"),
    dict(image_size=32, patch_size=8, width=16, depth=2, mlp_ratio=4, token_mixing="dwconv"),
    dict(image_size=48, patch_size=8, width=8, depth=1, mlp_ratio=1, token_mixing="dwconv", kernel_size=5,
         norm="affine"),
    dict(image_size=32, patch_size=8, width=16, depth=2, mlp_ratio=4, token_mixing="none"),
]


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("num_classes", [10, 0])
def test_counts_match_the_module(overrides, num_classes):
    cfg = ModelConfig(**overrides)
    cost = model_cost(cfg, num_classes)
    model = build_model(cfg, num_classes)
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.params_patch == sum(p.numel() for p in model.patch_embed.proj.parameters())
    assert cost.params_head == sum(p.numel() for p in model.head.parameters())
    norms = [m for name, m in model.named_modules() if name.split(".")[-1] in ("norm", "norm1", "norm2")]
    assert cost.params_norm == sum(p.numel() for m in norms for p in m.parameters())
    assert cost.params_paper == cost.params - cost.params_norm - cost.params_head
    assert cost.flops == 2 * cost.macs

    batch = 2
    x = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() == batch * cost.flops


# The paper's rows (docs/paper.md). Values are written as printed, so the tolerance can allow for the
# paper's rounding: |ours - paper| <= max(2% of paper, half a unit of the last printed digit).
# Parameter unit: "M" = 10^6 for every width-768 row, 2^20 for the deep model and the other widths
# (see ablate/models/cost.py: no single unit fits all rows).
W = dict(width=768, depth=12, patch_size=16, image_size=224, mlp_ratio=4)
PAPER_ROWS = [
    # id, settings, classes, params as printed, params unit, GMACs as printed
    ("wide", W, 1000, "71", 1e6, "14.0"),
    ("deep", dict(W, width=384, depth=36, norm="affine"), 1000, "51", 2**20, "10.5"),
    ("depth-1", dict(W, depth=1), 100, "6.5", 1e6, "1.3"),
    ("depth-3", dict(W, depth=3), 100, "18", 1e6, "3.6"),
    ("depth-6", dict(W, depth=6), 100, "36", 1e6, "7.1"),
    ("depth-12", W, 100, "71", 1e6, "14"),
    ("depth-16", dict(W, depth=16), 100, "95", 1e6, "19"),
    ("width-192", dict(W, width=192), 100, "4.3", 2**20, "0.9"),
    ("width-384", dict(W, width=384), 100, "17", 2**20, "3.5"),
    ("width-576", dict(W, width=576), 100, "38", 2**20, "7.9"),
    ("width-768", W, 100, "71", 1e6, "14"),
    ("width-960", dict(W, width=960), 100, "106", 2**20, "20"),
    ("ratio-1", dict(W, mlp_ratio=1), 100, "29", 1e6, "5.7"),
    ("ratio-2", dict(W, mlp_ratio=2), 100, "43", 1e6, "8.4"),
    ("ratio-3", dict(W, mlp_ratio=3), 100, "57", 1e6, "11"),
    ("ratio-4", W, 100, "71", 1e6, "14"),
    ("ratio-5", dict(W, mlp_ratio=5), 100, "86", 1e6, "17"),
    ("patch-32", dict(W, patch_size=32), 100, "73", 1e6, "3.5"),
    ("patch-16", W, 100, "71", 1e6, "14"),
    ("input-112", dict(W, image_size=112), 100, "71", 1e6, "3.5"),
    ("input-224", W, 100, "71", 1e6, "14"),
    ("input-336", dict(W, image_size=336), 100, "71", 1e6, "31"),
]

# MACs are 10^9 per "B" except where the paper's row only fits 2^30, as its params row only
# fits 2^20 (width 960: 21.82e9 = 20.32 Gi vs the printed 20); experiments/paper/width.yaml
# carries the same units for `ablate plan`.
MACS_UNIT = {"width-960": 2**30}

# Rows whose printed MACs no reading of the formula reproduces (documented in ablate/models/cost.py).
MACS_OUTLIERS = {
    "patch-32": "paper prints 3.5B; the formula gives 3.58B (+2.4%; 3.47B are the blocks alone)",
}


def close_to_printed(ours: float, printed: str) -> bool:
    value = float(printed)
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(ours - value) <= max(0.02 * value, 0.5 * 10 ** -decimals)


@pytest.mark.parametrize("row", PAPER_ROWS, ids=[r[0] for r in PAPER_ROWS])
def test_paper_params(row):
    _, settings, classes, printed, unit, _ = row
    cost = model_cost(ModelConfig(**settings), classes)
    ours = cost.params_m if unit == 1e6 else cost.params_mi
    assert close_to_printed(ours, printed), f"ours {ours:.2f} vs paper {printed}"


@pytest.mark.parametrize("row", [
    pytest.param(r, marks=pytest.mark.xfail(strict=True, reason=MACS_OUTLIERS[r[0]]))
    if r[0] in MACS_OUTLIERS else r for r in PAPER_ROWS], ids=[r[0] for r in PAPER_ROWS])
def test_paper_gmacs(row):
    name, settings, classes, _, _, printed = row
    ours = model_cost(ModelConfig(**settings), classes).macs / MACS_UNIT.get(name, 1e9)
    assert close_to_printed(ours, printed), f"ours {ours:.3f} vs paper {printed}"


def test_paper_formula_exactly():
    # §3.4: block params c²(2r+2) + c(3+r), block MACs M c²(2r+2), patch (3p²+1)c and 3Mcp².
    c, r, p, m, n = 768, 4, 16, 196, 12
    cost = model_cost(ModelConfig(), 1000)
    assert cost.params_blocks == n * (c * c * (2 * r + 2) + c * (3 + r))
    assert cost.params_patch == (3 * p * p + 1) * c
    assert cost.params_head == (c + 1) * 1000
    assert cost.macs == 3 * m * c * p * p + n * m * c * c * (2 * r + 2) + c * 1000


def test_cli_models_table_and_config():
    runner = CliRunner()
    table = runner.invoke(cli, ["models"])
    assert table.exit_code == 0, table.output
    assert "s2mlp_wide_16_224" in table.output and "s2mlp_deep_16_224" in table.output
    assert "71.43" in table.output and "51.00" in table.output and "13.99" in table.output

    one = runner.invoke(cli, ["models", "--set", "model.width=384", "--set", "depth=6"])
    assert one.exit_code == 0, one.output
    expected = model_cost(ModelConfig(width=384, depth=6), 1000)
    assert f"macs={expected.macs}" in one.output and f"params={expected.params}" in one.output


@pytest.mark.parametrize("args, message", [
    (["--set", "model.colour=3"], "--set model.colour=3: unknown setting model.colour (allowed: model.image_size"),
    (["--set", "model.widht=384"], "--set model.widht=384: unknown setting model.widht; did you mean model.width?"),
    (["--set", "width=abc"], "--set width=abc: expected an integer, got abc (allowed: int > 0)"),
    (["--set", "depth='3'"], "--set depth='3': expected an integer, got the string \"3\""),
    (["--set", "width=100", "--set", "shift=eight"], "--set width=100: width 100 is not divisible by the 8 channel groups"),
    (["--set", "width"], "expected KEY=VALUE"),
])
def test_cli_models_bad_input(args, message):
    result = CliRunner().invoke(cli, ["models", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
