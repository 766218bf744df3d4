"""The command line starts without torch or timm where it needs neither (bench/cli_startup.py times
it), and the timm model names are registered by importing the module that defines them,
``ablate.models.s2mlp``, as timm's own are."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

HEAVY = ("torch", "timm")


def imported(args: list[str]) -> set[str]:
    """Top-level packages a fresh ``python -X importtime ARGS`` imported (one stderr line each)."""
    env = {k: v for k, v in os.environ.items() if k != "IMAGENET100_ROOT"}
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}


@pytest.mark.parametrize("args", [
    ["--help"],
    ["spec-help"],
    ["plan", "experiments/quickstart.yaml"],
    ["plan", "experiments/quickstart.yaml", "--json", "--set", "train.epochs=1"],
    ["plan", "experiments/paper/shift-patterns.yaml"],   # RandAugment checked, data root unset
    ["plan", "experiments/search/pareto-digits.yaml"],
    ["latency", "--help"],
], ids=lambda a: " ".join(a))
def test_command_imports_neither_torch_nor_timm(args):
    loaded = imported(["-m", "ablate", *args])
    assert "ablate" in loaded and not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_import_ablate_and_its_light_modules_leave_torch_out():
    loaded = imported(["-c", "import ablate, ablate.models, ablate.models.cost, ablate.config, ablate.spec, "
                             "ablate.plan, ablate.units, ablate.augment_policy"])
    assert not loaded & set(HEAVY)


@pytest.mark.parametrize("code", [
    "import ablate.models.s2mlp, timm",
    "import timm, ablate.models.s2mlp",
    "import timm; from ablate.models.s2mlp import build_model",
], ids=["ablate-then-timm", "timm-then-ablate", "from-import"])
def test_timm_names_are_registered_by_import_ablate_models_s2mlp(code):
    check = (f"{code}\n"
             "m = timm.create_model('s2mlp_wide_16_224', num_classes=3, img_size=32)\n"
             "print(type(m).__name__, sorted(timm.list_models('s2mlp*')))")
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["S2MLP", "['s2mlp_deep_16_224',", "'s2mlp_wide_16_224']"]


def test_help_examples_name_specs_that_exist():
    """Every spec a command's help cites is in the repository (ablate data cache once cited a
    spec that was never written)."""
    import re

    import click
    from click.testing import CliRunner

    from ablate.cli import cli

    def commands(group: click.Group, path: tuple[str, ...] = ()):
        for name, command in group.commands.items():
            yield path + (name,)
            if isinstance(command, click.Group):
                yield from commands(command, path + (name,))

    cited = set()
    for path in commands(cli):
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, result.output
        cited.update(re.findall(r"experiments/[\w./-]+\.yaml", result.output))
    assert "experiments/paper/shift-patterns.yaml" in cited
    assert [p for p in sorted(cited) if not (ROOT / p).is_file()] == []
