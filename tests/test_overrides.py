"""Command-line overrides (``--set KEY=VALUE``) and ``--name``: read and checked like the spec,
replacing what the spec varies, recorded on the runs and kept apart from the spec's own runs."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from ablate import names
from ablate.cli import cli
from ablate.config import cell_key
from ablate.errors import SpecError
from ablate.ledger import Ledger, storage_url
from ablate.runner import run_grid
from ablate.spec import MAX_CELLS, SpecArgs, load_spec
from conftest import ROOT, write_spec

QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
PAPER = ROOT / "experiments" / "paper"

SMALL = """\
name: small
data: {name: digits}
model: {image_size: 16, patch_size: 4, width: 64, depth: 2, mlp_ratio: 2}
train: {epochs: 2, batch_size: 32}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# ---- values --------------------------------------------------------------------------------------

def test_values_are_yaml_typed(tmp_path):
    with_policy = SMALL.replace("batch_size: 32}", "batch_size: 32, randaugment: rand-m9}")
    spec = load_spec(write(tmp_path / "s.yaml", with_policy), overrides=[
        "model.width=32", "train.lr=1e-3", "model.mlp_ratio=3", "model.shift=[[0,1],[0,-1]]",
        "train.randaugment=null", "train.compile=false", "data.root=/data/x"])
    base = spec.base
    assert (base.model.width, base.train.lr, base.model.mlp_ratio) == (32, 1e-3, 3.0)
    assert base.model.shift == [[0, 1], [0, -1]] and base.train.randaugment is None
    assert base.train.compile is False and base.data.root == "/data/x"
    assert spec.overrides == {"model.width": 32, "train.lr": 1e-3, "model.mlp_ratio": 3,
                              "model.shift": [[0, 1], [0, -1]], "train.randaugment": None,
                              "train.compile": False, "data.root": "/data/x"}


@pytest.mark.parametrize("sets, expected", [
    (["model.widht=64"], "--set model.widht=64: unknown setting model.widht; did you mean model.width? "
                         "(allowed: a dotted setting such as model.width, or seeds; see `ablate spec-help`)"),
    (["width=64"], "--set width=64: unknown setting width; did you mean model.width?"),
    (["model.width=0"], "--set model.width=0: must be > 0, got 0 (allowed: int > 0)"),
    (["model.depth='3'"], "--set model.depth='3': expected an integer, got the string \"3\" (write it without "
                          "quotes) (allowed: int > 0)"),
    (["model.mlp_ratio=.inf"], "--set model.mlp_ratio=.inf: expected a finite number, got inf (allowed: float > 0)"),
    (["train.randaugment=rand-m9-x"], "--set train.randaugment=rand-m9-x: 'rand-m9-x': section 'x' is not one "
                                      "timm reads"),
    (["train.seed=1"], "--set train.seed=1: set seeds with --set seeds=[0, 1, 2]"),
    (["model.width"], "--set model.width: expected KEY=VALUE (allowed: e.g. --set model.width=64)"),
    (["model.width="], "--set model.width=: no value after ="),
    (["model.shift=[[0,1]"], "--set model.shift=[[0,1]: syntax error: expected ',' or ']'"),
    (["model.shift=!!python/object:os.system x"], "--set model.shift=!!python/object:os.system x: YAML tag "
                                                  "tag:yaml.org,2002:python/object:os.system is not allowed"),
    (["seeds=[0,-1]"], "--set seeds=[0,-1]: expected a non-empty list of integers >= 0, got [0,-1]"),
    (["model.width=64", "model.width=32"], "--set model.width=32: model.width is set twice (also --set "
                                           "model.width=64)"),
    (["model.width=100", "model.shift=eight"], "--set model.width=100: width 100 is not divisible by the 8 "
                                               "channel groups of shift 'eight'"),
])
def test_problems_name_the_option_exit_2_and_write_nothing(sets, expected, tmp_path, monkeypatch):
    spec = write(tmp_path / "s.yaml", SMALL)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for command in ("plan", "run"):
        args = [command, str(spec)] + [a for s in sets for a in ("--set", s)]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert f"error: {expected}" in result.stderr, result.stderr
        assert "Traceback" not in result.output
    assert list(cwd.iterdir()) == []


def test_problems_of_the_option_come_first_with_the_spec_s_own(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path / "s.yaml", SMALL.replace("depth: 2", "depth: 0")),
                  overrides=["model.colour=red"])
    assert e.value.problems == [
        "--set model.colour=red: unknown setting model.colour (allowed: a dotted setting such as model.width, "
        "or seeds; see `ablate spec-help`)",
        f"{tmp_path / 's.yaml'}:3: model.depth: must be > 0, got 0 (allowed: int > 0)"]


