"""Every paper spec, end to end, as a user runs it: ImageNet-shaped JPEGs, the full recipe, both loaders.

The path: ``ablate data fake-imagenet`` (an ImageNet-1K-shaped tree: the 100 CMC classes plus
decoys, ImageNet's sizes, grayscale and CMYK files) -> ``ablate data imagenet100`` -> ``ablate
data cache`` (every stored size the specs need) -> ``ablate run`` of each
``experiments/paper/*.yaml`` with overrides that shrink only the width, the depth, the epochs
and (through the tree) the number of images; the batch shrinks with the images, since training
drops an incomplete last batch. Image size, patch size and the whole DeiT recipe (RandAugment,
Mixup, CutMix, random erasing, label smoothing, drop path, warm-up) stay as the specs set them.
The data commands run as processes; the fourteen ``ablate run`` commands run through the same
command-line entry in this process (CliRunner), which imports torch once rather than fourteen times.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from click.testing import CliRunner

from ablate.cli import cli
from ablate.spec import SpecArgs
from conftest import ROOT, run_ablate

#: the ImageNet100 specs (imagenet1k.yaml, the ImageNet-1K table, is rehearsed on its own tree below)
PAPER = sorted(p for p in (ROOT / "experiments" / "paper").glob("*.yaml") if p.name != "imagenet1k.yaml")
IMAGENET1K = ROOT / "experiments" / "paper" / "imagenet1k.yaml"
SHRINK = {"model.width": "64", "model.depth": "2", "train.epochs": "1", "train.batch_size": "32"}
#: what the shrunk runs must still train with: base-wide.yaml's recipe
RECIPE = {"train.randaugment": "rand-m9-mstd0.5-inc1", "train.mixup": "0.8", "train.cutmix": "1.0",
          "train.random_erasing": "0.25", "train.label_smoothing": "0.1", "model.drop_path": "0.1",
          "train.warmup_epochs": "5.0", "train.amp": "bf16", "train.crop_scale": "0.08", "train.hflip": "0.5"}

pytestmark = pytest.mark.slow


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def imagenet100(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("paper-data")
    fake, in100 = work / "imagenet-1k", work / "imagenet100"
    _ok(run_ablate("data", "fake-imagenet", "--out", str(fake), "--train-per-class", "1", "--val-per-class", "1",
                   "--decoys", "3", cwd=work))
    out = _ok(run_ablate("data", "imagenet100", "--imagenet", str(fake), "--out", str(in100), cwd=work))
    assert "train: 100 images, 100 classes" in out and "val: 100 images, 100 classes" in out
    for spec in PAPER:  # every stored size the specs need (112, 224 and 336 px: 128, 256, 384)
        _ok(run_ablate("data", "cache", str(spec), cwd=work, env={"IMAGENET100_ROOT": str(in100)}))
    return in100


def _overrides(spec: Path) -> list[str]:
    text = spec.read_text()
    out = []
    for key, value in SHRINK.items():
        if key == "model.depth" and f"{key}:" in text:
            continue  # the depth table's own axis is cheap at width 64: keep it
        out += ["--set", f"{key}={value}"]
    return out


@pytest.mark.parametrize("loader", ["folder", "cache"])
def test_every_paper_spec_trains_end_to_end(imagenet100, tmp_path, loader, monkeypatch):
    from mlflow.tracking import MlflowClient

    env = {"IMAGENET100_ROOT": str(imagenet100), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "ABLATE_STORAGE": f"sqlite:///{tmp_path / 'ledger.db'}", "ABLATE_CHECKPOINTS": str(tmp_path / "ckpt")}
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(tmp_path)
    for spec in PAPER:
        name = f"rehearsal-{spec.stem}-{loader}"
        result = CliRunner().invoke(cli, ["run", str(spec), *_overrides(spec), "--set", f"data.loader={loader}",
                                          "--set", "data.workers=0", "--name", name])
        out = result.output
        assert result.exit_code == 0, out[-4000:]
        assert "FAILED" not in out
        sets = [v for i, v in enumerate(_overrides(spec)) if i % 2] + [f"data.loader={loader}"]
        planned = sorted(c.key for c in SpecArgs(tuple(sets), name).load(spec, check_paths=False).cells())

        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id],
                                  filter_string="tags.`ablate.role` = 'cell'")
        assert sorted(r.data.tags["ablate.cell_key"][:len(planned[0])] for r in runs) == planned, spec.name
        for run in runs:
            p, m, tags = run.data.params, run.data.metrics, run.data.tags
            assert run.info.status == "FINISHED", (spec.name, tags.get("ablate.failure"))
            assert m["skipped_images"] == 0 and p["train.epochs"] == "1" and m["val_top1"] >= 0
            assert tags["ablate.data_loader"] == loader and tags["ablate.n_train"] == "100"
            assert {k: p[k] for k in RECIPE} == RECIPE, spec.name
            assert p["model.width"] == "64" and p["data.name"] == "imagenet100"
        sizes = sorted({int(r.data.params["model.image_size"]) for r in runs})
        patches = sorted({int(r.data.params["model.patch_size"]) for r in runs})
        if spec.stem == "input-size":
            assert sizes == [112, 224, 336]
        elif spec.stem == "patch-size":
            assert patches == [16, 32]
        else:
            assert sizes == [224] and patches == [16]
    # the tables share their baseline row (and more): each configuration trained once across them,
    # the others recorded from that run
    cells = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`ablate.role` = 'cell'")
    trained = [r.data.tags["ablate.cell_key"] for r in cells if "ablate.reused_from" not in r.data.tags]
    assert len(trained) == len(set(trained)) < len(cells)
    for run in cells:
        if "ablate.reused_from" in run.data.tags:
            source = client.get_run(run.data.tags["ablate.reused_from"])
            assert source.data.tags["ablate.cell_key"] == run.data.tags["ablate.cell_key"]
            assert source.data.metrics["val_top1"] == run.data.metrics["val_top1"]


def test_the_imagenet1k_table_rehearses_on_a_generated_1000_class_tree(tmp_path, monkeypatch):
    """The archive's layout (flat val/ and its labels file) -> ``ablate data imagenet1k`` -> every
    row of the table trained: S²-MLP shrunk in width and depth, timm's Mixer-B/16 and ResMLP-36 at
    their own size (timm fixes it) on 16 px images (one patch), so that the rehearsal takes about a minute."""
    from mlflow.tracking import MlflowClient

    fake, root = tmp_path / "fake-1k", tmp_path / "imagenet1k"
    _ok(run_ablate("data", "fake-imagenet", "--out", str(fake), "--classes", "imagenet1k", "--flat-val",
                   "--train-per-class", "1", "--val-per-class", "1", "--max-side", "40", cwd=tmp_path))
    out = _ok(run_ablate("data", "imagenet1k", "--imagenet", str(fake), "--out", str(root), cwd=tmp_path))
    assert "1000 classes, 1000 train images, 1000 val images" in out
    env = {"IMAGENET1K_ROOT": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "ABLATE_STORAGE": f"sqlite:///{tmp_path / 'ledger.db'}", "ABLATE_CHECKPOINTS": str(tmp_path / "ckpt"),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(tmp_path)
    sets = ["model.width=64", "model.depth=2", "train.epochs=1", "train.batch_size=20", "data.workers=0",
            "model.image_size=16", "train.eval_train_images=20"]
    args = [w for s in sets for w in ("--set", s)]
    result = CliRunner().invoke(cli, ["run", str(IMAGENET1K), *args, "--name", "rehearsal-imagenet1k"])
    assert result.exit_code == 0, result.output[-4000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("rehearsal-imagenet1k").experiment_id],
                              filter_string="tags.`ablate.role` = 'cell'")
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)
    by_model = {r.data.params["model.timm"]: r for r in runs}
    assert set(by_model) == {"None", "mixer_b16_224", "resmlp_36_224"}
    for run in runs:
        p, m, tags = run.data.params, run.data.metrics, run.data.tags
        assert p["data.name"] == "imagenet1k" and tags["ablate.n_train"] == "1000"
        assert {k: p[k] for k in RECIPE} == RECIPE
        assert "train_top1" in m and tags["ablate.cost_source"] == ("analytic" if p["model.timm"] == "None"
                                                                    else "counted")
    assert by_model["mixer_b16_224"].data.metrics["params"] > 50e6  # timm's own Mixer-B/16, at full width
    report = CliRunner().invoke(cli, ["report", str(IMAGENET1K), *args, "--name", "rehearsal-imagenet1k"])
    assert report.exit_code == 0, report.output[-4000:]
