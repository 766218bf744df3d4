"""Numbers in a spec and in ``--set`` are read as YAML 1.2's core schema reads them: never as
another number than the one written (YAML 1.1 reads ``010`` as 8, ``1:30`` as 90). An integer
with a leading zero, which the two versions read differently, is refused in one line. A bare
``${VAR}`` is read as YAML reads the text it stands for; a substitution that stays a string says so."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from ablate.cli import cli
from ablate.errors import SpecError
from ablate.spec import load_spec

HEAD = """\
name: numbers
data: {name: digits}
model: {image_size: 16, patch_size: 4, width: 64, depth: 2, mlp_ratio: 2}
"""


def write(path: Path, train: str, head: str = HEAD) -> Path:
    path.write_text(head + "train:\n" + textwrap.indent(textwrap.dedent(train), "  "))
    return path


def refused(*args: str) -> str:
    """The one line ``ablate plan`` prints for ``args`` (exit 2, no traceback), without ``error: ``."""
    result = CliRunner().invoke(cli, ["plan", *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1, result.stderr
    return result.stderr.strip().removeprefix("error: ")


# ---- what is a number ------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, text, value", [
    ("batch_size", "0x40", 64),          # hex, as YAML 1.2 writes it
    ("batch_size", "0o17", 15),          # octal, as YAML 1.2 writes it (YAML 1.1: the string 0o17)
    ("batch_size", "1_024", 1024),       # digits grouped, as YAML 1.1 and Python allow
    ("epochs", "10", 10),
    ("lr", "1e-3", 1e-3),                # YAML 1.1: the string 1e-3
    ("lr", "1.0e-3", 1e-3),
    ("lr", "5.", 5.0),
    ("lr", ".5", 0.5),
    ("lr", "01.5", 1.5),                 # a float with a leading zero is 1.5 in both versions
    ("lr", "+1E3", 1000.0),
])
def test_numbers_are_read_as_yaml_1_2_reads_them(setting, text, value, tmp_path):
    in_file = load_spec(write(tmp_path / "s.yaml", f"{setting}: {text}\n"))
    by_option = load_spec(write(tmp_path / "t.yaml", ""), overrides=[f"train.{setting}={text}"])
    for spec in (in_file, by_option):
        got = getattr(spec.base.train, setting)
        assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text, got", [
    ("1:30", "1:30"),                    # base 60: YAML 1.1 reads 90
    ("1:30:00", "1:30:00"),
    ("0b101", "0b101"),                  # binary: YAML 1.1 reads 5
    ("2024-01-01", "2024-01-01"),        # a date: YAML 1.1 builds a datetime.date
])
def test_what_yaml_1_1_reads_as_a_number_is_a_string(text, got, tmp_path):
    path = write(tmp_path / "s.yaml", f"lr: {text}\n")
    assert refused(str(path)) == f"{path}:5: train.lr: expected a number, got {got} (allowed: float > 0)"
    assert refused(str(write(tmp_path / "t.yaml", "")), "--set", f"train.lr={text}") == \
        f"--set train.lr={text}: expected a number, got {got} (allowed: float > 0)"
    # where a string is wanted, it is the text as written
    described = HEAD.replace("name: numbers", f"name: numbers\ndescription: {text}")
    assert load_spec(write(tmp_path / "d.yaml", "epochs: 1\n", head=described)).description == text


# ---- a leading zero ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    ("010", "010: a leading zero makes it octal 8 in YAML 1.1 and decimal 10 in YAML 1.2 "
            "(allowed: 10, or 0o10 for octal)"),
    ("-010", "-010: a leading zero makes it octal -8 in YAML 1.1 and decimal -10 in YAML 1.2 "
             "(allowed: -10, or -0o10 for octal)"),
    ("09", "09: an integer with a leading zero is read differently by YAML 1.1 and YAML 1.2 (allowed: 9)"),
    ("007", "007: an integer with a leading zero is read differently by YAML 1.1 and YAML 1.2 (allowed: 7)"),
    ("0_12", "0_12: a leading zero makes it octal 10 in YAML 1.1 and decimal 12 in YAML 1.2 "
             "(allowed: 12, or 0o12 for octal)"),
])
def test_an_integer_with_a_leading_zero_is_refused_in_one_line(text, problem, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "s.yaml", f"batch_size: 32\nepochs: {text}\n")
    assert refused(str(path)) == f"{path}:6: train.epochs: {problem}"
    assert refused(str(write(tmp_path / "t.yaml", "")), "--set", f"train.epochs={text}") == \
        f"--set train.epochs={text}: {problem}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml", "t.yaml"]


def test_every_leading_zero_of_a_file_is_named_and_nothing_else_is_read(tmp_path):
    path = write(tmp_path / "s.yaml", "epochs: 010\nbatch_size: 0\nwarmup_epochs: 01\n")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert e.value.problems == [  # batch_size 0 is reported once the numbers are unambiguous
        f"{path}:5: train.epochs: 010: a leading zero makes it octal 8 in YAML 1.1 and decimal 10 in YAML 1.2 "
        "(allowed: 10, or 0o10 for octal)",
        f"{path}:7: train.warmup_epochs: 01: an integer with a leading zero is read differently by YAML 1.1 and "
        "YAML 1.2 (allowed: 1)"]


def test_the_suggested_values_are_read_as_suggested(tmp_path):
    path = write(tmp_path / "s.yaml", "epochs: 10\nbatch_size: 0o10\n")
    spec = load_spec(path)
    assert (spec.base.train.epochs, spec.base.train.batch_size) == (10, 8)
    # a quoted "010" is a string, as ever; an explicit !!int reads decimal
    assert "got the string \"010\"" in refused(str(write(tmp_path / "q.yaml", "epochs: \"010\"\n")))
    assert load_spec(write(tmp_path / "i.yaml", "epochs: !!int 010\n")).base.train.epochs == 10


def test_explicit_scalar_tags_are_read_or_refused_in_one_line(tmp_path):
    path = write(tmp_path / "s.yaml", "epochs: !!int abc\n")
    assert refused(str(path)) == (f"{path}:5: train.epochs: 'abc' cannot be read as !!int (allowed: a value "
                                  "its YAML tag can read, or no tag)")
    path = write(tmp_path / "t.yaml", "epochs: !!timestamp 2024-01-01\n")
    assert refused(str(path)) == (f"{path}:5: train.epochs: YAML tag tag:yaml.org,2002:timestamp is not allowed "
                                  "(allowed: plain strings, numbers, booleans, null)")


# ---- ${VAR} ----------------------------------------------------------------------------------------

def test_a_bare_variable_is_read_as_yaml_reads_its_text(tmp_path, monkeypatch):
    monkeypatch.delenv("ABLATE_TEST_EP", raising=False)
    monkeypatch.delenv("ABLATE_TEST_RA", raising=False)
    monkeypatch.setenv("ABLATE_TEST_LR", "1e-3")
    monkeypatch.setenv("ABLATE_TEST_NAME", "2024")
    head = HEAD.replace("name: numbers", 'name: "${ABLATE_TEST_NAME}"')
    path = write(tmp_path / "s.yaml", """\
        epochs: ${ABLATE_TEST_EP:-3}
        lr: ${ABLATE_TEST_LR}
        randaugment: ${ABLATE_TEST_RA:-null}
        compile: ${ABLATE_TEST_RA:-false}
        """, head=head)
    spec = load_spec(path)
    train = spec.base.train
    assert (train.epochs, train.lr, train.randaugment, train.compile) == (3, 1e-3, None, False)
    assert spec.name == "2024"  # quoted: a string, as any quoted YAML value
    monkeypatch.setenv("ABLATE_TEST_EP", "0x10")
    assert load_spec(path).base.train.epochs == 16
    monkeypatch.setenv("ABLATE_TEST_EP", "010")
    assert refused(str(path)) == (f"{path}:5: train.epochs: ${{ABLATE_TEST_EP:-3}} gives 010: a leading zero makes "
                                  "it octal 8 in YAML 1.1 and decimal 10 in YAML 1.2 (allowed: 10, or 0o10 for octal)")
    monkeypatch.setenv("ABLATE_TEST_EP", "[1, 2]")  # a scalar only: the text, which an integer setting refuses
    assert refused(str(path)) == (f"{path}:5: train.epochs: expected an integer, got [1, 2] "
                                  "(from ${ABLATE_TEST_EP:-3}) (allowed: int > 0)")
    monkeypatch.setenv("ABLATE_TEST_EP", " 3")  # no plain YAML scalar starts with a space: a string
    assert refused(str(path)) == (f'{path}:5: train.epochs: expected an integer, got the string " 3" from '
                                  "${ABLATE_TEST_EP:-3}, which YAML reads as a string (allowed: int > 0)")


def test_a_substitution_that_stays_a_string_says_where_it_came_from(tmp_path, monkeypatch):
    monkeypatch.delenv("EP", raising=False)
    quoted = write(tmp_path / "q.yaml", 'epochs: "${EP:-3}"\n')
    assert refused(str(quoted)) == (
        f'{quoted}:5: train.epochs: expected an integer, got the string "3" from "${{EP:-3}}": a substitution in '
        "quotes gives a string (write ${EP:-3} without quotes for YAML to read it) (allowed: int > 0)")
    inside = write(tmp_path / "i.yaml", "epochs: ${EP:-3}0\n")
    assert refused(str(inside)) == (
        f'{inside}:5: train.epochs: expected an integer, got the string "30" from ${{EP:-3}}0: a substitution '
        "inside other text gives a string (write one bare ${VAR} as the whole value for YAML to read it) "
        "(allowed: int > 0)")
    # in a grid too
    grid = write(tmp_path / "g.yaml", "epochs: 1\n", head=HEAD + 'grid:\n  model.depth: ["${EP:-3}", 4]\n')
    assert 'cell model.depth=3: expected an integer, got the string "3" from "${EP:-3}"' in refused(str(grid))
