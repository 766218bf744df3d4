"""Spec loading: expansion (grid, zip, exclude, seeds, extends), stable keys, ${VAR} expansion,
searches, and the corpus of malformed specs in tests/specs_bad/ (each names its expected message)."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from ablate.cli import cli
from ablate.config import CellConfig, cell_key
from ablate.errors import AblateError, SpecError
from ablate.spec import Cell, Objective, Param, SearchSpec, Spec, format_settings_help, load_spec, settings_help

from conftest import ROOT, run_ablate

BAD = Path(__file__).parent / "specs_bad"
BAD_SPECS = sorted(BAD.glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


SMALL = """\
name: small
data: {name: digits}
model: {image_size: 16, patch_size: 4, width: 64, depth: 2, mlp_ratio: 2}
train: {epochs: 2, batch_size: 32}
"""


def small(tmp_path: Path, extra: str = "", name: str = "spec.yaml") -> Spec:
    return load_spec(write(tmp_path / name, SMALL + textwrap.dedent(extra)))


# ---- expansion --------------------------------------------------------------------------------

def test_quickstart_cells():
    spec = load_spec(ROOT / "experiments" / "quickstart.yaml")
    assert spec.name == "quickstart" and spec.kind == "grid" and spec.seeds == [0, 1, 2]
    assert spec.varied == ["model.shift", "model.patch_size", "train.seed"]
    cells = spec.cells()
    assert [c.values for c in cells] == [{"model.shift": s, "model.patch_size": p, "train.seed": seed}
                                         for seed in (0, 1, 2) for s in ("none", "four", "eight") for p in (2, 4)]
    assert len({c.key for c in cells}) == 18
    for cell in cells:
        assert isinstance(cell, Cell) and cell.seed == cell.config.train.seed and cell.key == cell_key(cell.config)
        assert cell.config.model.shift == cell.values["model.shift"]
        assert cell.config.model.patch_size == cell.values["model.patch_size"]
        assert cell.config.train.epochs == 12 and cell.config.data.name == "digits"


def test_grid_is_a_product_in_written_order(tmp_path):
    spec = small(tmp_path, """
        grid:
          model.depth: [1, 2]
          train.lr: [1.0e-3, 2e-3, 3e-3]   # 2e-3: read as a number, not a string
        """)
    assert [tuple(c.values.values()) for c in spec.cells()] == [
        (d, lr) for d in (1, 2) for lr in (1e-3, 2e-3, 3e-3)]
    assert all(isinstance(c.config.train.lr, float) for c in spec.cells())


def test_zip_varies_lists_together_and_combines_with_grid(tmp_path):
    spec = small(tmp_path, """
        grid:
          model.shift: [none, four]
        zip:
          model.image_size: [16, 32]
          train.batch_size: [64, 16]
        """)
    assert spec.varied == ["model.shift", "model.image_size", "train.batch_size"]
    got = [(c.config.model.shift, c.config.model.image_size, c.config.train.batch_size) for c in spec.cells()]
    assert got == [("none", 16, 64), ("none", 32, 16), ("four", 16, 64), ("four", 32, 16)]


def test_zip_groups_as_a_list(tmp_path):
    spec = small(tmp_path, """
        zip:
          - {model.image_size: [16, 32], train.batch_size: [64, 16]}
          - {model.depth: [1, 3], train.epochs: [4, 2]}
        """)
    assert len(spec.cells()) == 4
    assert {(c.config.model.depth, c.config.train.epochs) for c in spec.cells()} == {(1, 4), (3, 2)}


def test_exclude_drops_matching_cells(tmp_path):
    spec = small(tmp_path, """
        grid:
          model.shift: [none, four, eight]
          model.patch_size: [2, 4]
        exclude:
          - {model.shift: none, model.patch_size: 4}
          - {model.shift: eight}
        """)
    assert [tuple(c.values.values()) for c in spec.cells()] == [("none", 2), ("four", 2), ("four", 4)]


def test_report_baseline_names_varied_values(tmp_path):
    grid = """
        grid:
          model.shift: [none, four, eight]
          model.patch_size: [2, 4]
        report:
          baseline: {model.shift: four}
        """
    assert small(tmp_path, grid).baseline == {"model.shift": "four"}
    assert small(tmp_path, "grid: {model.depth: [1, 2]}\n").baseline == {}  # none named: the first configuration
    # --set fixing the baseline's setting: the same value leaves nothing to say; another drops it
    path = tmp_path / "spec.yaml"
    assert load_spec(path, overrides=["model.shift=four"]).baseline == {}
    assert load_spec(path, overrides=["model.shift=none"]).baseline == {}
    spec = small(tmp_path, """
        search:
          objectives: [{metric: val_top1, direction: maximize}]
          trials: 4
          space:
            model.depth: {int: [1, 4]}
            model.shift: {choice: [none, four]}
        report:
          baseline: {model.depth: 2, model.shift: four}
        """)
    assert spec.baseline == {"model.depth": 2, "model.shift": "four"}
    with pytest.raises(SpecError, match=r"report.baseline.model.depth: 9 is outside the search range "
                                        r"\(allowed: numbers from 1 to 4\)"):
        small(tmp_path, """
            search:
              objectives: [{metric: val_top1, direction: maximize}]
              trials: 4
              space: {model.depth: {int: [1, 4]}}
            report: {baseline: {model.depth: 9}}
            """)


def test_seeds_replicate_every_cell_outermost(tmp_path):
    spec = small(tmp_path, """
        grid:
          model.depth: [1, 2]
        seeds: [0, 7]
        """)
    assert spec.varied == ["model.depth", "train.seed"]
    cells = spec.cells()
    assert [(c.seed, c.values["model.depth"]) for c in cells] == [(0, 1), (0, 2), (7, 1), (7, 2)]
    assert all(c.config.train.seed == c.seed == c.values["train.seed"] for c in cells)
    assert len({c.key for c in cells}) == 4


def test_one_seed_is_not_varied(tmp_path):
    spec = small(tmp_path, "seeds: [3]\n")
    assert spec.varied == [] and [c.seed for c in spec.cells()] == [3]
    assert spec.cells()[0].values == {}


def test_spec_without_grid_is_one_cell(tmp_path):
    spec = small(tmp_path)
    assert spec.kind == "grid" and spec.search is None and len(spec.cells()) == 1
    assert spec.cells()[0].config == spec.base


def test_extends_merges_sections_setting_by_setting(tmp_path):
    write(tmp_path / "base" / "base.yaml", SMALL + """\
