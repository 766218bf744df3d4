"""Safe YAML with line numbers, bounded: a spec file (or a ``--set`` value) -> plain Python values.

Only ``yaml.SafeLoader`` nodes are read, with no tag that constructs a Python object, and the
line of every key and list item is kept so that problems point at it. A spec is a small hand-
written file, so sizes are bounded before anything large is built: the file's size, how deeply
it nests, and how many values it holds once YAML aliases are expanded (an "alias bomb" of a
few hundred bytes names 10^9 values: ``yaml.safe_load`` shares them, but a spec's values are
checked one by one).

Plain scalars are read as YAML 1.2's core schema reads them (:class:`_Loader`), so that no
number is silently another than the one written (YAML 1.1 reads ``010`` as 8 and ``1:30`` as 90).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from ablate.spec.problems import Problems, Substituted, Where

#: the largest spec file read, in bytes (the paper's specs are about 2 KB)
MAX_FILE_BYTES = 1 << 20
#: the most values (mappings, lists, scalars, keys) one document may hold, aliases expanded
MAX_VALUES = 100_000
#: the deepest nesting of mappings and lists
MAX_DEPTH = 64

_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Loader(yaml.SafeLoader):
    """SafeLoader reading plain scalars as YAML 1.2's core schema does, where YAML 1.1 sets traps.

    Booleans are only true/false (YAML 1.1 also reads yes/no/on/off, so ``amp: off`` would be
    ``false``, not the setting's value ``off``). Numbers: decimal integers, ``0x`` hex and ``0o``
    octal; floats with a dot or an exponent (``1e-3``: YAML 1.1 wants ``1.0e-3``), ``.inf``,
    ``.nan``; ``_`` may group the digits of a decimal number (``1_000``). No base 60 (YAML 1.1
    reads ``1:30`` as 90: here it is a string), no ``0b`` binary, no timestamps (``2024-01-01``
    is a string). An integer with a leading zero (``010``: octal 8 in YAML 1.1, decimal 10 in
    YAML 1.2) is refused as ambiguous (:data:`LEADING_ZERO`)."""


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
#: the tag of an integer written with a leading zero: refused where it is read, never constructed
LEADING_ZERO = "tag:ablate,2024:leading-zero-int"
#: the tags a scalar may have, implicit or written (``!!str 010``)
_SCALAR_TAGS = {"tag:yaml.org,2002:str", _INT, _FLOAT, _BOOL, "tag:yaml.org,2002:null"}
_KEPT = ("tag:yaml.org,2002:null", "tag:yaml.org,2002:merge")  # as in SafeLoader (and YAML 1.2)
_Loader.yaml_implicit_resolvers = {  # SafeLoader's null and merge-key resolvers, nothing of YAML 1.1's others
    first: [(tag, regexp) for tag, regexp in resolvers if tag in _KEPT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F]+|0o[0-7]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(LEADING_ZERO, re.compile(r"^[-+]?0[0-9_]+$"), list("-+0"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
                   |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    """A YAML 1.2 integer: decimal (``_`` groups digits), ``0x`` hex, ``0o`` octal; signed or not."""
    text = loader.construct_scalar(node).replace("_", "")
    sign = -1 if text[0] == "-" else 1
    digits = text.lstrip("+-")
    if digits[:2] in ("0x", "0o"):
        return sign * int(digits[2:], 16 if digits[1] == "x" else 8)
    return sign * int(digits, 10)


_Loader.add_constructor(_INT, _construct_int)


def leading_zero_problem(text: str) -> str:
    """Why an integer written with a leading zero is refused, and what to write instead."""
    digits = text.replace("_", "")
    sign = "-" if digits[0] == "-" else ""
    digits = digits.lstrip("+-").lstrip("0") or "0"
    if len(digits) > 30:  # no one means such a number; nor can Python print one of 4,300 digits
        return f"{shown(text)}: an integer with a leading zero (allowed: an integer without one)"
    if set(digits) <= set("01234567") and int(digits, 8) != int(digits, 10):
        return (f"{text}: a leading zero makes it octal {sign}{int(digits, 8)} in YAML 1.1 and decimal "
                f"{sign}{digits} in YAML 1.2 (allowed: {sign}{digits}, or {sign}0o{digits} for octal)")
    return (f"{text}: an integer with a leading zero is read differently by YAML 1.1 and YAML 1.2 "
            f"(allowed: {sign}{digits})")


def shown(text: str, limit: int = 40) -> str:
    """``text``, cut to ``limit`` characters for a message."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _NotText(Exception):
    """Raised for a string no file, terminal or database can hold; the document is not used."""

    def __init__(self, line: int, field: str, problem: str):
        super().__init__(problem)
        self.line, self.field, self.problem = line, field, problem


class _TooLarge(Exception):
    """Raised inside the construction of a document that exceeds a bound; reported as a problem."""

    def __init__(self, message: str, path: tuple):
        super().__init__(message)
        self.path = path


def read_yaml_file(path: Path, shown: str, problems: Problems) -> tuple[Any, dict[tuple, int]]:
    """The document's plain Python value and the line of every key and list item in it.

    ``(None, {})`` when it cannot be read; the reason is in ``problems``.
    """
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        problems.add((shown, 1), "file", f"{size:,} bytes (allowed: a spec of at most {MAX_FILE_BYTES:,} bytes)")
        return None, {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        problems.add((shown, 1), "file", f"not UTF-8 text ({e.reason}) (allowed: a UTF-8 YAML file)")
        return None, {}
    except OSError as e:  # no permission to read it
        problems.add((shown, 1), "file", f"cannot be read ({e.strerror}) (allowed: a spec file you can read)")
        return None, {}
    return read_yaml_text(text, shown, problems, line_of=lambda line: (shown, line),
                          empty=("spec", "the file is empty (allowed: a mapping with name, data, model, train and "
                                 "optionally grid, zip, exclude, seeds, search, reference, extends)"))


def read_yaml_text(text: str, shown: str, problems: Problems, line_of: Callable[[int], Where],
                   empty: tuple[str, str]) -> tuple[Any, dict[tuple, int]]:
    """A YAML document from ``text``; ``line_of(line)`` places a problem (a file's line, or an
    option); ``empty`` is the (field, problem) reported for a document with nothing in it."""
    try:
        loader = _Loader(text)
    except yaml.YAMLError as e:  # the reader refuses a character YAML does not allow (a lone surrogate)
        what = (f"character #x{e.character:04x} at position {e.position}: {e.reason}"
                if isinstance(e, yaml.reader.ReaderError) else _first_line(e))
        line = text.count("\n", 0, e.position) + 1 if isinstance(e, yaml.reader.ReaderError) else 1
        problems.add(line_of(line), "yaml", f"{what} (allowed: printable UTF-8 text)")
        return None, {}
    try:
        try:
            too_deep = _too_deep(text)
            if too_deep:
                problems.add(line_of(too_deep), "yaml", f"nested more than {MAX_DEPTH} levels deep "
                             f"(allowed: at most {MAX_DEPTH})")
                return None, {}
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            what = e.problem or e.context or "invalid YAML"
            if e.context and e.context_mark and e.problem:
                what += f" ({e.context} at line {e.context_mark.line + 1})"
            problems.add(line_of(mark.line + 1 if mark else 1), "yaml", f"syntax error: {what} (allowed: valid YAML)")
            return None, {}
        except yaml.YAMLError as e:
            problems.add(line_of(1), "yaml", f"syntax error: {e} (allowed: valid YAML)")
            return None, {}
        if node is None:
            problems.add(line_of(1), *empty)
            return None, {}
        lines: dict[tuple, int] = {}
        builder = _Builder(loader, shown, problems, line_of)
        try:
            value = builder.construct(node, (), lines)
            if builder.unusable:  # its values are not what the author may have meant: none is used
                return None, {}
            return value, lines
        except _TooLarge as e:  # reported at the top-level key whose value grew too large
            top = e.path[:1]
            problems.add(line_of(lines.get(top, 1)), str(top[0]) if top else "yaml", str(e))
            return None, {}
        except _NotText as e:  # one line: whatever reads the string next would only stumble on it again
            problems.add(line_of(e.line), e.field, e.problem)
            return None, {}
    finally:
        loader.dispose()


_OPEN = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
         yaml.FlowSequenceStartToken)
_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _too_deep(text: str) -> int:
    """The line where collections first nest deeper than :data:`MAX_DEPTH`, else 0. PyYAML's
    composer recurses once per level, so a document of thousands of ``[`` would exhaust the
    stack; its scanner does not, and counts the levels first."""
    depth = 0
    for token in yaml.scan(text, Loader=_Loader):
        if isinstance(token, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                return token.start_mark.line + 1
        elif isinstance(token, _CLOSE):
            depth -= 1
    return 0


class _Builder:
    """Builds plain values from nodes, recording lines, refusing tags, counting what it builds."""

    def __init__(self, loader: _Loader, shown: str, problems: Problems, line_of: Callable[[int], Where]):
        self.loader, self.shown, self.problems, self.line_of = loader, shown, problems, line_of
        self.count = 0
        self.unusable = False    # a value was refused as written (a tag, a leading zero): none is used

    def construct(self, node: yaml.Node, path: tuple, lines: dict) -> Any:
        line = node.start_mark.line + 1
        self.count += 1
        if self.count > MAX_VALUES:
            raise _TooLarge(f"more than {MAX_VALUES:,} values once aliases are expanded (allowed: a spec "
                            f"of at most {MAX_VALUES:,} values; an alias repeats every value of its anchor)", path)
        if len(path) > MAX_DEPTH:
            raise _TooLarge(f"nested more than {MAX_DEPTH} levels deep (allowed: at most {MAX_DEPTH}; "
                            "an alias inside its own anchor nests without end)", path)
        lines.setdefault(path, line)
        dotted = ".".join(str(p) for p in path) or "spec"
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
            self.problems.add(self.line_of(line), dotted, f"YAML tag {node.tag} is not allowed (allowed: plain "
                              "mappings, lists, strings, numbers, booleans)")
            self.unusable = True
            return None
        if isinstance(node, yaml.MappingNode):
            try:
                self.loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
            except yaml.constructor.ConstructorError as e:
                self.problems.add(self.line_of(line), dotted, f"{e.problem} (allowed: <<: *anchor of a mapping)")
                return None
            out = {}
            for key_node, value_node in node.value:
                key_line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    self.problems.add(self.line_of(key_line), dotted, "a key must be a plain word")
                    continue
                key = self.construct(key_node, path + ("<key>",), {})
                if key in out:
                    self.problems.add(self.line_of(key_line), ".".join(map(str, path + (key,))),
                                      "duplicate key (allowed: each key once per mapping)")
                lines[path + (key,)] = key_line
                out[key] = self.construct(value_node, path + (key,), lines)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.construct(item, path + (i,), lines) for i, item in enumerate(node.value)]
        if node.tag == LEADING_ZERO:  # ambiguous between YAML 1.1 and 1.2: the document is not used
            is_key = path[-1:] == ("<key>",)
            self.problems.add(self.line_of(line), (".".join(str(p) for p in path[:-1]) or "spec") if is_key
                              else dotted, leading_zero_problem(node.value))
            self.unusable = True
            return node.value
        if node.tag not in _SCALAR_TAGS:  # !!timestamp, !!binary, !!python/...: nothing a setting takes
            self.problems.add(self.line_of(line), dotted, f"YAML tag {node.tag} is not allowed (allowed: plain "
                              "strings, numbers, booleans, null)")
            self.unusable = True
            return None
        try:
            value = self.loader.construct_object(node)
        except (yaml.constructor.ConstructorError, ValueError):  # !!int abc; more digits than Python reads
            self.problems.add(self.line_of(line), dotted, f"{shown(node.value)!r} cannot be read as "
                              f"!!{node.tag.rpartition(':')[2]} (allowed: a value its YAML tag can read, or no tag)"
                              if len(node.value) < 4000 else f"{shown(node.value)!r}: {len(node.value):,} "
                              "characters (allowed: a number of at most 4,000 digits)")
            self.unusable = True
            return None
        if isinstance(value, str) and has_surrogate(value):
            is_key = path[-1:] == ("<key>",)
            raise _NotText(line, (".".join(str(p) for p in path[:-1]) or "spec") if is_key else dotted,
                           f"{'a key' if is_key else 'the string'} holds a lone surrogate ({_first_surrogate(value)}), "
                           "which is not text (allowed: valid Unicode text)")
        if node.style is None and isinstance(value, str) and _ENV.fullmatch(value):
            return BareVariable(value)  # read as YAML reads the text it stands for (expand_env)
        return value


class BareVariable(str):
    """A plain (unquoted) scalar that is one ``${VAR}`` or ``${VAR:-default}`` and nothing else:
    :func:`expand_env` reads what it stands for as YAML reads a plain scalar (``3`` an integer)."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone UTF-16 surrogate (YAML's ``"\\ud800"``, or undecodable bytes of a
    command line): Python keeps it, but no file, terminal or database can be given it as UTF-8."""
    return any("\ud800" <= c <= "\udfff" for c in text)


def _first_surrogate(text: str) -> str:
    return next(f"\\u{ord(c):04x}" for c in text if "\ud800" <= c <= "\udfff")


# ---- environment variables -------------------------------------------------------------------

def expand_env(value: Any, path: tuple, unset: Callable[[tuple, str], None],
               problem: Callable[[tuple, str], None]) -> Any:
    """``${VAR}`` and ``${VAR:-default}`` in every string, as in the shell (an empty variable
    takes the default too). ``unset(path, name)`` is told of each variable that is unset and
    has no default; its ``${VAR}`` is left in the string.

    A value written as one bare ``${VAR}`` (unquoted, nothing around it: a :class:`BareVariable`)
    is read as YAML reads the text it stands for written there: ``epochs: ${EP:-3}`` is the
    integer 3, ``randaugment: ${RA:-null}`` none, ``${NAME}`` a string unless it reads as a
    number, true/false or null. Quoted (``"${EP}"``) or inside other text (``x-${EP}``), a
    substitution gives a string, a :class:`~ablate.spec.problems.Substituted` that remembers what
    was written so that a type error can say so. ``problem(path, text)`` is told of a variable
    whose text is an integer with a leading zero (refused as in a spec)."""
    if isinstance(value, dict):
        return {k: expand_env(v, path + (k,), unset, problem) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, path + (i,), unset, problem) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    found, missing = [], []

    def substitute(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        found.append(name)
        got = os.environ.get(name)
        if got:
            return got
        if default is not None:
            return default
        unset(path, name)
        missing.append(name)
        return m.group(0)

    text = _ENV.sub(substitute, value)
    if missing or not found:
        return str(text)
    if isinstance(value, BareVariable):
        tag, read = plain_scalar(text)
        if tag == LEADING_ZERO:
            problem(path, f"{value} gives {leading_zero_problem(text)}")
            return read
        if tag != "tag:yaml.org,2002:str":
            return read
        return Substituted(text, str(value), "bare")
    return Substituted(text, value, "quoted" if _ENV.fullmatch(value) else "inside")


def plain_scalar(text: str) -> tuple[str, Any]:
    """``(tag, value)`` of ``text`` read as a plain YAML scalar with this loader's rules: ``3`` an
    integer, ``1e-3`` a float, ``true`` a boolean, ``null`` (or nothing) none, else the string.
    Only a scalar: ``[1, 2]`` or ``a: b`` stays the text. An integer with a leading zero is
    ``(LEADING_ZERO, its decimal value)``."""
    loader = _Loader("")
    try:
        tag = loader.resolve(yaml.ScalarNode, text, (True, False))
        if tag == LEADING_ZERO:
            return tag, int(text.replace("_", ""), 10)
        if tag not in (_BOOL, _INT, _FLOAT, "tag:yaml.org,2002:null"):
            return "tag:yaml.org,2002:str", text
        return tag, loader.construct_object(yaml.ScalarNode(tag, text))
    except ValueError:  # more digits than Python converts (4,300): the text, which a setting refuses
        return "tag:yaml.org,2002:str", text
    finally:
        loader.dispose()