def test_name_option_is_validated(tmp_path):
    spec = write(tmp_path / "s.yaml", SMALL)
    result = CliRunner().invoke(cli, ["plan", str(spec), "--name", "../.."])
    assert result.exit_code == 2 and result.stderr.startswith("error: --name: '../..' has no letter or digit")


# ---- what an override of a varied setting does ---------------------------------------------------

def test_override_of_a_grid_setting_replaces_its_axis_and_keys_follow_the_config():
    spec = load_spec(QUICKSTART)
    fixed = load_spec(QUICKSTART, overrides=["model.shift=four"])
    assert fixed.varied == ["model.patch_size", "train.seed"] and len(fixed.cells()) == 6
    # a cell's key is its resolved configuration's: the same cells as the spec's shift=four ones
    assert [c.key for c in fixed.cells()] == [c.key for c in spec.cells() if c.values["model.shift"] == "four"]
    assert all(c.config.model.shift == "four" for c in fixed.cells())


def test_override_that_changes_nothing_changes_no_key_and_no_experiment():
    spec = load_spec(QUICKSTART)
    same = load_spec(QUICKSTART, overrides=["model.width=64", "model.mlp_ratio=2.0", "seeds=[0, 1, 2]"])
    assert same.name == "quickstart" and [c.key for c in same.cells()] == [c.key for c in spec.cells()]
    assert same.overrides == {"model.width": 64, "model.mlp_ratio": 2.0, "seeds": [0, 1, 2]}


def test_overrides_get_their_own_experiment_unless_named():
    a = load_spec(QUICKSTART, overrides=["train.epochs=1", "model.width=32"])
    b = load_spec(QUICKSTART, overrides=["model.width=32", "train.epochs=1"])  # another order
    c = load_spec(QUICKSTART, overrides=["train.epochs=2", "model.width=32"])
    assert a.name == b.name and a.name.startswith("quickstart+") and len(a.name) == len("quickstart+") + 8
    assert c.name != a.name and a.spec_name == c.spec_name == "quickstart"
    assert a.slug == a.name  # "+" is safe in a folder name
    assert load_spec(QUICKSTART, overrides=["train.epochs=1"], name="rehearsal").name == "rehearsal"
    assert load_spec(QUICKSTART, name="other").name == "other"
    # the cells are those of the resolved configuration: epochs 1 changes every key
    assert cell_key(a.cells()[0].config) == a.cells()[0].key != load_spec(QUICKSTART).cells()[0].key


@pytest.mark.parametrize("local", ["train.micro_batch=16", "train.grad_checkpointing=true", "data.workers=2",
                                   "data.root=/elsewhere", "data.loader=folder"])
def test_machine_local_overrides_change_no_experiment_and_no_key(local, tmp_path):
    """Where the data is and how a batch is split are not part of a cell: a --set of them alone
    records into the spec's own experiment, and beside a real override hashes like that one alone."""
    spec = load_spec(QUICKSTART)
    alone = load_spec(QUICKSTART, overrides=[local])
    assert alone.name == "quickstart" and alone.slug == spec.slug
    assert [c.key for c in alone.cells()] == [c.key for c in spec.cells()]
    assert alone.origin() == f"--set {local} is machine-local: recorded into the spec's own experiment quickstart"
    real = load_spec(QUICKSTART, overrides=["train.epochs=1"])
    mixed = load_spec(QUICKSTART, overrides=["train.epochs=1", local])
    assert mixed.name == real.name != "quickstart" and [c.key for c in mixed.cells()] == [c.key for c in real.cells()]
    assert mixed.origin() == f"spec quickstart, --set train.epochs=1; machine-local: --set {local}"
    assert load_spec(QUICKSTART, overrides=[local, "train.epochs=1"]).name == real.name  # either order
    # plan says where the runs go, in one line
    text = CliRunner().invoke(cli, ["plan", str(write(tmp_path / "s.yaml", SMALL)), "--set", local]).output
    assert (f"experiment: small (--set {local} is machine-local: recorded into the spec's own experiment small; "
            "--name to choose another)") in text