grid:
  model.depth: [1, 2]
seeds: [0, 1]
""")
    child = write(tmp_path / "child" / "child.yaml", """\
extends: ../base/base.yaml
name: child
model: {width: 32}
grid:
  model.shift: [none, four]
""")
    spec = load_spec(child)
    assert spec.name == "child"
    assert spec.base.model.width == 32 and spec.base.model.depth == 2 and spec.base.model.image_size == 16
    assert spec.base.train.epochs == 2 and spec.seeds == [0, 1]
    # the child's grid replaces the inherited one rather than adding to it
    assert spec.varied == ["model.shift", "train.seed"] and len(spec.cells()) == 4


def test_extends_errors_point_at_the_file_that_wrote_the_value(tmp_path):
    write(tmp_path / "base.yaml", SMALL.replace("depth: 2", "depth: 0"))
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nname: child\n")
    with pytest.raises(SpecError) as e:
        load_spec(child)
    assert e.value.problems == [f"{tmp_path / 'base.yaml'}:3: model.depth: must be > 0, got 0 (allowed: int > 0)"]


# ---- keys -------------------------------------------------------------------------------------

def test_keys_ignore_order_comments_file_names_and_origin(tmp_path):
    a = load_spec(write(tmp_path / "a.yaml", SMALL + "grid: {model.shift: [none, four]}\n"))
    b = load_spec(write(tmp_path / "other-name.yaml", """\
# the same cells, written differently
train: {batch_size: 32, epochs: 2}   # order changed
model:
  mlp_ratio: 2.0
  depth: 2
  width: 64
  patch_size: 4
  image_size: 16
  shift: four    # overridden by the grid
grid:
  model.shift: [none, four]
