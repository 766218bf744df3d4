"""Activation memory: the analytic count (the plan's column) equals what autograd really saves,
and the plan shows the micro-batch that fits a GPU."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ablate.cli import cli
from ablate.config import ModelConfig
from ablate.memory import (MicroBatchMemory, activation_bytes, fitting_micro_batch, measured_activation_bytes,
                           parse_size)
from ablate.models.s2mlp import build_model


@pytest.mark.parametrize("settings", [
    {},
    {"depth": 3, "shift": "eight", "mlp_ratio": 2},
    {"norm_position": "pre"},
    {"norm": "affine", "patch_size": 16},
    {"token_mixing": "mlp"},
    {"token_mixing": "mlp", "token_hidden": 24, "norm_position": "pre"},
    {"token_mixing": "dwconv", "kernel_size": 5},
    {"token_mixing": "none"},
])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_analytic_activation_bytes_equal_what_autograd_saves(settings, amp):
    model = ModelConfig(**{"width": 128, "depth": 2, "image_size": 64, "patch_size": 8, **settings})
    net = build_model(model, 10)
    # per image: the difference between two batch sizes (the weights' saved copies cancel)
    two, four = (measured_activation_bytes(net, torch.randn(n, 3, 64, 64), amp) for n in (2, 4))
    assert activation_bytes(model, "bf16" if amp else "fp32", device_type="cpu") == (four - two) // 2


def test_checkpointing_keeps_a_block_s_input_per_block():
    wide = ModelConfig(width=768, depth=12, image_size=224, patch_size=16)
    full, ckpt = activation_bytes(wide), activation_bytes(wide, grad_checkpointing=True)
    assert 55e6 < full < 65e6  # S²-MLP-wide at 224 px, bf16 autocast on CUDA: about 59 MB per image
    assert ckpt < full / 4


def test_fitting_micro_batch():
    assert fitting_micro_batch(10, 0, 1000, 64) == 64
    assert fitting_micro_batch(100, 0, 1000, 64) == 8   # 850 bytes of room
    assert fitting_micro_batch(100, 900, 1000, 64) == 0
    assert fitting_micro_batch(100, 0, 1000, 12) == 6


def test_parse_size():
    assert parse_size("80GB") == parse_size("80") == 80 * 10 ** 9
    assert parse_size("48GiB") == 48 * 2 ** 30 and parse_size("81920MiB") == 80 * 2 ** 30
    for bad in ("", "eighty", "-1GB", "10 parsecs", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_remembered_micro_batches_are_the_user_s_own(tmp_path):
    store = MicroBatchMemory(tmp_path / "m.json")
    store.put("k", 64)
    assert MicroBatchMemory(tmp_path / "m.json").get("k") == 64
    (tmp_path / "m.json").write_text('{"k": "rm -rf /", "j": -3, "i": 8}')
    assert store.get("k") is None and store.get("j") is None and store.get("i") == 8
    (tmp_path / "m.json").write_text("not json")
    assert store.get("i") is None


def test_plan_shows_memory_and_the_micro_batch_that_fits(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi: the plan assumes 80 GB
    runner = CliRunner()
    out = runner.invoke(cli, ["plan", "experiments/paper/depth.yaml", "--json"])
    assert out.exit_code == 0, out.output
    rows = {r["values"]["model.depth"]: r for r in json.loads(out.output)["rows"]}
    assert rows[12]["micro_batch"] == rows[1]["micro_batch"] == 1024  # 59 MB x 1024 + state < 85% of 80 GB
    assert rows[16]["micro_batch"] == 512
    text = runner.invoke(cli, ["plan", "experiments/paper/depth.yaml", "--gpu-memory", "24GB"]).output
    assert "MB/img" in text and "micro" in text and "fits 24 GB (--gpu-memory)" in text
    assert "256 x4" in text and "128 x8" in text  # depth 12 and 16 on a 24 GB card
    tiny = runner.invoke(cli, ["plan", "experiments/paper/depth.yaml", "--gpu-memory", "1GB"]).output
    assert "warning:" in tiny and "grad_checkpointing: true" in tiny
    bad = runner.invoke(cli, ["plan", "experiments/paper/depth.yaml", "--gpu-memory", "lots"])
    assert bad.exit_code == 2 and "--gpu-memory: 'lots'" in bad.output
