"""Specs written to hurt: sizes that cannot be built, chains that cannot end, names that point
elsewhere. Each is refused in one line before anything is built or written, or (names) kept
inside the folders derived from it. The small ones live in tests/specs_bad/ with their messages."""
from __future__ import annotations

import os
import random
import string
from pathlib import Path

import pytest
from click.testing import CliRunner

from ablate import execute, train
from ablate.cli import cli
from ablate.errors import SpecError
from ablate.runner import run_grid
from ablate.spec import load_spec, name_problem, path_slug
from ablate.spec.files import MAX_EXTENDS
from ablate.spec.yaml_source import MAX_FILE_BYTES, MAX_VALUES
from conftest import write_spec

HEAD = "name: big\ndata: {name: digits}\nmodel: {image_size: 16, patch_size: 4, width: 64, depth: 2}\n"


def refused(path: Path, *args: str) -> str:
    """The one problem ``ablate plan`` prints for ``path`` (exit 2, no traceback)."""
    result = CliRunner().invoke(cli, ["plan", str(path), *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1, result.stderr
    return result.stderr


def test_two_million_values_are_refused_by_the_file_size(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(HEAD + "grid:\n  train.lr: [" + ", ".join(["1.0e-3"] * 2_000_000) + "]\n")
    assert path.stat().st_size > MAX_FILE_BYTES
    assert f"{path}:1: file: {path.stat().st_size:,} bytes (allowed: a spec of at most" in refused(path)


def test_more_values_than_the_cap_are_refused_while_reading(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text(HEAD + "grid:\n  train.lr: [" + ",".join(["1"] * (MAX_VALUES + 1)) + "]\n")
    assert path.stat().st_size < MAX_FILE_BYTES
    assert f"{path}:4: grid: more than {MAX_VALUES:,} values" in refused(path)


def test_a_long_list_is_counted_as_cells_before_any_is_validated(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(HEAD + "grid:\n  train.lr: [" + ", ".join(f"{i + 1}.0e-6" for i in range(20_000)) + "]\n"
                    "  model.shift: [none, four, eight, up, down, left]\n")
    assert f"{path}:4: grid: 120,000 cells (allowed: at most 100,000;" in refused(path)
    # the cap is the caller's: --max-cells sets it
    assert "120,000 cells (allowed: at most 15,000;" in refused(path, "--max-cells", "15000")


def test_an_extends_chain_has_a_depth_limit(tmp_path):
    (tmp_path / "spec0.yaml").write_text(HEAD)
    for i in range(1, 1000):
        (tmp_path / f"spec{i}.yaml").write_text(f"extends: spec{i - 1}.yaml\nname: s{i}\n")
    problem = refused(tmp_path / "spec999.yaml")
    assert f"extends: a chain of more than {MAX_EXTENDS} files" in problem
    short = tmp_path / f"spec{MAX_EXTENDS - 1}.yaml"
    assert load_spec(short).name == f"s{MAX_EXTENDS - 1}"


@pytest.mark.parametrize("name", ["../../escaped-name", "/some/abs/path", "..", "a/../../b", "x" * 200,
                                  "Table 7: shifts", "C:\\windows", "~root", "-rf", ".hidden"])
def test_slug_is_one_component_inside_its_root(name, tmp_path):
    slug = path_slug(name)
    assert "/" not in slug and "\\" not in slug and slug not in (".", "..") and not slug.startswith((".", "-"))
    for root in ("checkpoints", "reports"):
        folder = (tmp_path / root / slug).resolve()
        assert folder.parent == (tmp_path / root).resolve()
    assert len(slug) <= 200


def test_slugs_of_safe_names_are_the_names_and_other_names_never_collide():
    assert path_slug("quickstart") == "quickstart" and path_slug("s2mlp-imagenet100-width+0969f083") == \
        "s2mlp-imagenet100-width+0969f083"
    rng = random.Random(0)
    names = {"".join(rng.choice(string.ascii_letters + "/. -") for _ in range(8)) for _ in range(2000)}
    assert len({path_slug(n) for n in names}) == len(names)


def test_a_name_shaped_like_a_hashed_slug_is_hashed_too():
    """``a/b`` is hashed to ``a-b-c14cddc0``; the name ``a-b-c14cddc0`` must not be that folder too."""
    assert path_slug("a/b") == "a-b-c14cddc0"
    assert path_slug("a-b-c14cddc0") not in ("a-b-c14cddc0", path_slug("a/b"))
    # ordinary names keep the slugs their checkpoints and reports were written under
    for name in ("quickstart", "s2mlp-imagenet100-width", "mixing-digits+1a2b3c4d", "tiny", "a-b-c14cddc",
                 "run-2024", "x-C14CDDC0", "x-c14cddc0z"):
        assert path_slug(name) == name


def test_no_two_names_share_a_slug_even_names_made_from_slugs():
    """Property: over many generated names, and every slug and slug-like variant of them taken as a
    name in its turn, distinct names give distinct slugs."""
    rng = random.Random(1)
    alphabet = string.ascii_letters + string.digits + "/. -_+:"
    names = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)}
    names |= {"a/b", "a-b-c14cddc0", "quickstart", "quickstart-00000000", "x" * 200, "x" * 199 + "/"}
    for _ in range(2):  # a slug is a name someone may pick: "a-b-c14cddc0", then its own slug, ...
        names |= {path_slug(n) for n in names} | {path_slug(n) + "/" for n in list(names)[:500]}
    names |= {f"{n}-{rng.getrandbits(32):08x}" for n in list(names)[:1000]}
    names = {n for n in names if name_problem(n) is None}
    slugs = {}
    for name in names:
        slug = path_slug(name)
        assert slugs.setdefault(slug, name) == name, f"{name!r} and {slugs[slug]!r} share {slug}"
    assert len(names) > 5000


@pytest.mark.parametrize("target", ["fifo", "/dev/zero", "folder"])
def test_a_spec_that_is_not_a_regular_file_is_named_for_what_it_is(target, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
    if target == "folder":
        (tmp_path / "folder").mkdir()
    what = {"fifo": "is not a regular file but a FIFO (allowed: a path to a YAML spec file)",
            "/dev/zero": "is not a regular file but a character device (allowed: a path to a YAML spec file)",
            "folder": "is a folder, not a spec file (allowed: a path to a YAML spec)"}[target]
    with pytest.raises(SpecError) as e:
        load_spec(target)
    assert e.value.problems == [f"{target}: {what}"]
    if target != "folder":  # the command line refuses a folder itself
        assert refused(Path(target)) == f"error: {target}: {what}\n"
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")


@pytest.mark.parametrize("given, meant", [
    ("specs/quickstart.yml", "specs/quickstart.yaml"),     # the other YAML suffix
    ("specs/quickstar.yaml", "specs/quickstart.yaml"),     # a typo
    ("specs/quickstart", "specs/quickstart.yaml"),         # no suffix
    ("specs/run3.yaml", "specs/run1.yaml or specs/run2.yaml"),  # as near as each other
    ("specs/other.yaml", None),                            # nothing near: no guess
    ("nowhere/quickstart.yaml", None)])                    # no such folder
def test_a_missing_spec_path_suggests_the_nearest_spec_files(given, meant, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    for name in ("quickstart.yaml", "run1.yaml", "run2.yaml", "notes.txt"):
        (tmp_path / "specs" / name).write_text(HEAD)
    hint = f"; did you mean {meant}?" if meant else ""
    for command in ("plan", "run"):
        result = CliRunner().invoke(cli, [command, given])
        assert result.exit_code == 2 and result.stderr == \
            f"error: {given}: no such spec file{hint} (allowed: a path to a YAML spec)\n", result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "quickstart.yaml", "run1.yaml", "run2.yaml",
                                                             "specs"]


def test_a_control_character_in_the_name_option_says_allowed_once(tmp_path):
    spec = write_spec(tmp_path / "s.yaml")
    line = refused(spec, "--name", "two\tparts")
    assert line == "error: --name: contains control characters (allowed: printable text, e.g. --name my-ablation)\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text('name: "two\\tparts"\ndata: {name: digits}\n')
    assert refused(bad) == (f"error: {bad}:1: name: contains control characters (allowed: printable text, e.g. "
                            "name: my-ablation)\n")
    for name in ("two\nlines", "", "../..", "\ud800"):
        for problem in (name_problem(name), name_problem(name, example="--name x")):
            assert problem.count("(allowed:") == 1, problem


@pytest.mark.slow
def test_a_name_that_points_elsewhere_writes_only_inside_the_working_directory(workdir, monkeypatch):
    """A cell's checkpoint folder and the report folder are derived from the slug, never the name
    (the slugs of other such names: test_slug_is_one_component_inside_its_root)."""
    name = "../../escaped-name"
    cwd = workdir / "a" / "b"  # two levels to climb, all inside the test's own folder
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("ABLATE_CHECKPOINTS", "checkpoints")
    spec = write_spec(cwd / "s.yaml", name=f'"{name}"', epochs=1)
    loaded = load_spec(spec)
    assert loaded.name == name and loaded.slug != name
    seen = []
    real = train.train_cell

    def spy(cfg, *, checkpoint_dir, **kwargs):  # where the cell's checkpoints go, observed on a real run
        seen.append(Path(checkpoint_dir).resolve())
        return real(cfg, checkpoint_dir=checkpoint_dir, **kwargs)

    monkeypatch.setattr(execute, "train_cell", spy)  # the name the cell's execution calls
    assert run_grid(str(spec), device="cpu", progress=False).ok
    assert seen and all(p.parent == (cwd / "checkpoints" / loaded.slug).resolve() for p in seen)
    report = CliRunner().invoke(cli, ["report", str(spec)])
    assert report.exit_code == 0, report.output
    assert (cwd / "reports" / loaded.slug / "report.md").is_file()
    written = [p for p in workdir.rglob("*") if "escaped" in str(p.relative_to(workdir))]
    assert written and all(p.is_relative_to(cwd / "checkpoints") or p.is_relative_to(cwd / "reports")
                           for p in written), written


def test_grid_string_values_are_not_numbers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(HEAD + "grid:\n  model.depth: ['3', 4]\n")
    with pytest.raises(SpecError, match='got the string "3"'):
        load_spec(path)