name: small-renamed
data: {name: digits, root: /somewhere/else, workers: 1}   # machine-local: not in the key
"""))
    assert [c.key for c in a.cells()] == [c.key for c in b.cells()]
    # a value from the base, from extends and from a grid of one gives the same key
    write(tmp_path / "parent.yaml", SMALL)
    c = load_spec(write(tmp_path / "c.yaml", "extends: parent.yaml\nname: c\nmodel: {shift: none}\n"))
    d = load_spec(write(tmp_path / "d.yaml", SMALL + "grid: {model.shift: [none]}\n"))
    assert c.cells()[0].key == d.cells()[0].key == a.cells()[0].key


def test_keys_are_stable_across_runs():
    """The key is a hash of the canonical config: changing it orphans finished work, so pin it."""
    spec = load_spec(ROOT / "experiments" / "quickstart.yaml")
    first = spec.cells()[0].key
    assert first == cell_key(CellConfig.model_validate({
        "data": {"name": "digits"},
        "model": {"image_size": 16, "patch_size": 2, "width": 64, "depth": 4, "mlp_ratio": 2, "shift": "none"},
        "train": {"epochs": 12, "batch_size": 64, "lr": 2e-3, "warmup_epochs": 1, "hflip": 0,
                  "crop_scale": 0.7, "label_smoothing": 0.1}}))
    # the literal: a change to the key's recipe (or to any setting's default) shows up here
    assert first == "57324dd685fe1478"


# ---- environment variables --------------------------------------------------------------------

def test_env_expansion(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)
    (root / "val" / "a").mkdir(parents=True)
    monkeypatch.setenv("ABLATE_TEST_ROOT", str(root))
    monkeypatch.delenv("ABLATE_TEST_UNSET", raising=False)
    spec = load_spec(write(tmp_path / "s.yaml", """\
name: ${ABLATE_TEST_UNSET:-env}-spec
data: {name: imagefolder, root: "${ABLATE_TEST_ROOT}"}
model: {image_size: 16, patch_size: 4, width: 64, shift: "${ABLATE_TEST_UNSET:-four}"}
"""))
    assert spec.name == "env-spec" and spec.base.data.root == str(root) and spec.base.model.shift == "four"


def test_unset_variables_are_all_named(tmp_path, monkeypatch):
    monkeypatch.delenv("ABLATE_TEST_A", raising=False)
    monkeypatch.delenv("ABLATE_TEST_B", raising=False)
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path / "s.yaml", "name: ${ABLATE_TEST_A}\ndescription: x ${ABLATE_TEST_B} y\n"))
    assert [p.split(": ", 2)[2].split(" is not set")[0] for p in e.value.problems] == [
        "environment variable ABLATE_TEST_A", "environment variable ABLATE_TEST_B"]


def test_check_paths_off_skips_dataset_roots(tmp_path):
    path = write(tmp_path / "s.yaml", "name: x\ndata: {name: imagenet100, root: /nonexistent/in100}\n")
    with pytest.raises(SpecError):
        load_spec(path)
    assert load_spec(path, check_paths=False).base.data.root == "/nonexistent/in100"


# ---- resolve and searches ---------------------------------------------------------------------

SEARCH = """
search:
  sampler: nsga2
  objectives: [{metric: val_top1, direction: maximize}, macs]
  trials: 12
  space:
    model.width: {int: [32, 256], step: 32}
    model.shift: {choice: [none, four, eight, [[0, 1], [1, 0]]]}
    train.lr: {float: [1.0e-4, 3.0e-3], log: true}