def test_override_in_zip_exclude_and_search(tmp_path):
    zipped = load_spec(write(tmp_path / "z.yaml", SMALL + textwrap.dedent("""
        zip: {model.image_size: [16, 32], train.batch_size: [64, 16]}
        """)), overrides=["model.image_size=16"])
    assert zipped.varied == ["train.batch_size"] and [c.config.model.image_size for c in zipped.cells()] == [16, 16]

    excluded = write(tmp_path / "e.yaml", SMALL + textwrap.dedent("""
        grid: {model.shift: [none, four], model.patch_size: [2, 4]}
        exclude:
          - {model.shift: none, model.patch_size: 4}
        """))
    # the rule wants shift none: with shift fixed at none it keeps its other condition
    none = load_spec(excluded, overrides=["model.shift=none"])
    assert [c.values for c in none.cells()] == [{"model.patch_size": 2}]
    # with shift fixed at four the rule can match no cell: it is dropped, not an error
    four = load_spec(excluded, overrides=["model.shift=four"])
    assert [c.values["model.patch_size"] for c in four.cells()] == [2, 4]
    with pytest.raises(SpecError, match="excludes every cell"):
        load_spec(excluded, overrides=["model.shift=none", "model.patch_size=4"])

    search = write(tmp_path / "s.yaml", SMALL + textwrap.dedent("""
        search:
          objectives: [val_top1]
          trials: 4
          space:
            model.width: {int: [32, 128], step: 32}
            train.lr: {float: [1.0e-4, 1.0e-2], log: true}
        """))
    assert list(load_spec(search, overrides=["model.width=64"]).search.space) == ["train.lr"]
    with pytest.raises(SpecError) as e:
        load_spec(search, overrides=["model.width=64", "train.lr=1e-3"])
    assert e.value.problems[0].startswith("--set model.width=64: fixes every setting the search varies")


def test_reference_rows_follow_the_overrides(monkeypatch):
    monkeypatch.delenv("IMAGENET100_ROOT", raising=False)
    shrunk = load_spec(PAPER / "width.yaml", overrides=["model.width=64"], check_paths=False)
    assert shrunk.reference is None and len(shrunk.cells()) == 1
    one = load_spec(PAPER / "width.yaml", overrides=["model.width=768"], check_paths=False)
    assert [r.when for r in one.reference.rows] == [{"model.width": 768}]
    rehearsal = load_spec(PAPER / "shift-patterns.yaml", check_paths=False,
                          overrides=["model.width=64", "model.depth=2", "train.epochs=1"])
    assert len(rehearsal.reference.rows) == 11 and len(rehearsal.cells()) == 11


def test_plan_shows_the_experiment_and_its_overrides(tmp_path):
    spec = write(tmp_path / "s.yaml", SMALL + "grid: {model.depth: [1, 2]}\n")
    result = CliRunner().invoke(cli, ["plan", str(spec), "--set", "train.epochs=1", "--json"])
    got = json.loads(result.output)
    assert got["name"].startswith("small+") and got["spec_name"] == "small"
    assert got["overrides"] == {"train.epochs": 1} and {r["epochs"] for r in got["rows"]} == {1}
    text = CliRunner().invoke(cli, ["plan", str(spec), "--set", "train.epochs=1"]).output
    assert f"experiment: {got['name']} (spec small, --set train.epochs=1; --name to choose another)" in text


def test_max_cells_is_settable(tmp_path):
    spec = write(tmp_path / "s.yaml", SMALL + "grid: {model.depth: [1, 2, 3]}\nseeds: [0, 1]\n")
    result = CliRunner().invoke(cli, ["plan", str(spec), "--max-cells", "5"])
    assert result.exit_code == 2 and f"{spec}:5: grid: 6 cells (allowed: at most 5;" in result.stderr
    assert CliRunner().invoke(cli, ["plan", str(spec), "--max-cells", "6"]).exit_code == 0
    assert len(SpecArgs(max_cells=6).load(spec).cells()) == 6
    for command in ("plan", "run", "search", "report"):  # one decorator gives every command the same options
        help_text = " ".join(CliRunner().invoke(cli, [command, "--help"]).output.split())
        assert "--set KEY=VALUE" in help_text and "--name TEXT" in help_text
        assert f"(default {MAX_CELLS:,})" in help_text


# ---- a real run with overrides -------------------------------------------------------------------

