"""timm models as baseline cells (ablate/models/timm_baselines.py): checked at plan time, counted
once, keyed with their arguments and timm's release, trained and resumed beside S²-MLP cells."""
from __future__ import annotations

import json
import signal
import subprocess

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from torch.utils.flop_counter import FlopCounterMode

from ablate.cli import cli
from ablate.config import TIMM_VERSION, CellConfig, ModelConfig, cell_key, identity
from ablate.models import timm_baselines, zoo
from ablate.spec import load_spec
from conftest import ablate_cmd, run_ablate, wait_for

#: a tiny DeiT: timm's deit entry points let every argument replace their own
DEIT = {"timm": "deit_tiny_patch16_224", "timm_args": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}

SPEC = """\
name: {name}
data: {{name: digits}}
model: {{image_size: 16, patch_size: 4, width: 16, depth: 1, mlp_ratio: 2}}
train: {{epochs: {epochs}, batch_size: 64, lr: 3.0e-3, warmup_epochs: 0, hflip: 0, crop_scale: 0.8}}
grid:
  model:
    - {{token_mixing: shift}}
    - {{token_mixing: dwconv}}
    - {{timm: {timm}, timm_args: {args}}}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ablate" / "counted-costs.json"


def write(workdir, name="mixed", epochs=2, timm=DEIT["timm"], args=DEIT["timm_args"]):
    path = workdir / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, epochs=epochs, timm=timm, args=json.dumps(args)))
    return path


def test_counted_cost_is_what_the_module_counts_and_is_kept(cache):
    cfg = ModelConfig(image_size=16, in_chans=3, **DEIT)
    cost = zoo.model_cost(cfg, 10)
    model = timm_baselines.create(cfg, 10)
    assert cost.counted and cost.params == sum(p.numel() for p in model.parameters())
    assert cost.params_paper == cost.params - sum(p.numel() for p in model.get_classifier().parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(3, 3, 16, 16))
    assert 3 * cost.flops == counter.get_total_flops() and cost.flops == 2 * cost.macs
    # kept: the second reading comes from the file, not from another count
    kept = json.loads(cache.read_text())
    assert len(kept) == 1 and next(iter(kept.values()))["macs"] == cost.macs
    cache.write_text(json.dumps({k: {**v, "macs": 7} for k, v in kept.items()}))
    assert zoo.model_cost(cfg, 10).macs == 7


def test_counting_leaves_the_callers_random_state_alone(cache):
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    timm_baselines.count(ModelConfig(image_size=16, **DEIT), 10)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_the_key_holds_the_timm_name_its_arguments_and_timm_s_release():
    a = CellConfig(model=ModelConfig(image_size=16, **DEIT))
    b = CellConfig(model=ModelConfig(image_size=16, **{**DEIT, "timm_args": {**DEIT["timm_args"], "depth": 3}}))
    c = CellConfig(model=ModelConfig(image_size=16, timm="deit_small_patch16_224", timm_args=DEIT["timm_args"]))
    assert len({cell_key(a), cell_key(b), cell_key(c)}) == 3
    assert identity(a)[TIMM_VERSION] == timm_baselines.version("timm")
    assert TIMM_VERSION not in identity(CellConfig())


def test_s2mlp_settings_a_timm_cell_inherits_do_not_apply_to_it():
    cfg = ModelConfig(width=64, depth=3, shift="eight", **DEIT)
    assert (cfg.width, cfg.depth, cfg.shift) == (768, 12, "four")
    assert ModelConfig(width=64, timm_args={"depth": 3}).timm_args == {}


@pytest.mark.parametrize("args, message", [
    (dict(timm="mixer_b16_2244", args={}), "unknown timm model 'mixer_b16_2244'; did you mean mixer_b16_224"),
    (dict(args={**DEIT["timm_args"], "embed_dimm": 8}), "timm cannot build deit_tiny_patch16_224"),
    (dict(timm="mixer_s16_224", args={"patch_size": 4}), "mixer_s16_224 fixes 'patch_size' itself"),
    (dict(args={"num_classes": 3}), "timm_args.num_classes is set by ablate"),
])
def test_a_timm_model_that_cannot_be_built_is_one_line_before_anything_is_written(workdir, cache, args, message):
    spec = write(workdir, **args)
    result = CliRunner().invoke(cli, ["run", str(spec)])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in workdir.iterdir()) == ["mixed.yaml"]  # not even the cache


def test_s2mlp_settings_beside_timm_in_one_entry_are_refused(workdir, cache):
    spec = workdir / "s.yaml"
    spec.write_text(SPEC.format(name="s", epochs=1, timm=DEIT["timm"], args=json.dumps(DEIT["timm_args"]))
                    .replace("- {timm:", "- {width: 64, timm:"))
    result = CliRunner().invoke(cli, ["plan", str(spec)])
    assert result.exit_code == 2
    assert "s.yaml:9: model.width: applies to S²-MLP, not to the timm model deit_tiny_patch16_224" in result.output


def test_plan_labels_counted_rows(workdir, cache):
    spec = write(workdir)
    result = CliRunner().invoke(cli, ["plan", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert [r["counted"] for r in rows] == [False, False, True]
    assert all(r["macs"] > 0 and r["params"] > 0 for r in rows)
    text = CliRunner().invoke(cli, ["plan", str(spec)]).output
    assert "c: counted on a forward pass of the timm model" in text


@pytest.mark.slow
def test_a_grid_with_a_timm_baseline_trains_resumes_after_kill_9_and_reports_side_by_side(workdir, cache):
    spec = write(workdir, name="mixed", epochs=4)
    ckpts = workdir / "checkpoints" / "mixed"
    keys = {c.key: c for c in load_spec(spec).cells()}
    timm_key = next(k for k, c in keys.items() if c.config.model.timm)
    proc = subprocess.Popen(ablate_cmd("run", str(spec)), cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert wait_for(lambda: (ckpts / timm_key / "last.pt").exists()), "the timm cell never checkpointed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    result = run_ablate("run", str(spec), cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"cell {timm_key}" in result.stdout and "resuming from" in result.stdout
    exp = MlflowClient().get_experiment_by_name("mixed")
    runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'", output_format="list")
    assert sorted(r.data.tags["ablate.cell_key"] for r in runs) == sorted(keys)
    assert all(r.info.status == "FINISHED" for r in runs)
    timm_run = next(r for r in runs if r.data.tags["ablate.cell_key"] == timm_key)
    assert timm_run.data.tags["ablate.cost_source"] == "counted"
    assert timm_run.data.params["model.timm"] == DEIT["timm"]
    steps = [m.step for m in MlflowClient().get_metric_history(timm_run.info.run_id, "val_top1")]
    assert steps == [1, 2, 3, 4]  # each epoch logged once, across the kill

    report = run_ablate("report", str(spec), cwd=workdir)
    assert report.returncode == 0, report.stdout + report.stderr
    table = (workdir / "reports" / "mixed" / "report.md").read_text()
    assert DEIT["timm"] in table and "dwconv" in table


def test_models_listing_counts_a_timm_model_and_names_a_typo(cache):
    out = CliRunner().invoke(cli, ["models", "--set", "timm=deit_tiny_patch16_224", "--set", "image_size=32",
                                   "--set", 'timm_args={"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}'])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[1].split()[:2] == ["deit_tiny_patch16_224", "-"] and " c" in out.output
    bad = CliRunner().invoke(cli, ["models", "--set", "timm=mixr_b16_224"])
    assert bad.exit_code == 2 and "did you mean mixer_b16_224" in bad.output