"""


def test_search_spec(tmp_path):
    spec = small(tmp_path, SEARCH)
    assert spec.kind == "search" and spec.cells() == []
    assert spec.varied == ["model.width", "model.shift", "train.lr"]
    s = spec.search
    assert isinstance(s, SearchSpec) and s.sampler == "nsga2" and s.trials == 12 and s.pruner == "none"
    assert s.objectives == [Objective("val_top1", "maximize"), Objective("macs", "minimize")]
    assert s.space["model.width"] == Param(kind="int", low=32, high=256, step=32)
    assert s.space["train.lr"] == Param(kind="float", low=1e-4, high=3e-3, log=True)
    assert s.space["model.shift"].choices[3] == [[0, 1], [1, 0]]


def test_resolve_applies_values_and_rejects_bad_combinations(tmp_path):
    spec = small(tmp_path, SEARCH)
    cfg = spec.resolve({"model.width": 96, "model.shift": "four", "train.lr": 1e-3})
    assert (cfg.model.width, cfg.model.shift, cfg.train.lr, cfg.model.depth) == (96, "four", 1e-3, 2)
    with pytest.raises(AblateError, match=r"model.width=100, model.shift=eight: model.width: width 100 is not "
                                          r"divisible by the 8 channel groups"):
        spec.resolve({"model.width": 100, "model.shift": "eight"})
    with pytest.raises(AblateError, match="model.widht: not a setting; did you mean model.width"):
        spec.resolve({"model.widht": 64})
    assert spec.base.model.width == 64  # resolve never changes the base


def test_grid_may_fix_a_base_that_is_invalid_alone(tmp_path):
    # width 36 cannot take the base's eight groups, but every cell replaces the shift
    spec = load_spec(write(tmp_path / "fix.yaml", SMALL.replace("width: 64", "width: 36, shift: eight")
                           + "grid:\n  model.shift: [none, four]\n"))
    assert [c.config.model.shift for c in spec.cells()] == ["none", "four"]


def test_reference_rows_are_kept(tmp_path):
    spec = small(tmp_path, """
        grid: {model.depth: [1, 2]}
        reference:
          source: a table
          rows:
            - {when: {model.depth: 1}, top1: 50.0, params_m: 0.1, params_unit: Mi}
            - {when: {model.depth: 2}, top1: 60.5, gmacs: 0.01, macs_unit: Gi, note: "x"}
        """)
    assert spec.reference.source == "a table" and spec.reference.rows[1].top1 == 60.5
    assert spec.reference.rows[0].params_unit == "Mi" and spec.reference.rows[0].top5 is None
    assert spec.reference.rows[1].to_dict() == {"when": {"model.depth": 2}, "top1": 60.5, "gmacs": 0.01,
                                                "macs_unit": "Gi", "note": "x"}


def test_duplicate_cells_are_an_error(tmp_path):
    with pytest.raises(SpecError, match="are the same configuration"):
        small(tmp_path, "grid: {data.workers: [0, 2]}\n")


def test_all_problems_at_once(tmp_path):
    with pytest.raises(SpecError) as e:
        small(tmp_path, """
            gird: {}
            seeds: []
            search:
              sampler: tpe
              objectives: [{metric: val_top1}, {metric: macs}]
              pruner: median
              trials: 0
              space:
                train.lr: {float: [1.0, 0.1]}
                model.depth: {int: [1, 4], stepp: 2}
            """)
    assert [p.split(": ")[1] for p in e.value.problems] == [
        "gird", "seeds", "search.pruner", "search.trials", "search.space.train.lr.float",
        "search.space.model.depth.stepp"]


# ---- the malformed-spec corpus ----------------------------------------------------------------

def expectations(path: Path) -> list[str]:
    return [line.removeprefix("# expect: ") for line in path.read_text().splitlines()
            if line.startswith("# expect: ")]


def command_of(path: Path) -> str:
    """The command that must refuse the spec: ``plan`` unless the file says ``# command: run``
    (a dataset that is not in place yet is planned, and refused by run)."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("# command: ")]
    return lines[0].removeprefix("# command: ") if lines else "plan"


def test_corpus_is_large_and_specific():
    assert len(BAD_SPECS) >= 25
    assert all(expectations(p) for p in BAD_SPECS), "every bad spec names the message it must produce"


@pytest.mark.parametrize("bad", BAD_SPECS, ids=[p.stem for p in BAD_SPECS])
def test_bad_spec_fails_with_its_message_exit_2_and_writes_nothing(bad, tmp_path, monkeypatch):
    specs, cwd = tmp_path / "specs", tmp_path / "cwd"
    specs.mkdir()
    cwd.mkdir()
    shutil.copy(bad, specs / bad.name)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("ABLATE_TEST_UNSET_ROOT", raising=False)
    # what plan refuses, run refuses alike (run loads the spec the same way, and also needs the data)
    for command in ["plan", "run"] if command_of(bad) == "plan" else [command_of(bad)]:
        result = CliRunner().invoke(cli, [command, str(specs / bad.name)])
        assert result.exit_code == 2, result.output
        assert isinstance(result.exception, SystemExit), "a user error must not raise"
        for expected in expectations(bad):
            expected = expected.replace(f"{bad.name}:", f"{specs / bad.name}:")
            assert f"error: {expected}" in result.stderr, result.stderr
        assert "Traceback" not in result.output
        assert list(cwd.iterdir()) == [] and [p.name for p in specs.iterdir()] == [bad.name]