@pytest.mark.slow
def test_run_with_overrides_is_recorded_and_kept_apart(workdir):
    spec = write_spec(workdir / "t.yaml", name="tiny", epochs=2)
    sets = ["--set", "train.epochs=1", "--set", "model.width=32"]
    result = CliRunner().invoke(cli, ["run", str(spec), "--device", "cpu", *sets])
    assert result.exit_code == 0, result.output
    name = load_spec(spec, overrides=["train.epochs=1", "model.width=32"]).name
    assert f"{name} (spec tiny, --set train.epochs=1 --set model.width=32): 1 cells" in result.output
    client = MlflowClient()
    assert client.get_experiment_by_name("tiny") is None  # the spec's own experiment is untouched
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert sorted(r.data.tags[names.ROLE] for r in runs) == ["cell", "parent"]
    for run in runs:
        assert json.loads(run.data.tags[names.OVERRIDES]) == {"train.epochs": 1, "model.width": 32}
        assert run.data.tags[names.SPEC_NAME] == "tiny"
    cell = next(r for r in runs if r.data.tags[names.ROLE] == "cell")
    assert cell.data.params["model.width"] == "32" and cell.data.params["train.epochs"] == "1"
    # its ledger study is its own too: the spec without overrides still has its cell to train
    url = storage_url(None)
    assert Ledger(url, "tiny").trials() == [] and len(Ledger(url, name).trials()) == 1
    report = CliRunner().invoke(cli, ["report", str(spec), *sets])
    assert report.exit_code == 0, report.output
    assert (workdir / "reports" / name / "report.md").is_file()
    refused = CliRunner().invoke(cli, ["report", name, *sets])
    assert refused.exit_code == 2 and "is an experiment name, not a spec file" in refused.stderr
    # --name chooses the experiment
    named = CliRunner().invoke(cli, ["run", str(spec), "--device", "cpu", *sets, "--name", "rehearsal"])
    assert named.exit_code == 0 and "rehearsal (spec tiny," in named.output
    runs = client.search_runs([client.get_experiment_by_name("rehearsal").experiment_id])
    assert {r.data.tags[names.SPEC_NAME] for r in runs} == {"tiny"}


@pytest.mark.slow
def test_a_machine_local_override_after_a_finished_run_trains_nothing(workdir, capsys):
    spec = write_spec(workdir / "t.yaml", name="tiny", epochs=1)
    assert run_grid(str(spec), device="cpu", progress=False).ok
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tiny").experiment_id
    before = sorted(r.info.run_id for r in client.search_runs([experiment]))
    url = storage_url(None)
    trials = len(Ledger(url, "tiny").trials())
    capsys.readouterr()
    again = run_grid(str(spec), device="cpu", progress=False, spec_args=SpecArgs(("train.micro_batch=16",)))
    assert again.ok and again.spec.name == "tiny"
    assert sorted(r.info.run_id for r in client.search_runs([experiment])) == before  # no run trained or opened
    assert len(Ledger(url, "tiny").trials()) == trials
    assert {e.name for e in client.search_experiments()} == {"tiny", "Default"}  # no tiny+<hash>
    out = capsys.readouterr().out
    assert ("tiny (--set train.micro_batch=16 is machine-local: recorded into the spec's own experiment tiny): "
            "1 cells, 1 already finished, 0 queued") in out


# ---- the paper specs' rehearsal commands ---------------------------------------------------------

def rehearsal_args(spec: Path) -> list[str]:
    """The ``--set`` options of the ``ablate run`` command in a paper spec's header comment."""
    lines = [line.removeprefix("#").strip().rstrip("\\").strip() for line in spec.read_text().splitlines()
             if line.startswith("#   ablate run") or line.startswith("#     --set")]
    words = " ".join(lines).split()
    assert words[:3] == ["ablate", "run", f"experiments/paper/{spec.name}"], words
    return words[3:]


# imagenet1k.yaml's rehearsal also shrinks the image size (timm fixes its baselines' width and depth):
# tests/test_paper_rehearsal.py runs it
@pytest.mark.parametrize("spec", sorted(p for p in PAPER.glob("*.yaml") if p.name != "imagenet1k.yaml"),
                         ids=lambda p: p.stem)
def test_paper_specs_say_how_to_rehearse_them(spec, tmp_path, monkeypatch):
    """Each paper spec's comment rehearses every cell of its grid with a smaller model and schedule,
    the image size, patch size and recipe untouched, into an experiment of its own."""
    monkeypatch.delenv("IMAGENET100_ROOT", raising=False)
    args = rehearsal_args(spec)
    assert args[:2] == ["--device", "cpu"]
    sets = [args[i + 1].replace("SMALL_TREE", str(tmp_path)) for i, a in enumerate(args) if a == "--set"]
    real = load_spec(spec, check_paths=False)
    rehearsal = load_spec(spec, overrides=sets, check_paths=False)
    assert rehearsal.name.startswith(real.name + "+") and len(rehearsal.cells()) == len(real.cells())
    for cell, original in zip(rehearsal.cells(), real.cells()):
        assert cell.values == original.values
        assert cell.config.train.epochs == 1 and cell.config.train.batch_size <= 32
        small, full = cell.config, original.config
        assert small.model.width * small.model.depth < full.model.width * full.model.depth
        for section, keep in (("model", ("image_size", "patch_size", "shift", "mlp_ratio", "drop_path", "norm")),
                              ("train", ("randaugment", "mixup", "cutmix", "random_erasing", "label_smoothing",
                                         "warmup_epochs", "lr", "amp", "crop_scale", "hflip"))):
            for name in keep:
                assert getattr(getattr(small, section), name) == getattr(getattr(full, section), name), name
    result = CliRunner().invoke(cli, ["plan", str(spec), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
