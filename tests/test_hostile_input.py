"""Input that once slipped past the up-front checks: each is now one line, exit status 2, no
traceback and nothing written (no MLflow run, no ledger entry, no checkpoint), reported before
anything trains. Spec-level cases live here as commands, beside tests/specs_bad/ for the files."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from ablate.cli import cli
from ablate.spec import load_spec
from conftest import write_spec


def refused(*args: str) -> str:
    """The one error line of a refused command (exit status 2, no traceback)."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def only(folder: Path, *names: str) -> None:
    """Nothing but ``names`` in ``folder``: no store, no lock file, no checkpoint was written."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.fixture
def spec(workdir) -> Path:
    return write_spec(workdir / "s.yaml", epochs=1)


# ---- YAML 1.2 booleans --------------------------------------------------------------------------

def test_yes_no_on_off_are_strings_in_specs_and_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: b\ndata: {name: digits}\ntrain:\n  amp: off\n  compile: false\n  hflip: 0\n")
    assert load_spec(path).base.train.amp == "off"
    assert load_spec(path, overrides=["train.amp=off"]).base.train.amp == "off"
    assert load_spec(path, overrides=["train.compile=true"]).base.train.compile is True
    assert "--set train.amp=Off: Off is not a choice" in refused("plan", str(path), "--set", "train.amp=Off")
    for word in ("yes", "no", "on", "OFF", "Y", "n"):  # a string, so a boolean setting refuses it on its own line
        path.write_text(f"name: b\ndata: {{name: digits}}\ntrain:\n  epochs: 1\n  compile: {word}\n")
        assert f"s.yaml:5: train.compile: expected true or false, got {word} (allowed: bool)" in \
            refused("plan", str(path))
    assert "--set train.compile=yes: expected true or false, got yes" in \
        refused("plan", str(path), "--set", "train.compile=yes")


# ---- settings that fail only once a cell trains ---------------------------------------------------

@pytest.mark.parametrize("mix", ["train.mixup=0.8", "train.cutmix=1.0"])
def test_mixup_with_an_odd_batch_is_refused(spec, workdir, mix):
    for command in ("plan", "run"):
        line = refused(command, str(spec), "--set", mix, "--set", "train.batch_size=63")
        assert "batch_size 63 is odd, and Mixup/CutMix pair the images of a batch (allowed: an even batch_size" in line
    only(workdir, "s.yaml")


@pytest.mark.parametrize("setting", ["train.lr=1e308", "train.warmup_lr=1e308", "train.min_lr=1e308",
                                     "train.warmup_epochs=1e308", "train.weight_decay=1e300",
                                     "model.mlp_ratio=1e307"])
def test_a_number_beyond_float32_is_refused(spec, workdir, setting):
    for command in ("plan", "run"):
        line = refused(command, str(spec), "--set", setting)
        assert line.startswith(f"--set {setting}: ") and "does not fit a 32-bit float (allowed: at most 3.4e+38)" in line
    only(workdir, "s.yaml")


def test_a_classifier_of_1e8_classes_is_refused(spec, workdir):
    line = refused("run", str(spec), "--set", "data.name=synthetic", "--set", "data.num_classes=100000000")
    assert line == ("--set data.num_classes=100000000: must be <= 1000000, got 100000000 "
                    "(allowed: int > 0 <= 1000000)")
    only(workdir, "s.yaml")


# ---- the checkpoint folder ---------------------------------------------------------------------

def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_anything_runs(spec, workdir):
    (workdir / "afile").write_text("")
    assert refused("run", str(spec), "--checkpoints", "afile").startswith(
        "--checkpoints afile: is not a folder (allowed:")
    assert refused("run", str(spec), "--checkpoints", "afile/sub").startswith(
        "--checkpoints afile/sub: afile is not a folder")
    os.environ["ABLATE_CHECKPOINTS"] = "afile"  # workdir's monkeypatch restores it
    assert refused("run", str(spec)).startswith("ABLATE_CHECKPOINTS afile: is not a folder")
    only(workdir, "s.yaml", "afile")


def test_a_read_only_checkpoint_folder_is_refused(spec, workdir):
    ro = workdir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user writes into read-only folders (root)")
        assert refused("run", str(spec), "--checkpoints", "ro").startswith("--checkpoints ro: is not writable")
        assert refused("run", str(spec), "--checkpoints", "ro/new").startswith(
            "--checkpoints ro/new: cannot be created: ro is not writable")
        only(workdir, "s.yaml", "ro")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_a_writable_checkpoint_folder_that_does_not_exist_yet_is_fine(tmp_path):
    from ablate.checkpoint import check_root
    check_root(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()


# ---- data.loader: cache -----------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path) -> Path:
    from imagetree import make_tree
    return make_tree(tmp_path / "images", classes=2, per_class=2)


def cache_spec(workdir: Path, root: Path) -> Path:
    path = workdir / "c.yaml"
    path.write_text(f"name: c\ndata:\n  name: imagefolder\n  root: {root}\n  loader: cache\n  workers: 0\n"
                    "model: {image_size: 32, patch_size: 8, width: 16, depth: 1}\ntrain: {epochs: 1, batch_size: 2}\n")
    return path


def test_a_missing_cache_is_named_by_plan_and_refused_by_run(workdir, tree):
    path = cache_spec(workdir, tree)
    plan = CliRunner().invoke(cli, ["plan", str(path)])
    assert plan.exit_code == 0, plan.output
    assert f"data.loader: cache: no cache at {tree}/.ablate-cache/train-36" in plan.output
    line = refused("run", str(path))
    assert line.startswith(f"{path}:5: data.loader: cache: no cache at {tree}/.ablate-cache/train-36")
    assert f"build it with: ablate data cache {tree} --size 36" in line
    only(workdir, "c.yaml", "images")


def test_a_stale_cache_is_refused_before_the_first_cell(workdir, tree):
    from ablate.data.cache import build_cache
    build_cache(tree, 36, workers=1, progress=False, log=lambda _: None)
    path = cache_spec(workdir, tree)
    assert load_spec(path).base.data.loader == "cache"  # current: accepted
    shutil.copy(tree / "train" / "c0" / "0.JPEG", tree / "train" / "c0" / "new.JPEG")
    line = refused("run", str(path))
    assert line.startswith(f"{path}:5: data.loader: cache: {tree}/.ablate-cache/train-36: stale cache")
    assert f"rebuild it with: ablate data cache {tree} --size 36 --force" in line
    only(workdir, "c.yaml", "images")


# ---- extends -----------------------------------------------------------------------------------

def extending(workdir: Path, target: str) -> Path:
    path = workdir / "child.yaml"
    path.write_text(f"extends: {target}\nname: child\n")
    return path


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_extends_of_a_device_or_fifo_is_refused(workdir, target):
    if target == "fifo":
        os.mkfifo(workdir / "fifo")
    line = refused("plan", str(extending(workdir, target)))
    assert line.startswith(f"{workdir / 'child.yaml'}:1: extends: {target} (")
    assert "is not a regular file (a device, a FIFO or a socket)" in line


def test_extends_of_a_world_writable_spec_is_refused(workdir):
    base = write_spec(workdir / "base.yaml")
    base.chmod(0o666)
    line = refused("plan", str(extending(workdir, "base.yaml")))
    assert "extends: base.yaml" in line and "may be written by any user (mode 666)" in line
    base.chmod(0o644)
    assert load_spec(workdir / "child.yaml").name == "child"


def test_extends_of_another_user_s_spec_is_refused(workdir):
    base = write_spec(workdir / "base.yaml")
    try:
        os.chown(base, 54321, -1)
    except PermissionError:
        pytest.skip("only root can give a file to another user")
    line = refused("plan", str(extending(workdir, "base.yaml")))
    assert "extends: base.yaml" in line and "belongs to another user (uid 54321)" in line
    assert stat.S_ISREG(base.stat().st_mode)


# ---- names -------------------------------------------------------------------------------------

def test_a_lone_surrogate_in_a_name_is_one_line(workdir, spec):
    bad = workdir / "bad.yaml"
    bad.write_text('name: "a\\ud800b"\ndata: {name: digits}\n')
    assert refused("plan", str(bad)) == (f"{bad}:1: name: the string holds a lone surrogate (\\ud800), which is "
                                         "not text (allowed: valid Unicode text)")
    # what a shell passes for bytes that are not UTF-8 (Python's surrogateescape)
    assert refused("run", str(spec), "--name", "a\udced\udca0\udc80b").startswith(
        "--name: holds a lone surrogate")
    assert refused("plan", str(spec), "--set", "model.shift=\udcff").startswith(
        "--set model.shift=\\udcff: character #xdcff at position 0")
    assert refused("plan", str(spec), "--name", "n" * 5000) == "--name: 5000 characters (allowed: at most 200)"
    only(workdir, "s.yaml", "bad.yaml")


# ---- stores ------------------------------------------------------------------------------------

def test_the_ledger_in_mlflow_s_own_file_is_refused(spec, workdir):
    line = refused("run", str(spec), "--storage", f"sqlite:///{workdir / 'mlflow.db'}")
    assert line.startswith("--storage sqlite:///mlflow.db: the ledger would share MLflow's store sqlite:///mlflow.db")
    line = refused("run", str(spec), "--storage", "sqlite+pysqlite:///./mlflow.db")  # the same file, spelled otherwise
    assert "the ledger would share MLflow's store" in line
    only(workdir, "s.yaml")


@pytest.mark.parametrize("scheme", ["file://", ""])
def test_status_on_mlflow_s_file_store_is_one_line(spec, workdir, monkeypatch, scheme):
    (workdir / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"{scheme}{workdir / 'mlruns'}")
    assert refused("status", str(spec)).startswith(f"MLflow store {scheme}{workdir / 'mlruns'}: cannot be used (")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"{scheme}{workdir / 'nothing-here'}")
    assert refused("status", str(spec)).startswith(f"no MLflow store at {scheme}{workdir / 'nothing-here'}")
    only(workdir, "s.yaml", "mlruns")