@pytest.mark.slow
def test_bad_spec_in_a_real_process(tmp_path):
    """The console entry point: every problem on stderr, exit 2, no traceback, nothing written."""
    shutil.copy(BAD / "many-problems.yaml", tmp_path / "many-problems.yaml")
    proc = run_ablate("plan", "many-problems.yaml", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: {e}" for e in expectations(BAD / "many-problems.yaml")] or \
        all(f"error: {e}" in proc.stderr for e in expectations(BAD / "many-problems.yaml"))
    assert len(proc.stderr.splitlines()) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["many-problems.yaml"]


# ---- spec-help --------------------------------------------------------------------------------

def test_spec_help_lists_every_setting():
    helps = settings_help()
    names = [h.name for h in helps]
    for section, model in CellConfig.model_fields.items():
        for name in model.annotation.model_fields:
            assert f"{section}.{name}" in names
    assert all(h.description and h.type for h in helps)
    width = next(h for h in helps if h.name == "model.width")
    assert (width.type, width.default) == ("int > 0", 768)
    result = CliRunner().invoke(cli, ["spec-help"])
    assert result.exit_code == 0 and result.output.strip() == format_settings_help().strip()
    assert "model.border" in result.output and "keep | zero" in result.output


# ---- docs/specs.md ----------------------------------------------------------------------------

DOCS = ROOT / "docs" / "specs.md"


def test_docs_list_every_setting():
    text = DOCS.read_text()
    missing = [h.name for h in settings_help() if f"| `{h.name}` |" not in text]
    assert not missing, f"docs/specs.md lacks {missing}: regenerate its settings table"


def test_docs_grid_example_expands_as_documented(tmp_path):
    text = DOCS.read_text().split("## Grid, zip, exclude, seeds")[1]
    example = text.split("```yaml\n")[1].split("```")[0]
    spec = load_spec(write(tmp_path / "doc.yaml", "name: doc\ndata: {name: digits}\n" + example))
    assert len(spec.cells()) == 30 and len({c.key for c in spec.cells()}) == 30
    assert spec.varied == ["model.shift", "model.depth", "model.image_size", "train.batch_size", "train.seed"]


def test_objectives_in_their_short_form(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("""\
name: short
data: {name: digits}
model: {image_size: 16, patch_size: 4, width: 64, depth: 2}
search:
  objectives: [val_top1: max, latency:cpu: min]
  trials: 4
  space:
    model.depth: {int: [1, 4]}
""")
    objectives = load_spec(spec).search.objectives
    assert [(o.metric, o.direction) for o in objectives] == [("val_top1", "maximize"), ("latency:cpu", "minimize")]


def test_a_grids_cells_keep_the_key_of_their_whole_configuration(tmp_path):
    """A grid encodes a configuration's identity once for all its seeds and makes each cell's
    configuration only when asked: every key is still the hash of the cell's whole configuration."""
    spec_path = tmp_path / "seeds.yaml"
    spec_path.write_text(textwrap.dedent("""\
        name: seeds
        data: {name: digits}
        model: {image_size: 16, patch_size: 4, width: 32, depth: 1, shift: [[0, 1], [1, 0]]}
        train: {epochs: 1, randaugment: "rand-m9-mstd0.5"}
        grid:
          model.shift: [none, four, [[0, 1], [1, 0]]]
          train.lr: [1.0e-3, 2.0e-3]
        seeds: [0, 7, 123456]
        """))
    cells = load_spec(spec_path).cells()
    assert len(cells) == 18 and len({c.key for c in cells}) == 18
    for c in cells:
        assert c.config.train.seed == c.seed and cell_key(c.config) == c.key
    from ablate.config import key_of, keys_by_seed
    for odd in ({"a": "\x00seed\x00 elsewhere", "b": [1, "x"], "train.seed": 0}, {"a": "\x00seed\x00"}):
        assert keys_by_seed(odd, [0, 5]) == [key_of({**odd, "train.seed": s}) for s in (0, 5)]
