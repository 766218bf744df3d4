"""Safe YAML with line numbers, bounded: a spec file (or a ``--set`` value) -> plain Python values.

Only ``yaml.SafeLoader`` nodes are read, with no tag that constructs a Python object, and the
line of every key and list item is kept so that problems point at it. A spec is a small hand-
written file, so sizes are bounded before anything large is built: the file's size, how deeply
it nests, and how many values it holds once YAML aliases are expanded (an "alias bomb" of a
few hundred bytes names 10^9 values: ``yaml.safe_load`` shares them, but a spec's values are
checked one by one).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from ablate.spec.problems import Problems, Where

#: the largest spec file read, in bytes (the paper's specs are about 2 KB)
MAX_FILE_BYTES = 1 << 20
#: the most values (mappings, lists, scalars, keys) one document may hold, aliases expanded
MAX_VALUES = 100_000
#: the deepest nesting of mappings and lists
MAX_DEPTH = 64

_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Loader(yaml.SafeLoader):
    """SafeLoader with two YAML 1.2 core rules where YAML 1.1 sets classic traps: ``1e-3`` is a
    float (YAML 1.1 wants ``1.0e-3``), and only true/false are booleans (YAML 1.1 also reads
    yes/no/on/off, so ``amp: off`` would be ``false``, not the setting's value ``off``)."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {  # SafeLoader's resolvers without its YAML 1.1 booleans
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


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
            return builder.construct(node, (), lines), lines
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
        try:
            value = self.loader.construct_object(node)
        except yaml.constructor.ConstructorError:
            self.problems.add(self.line_of(line), dotted, f"YAML tag {node.tag} is not allowed (allowed: plain "
                              "strings, numbers, booleans, null)")
            return None
        if isinstance(value, str) and has_surrogate(value):
            is_key = path[-1:] == ("<key>",)
            raise _NotText(line, (".".join(str(p) for p in path[:-1]) or "spec") if is_key else dotted,
                           f"{'a key' if is_key else 'the string'} holds a lone surrogate ({_first_surrogate(value)}), "
                           "which is not text (allowed: valid Unicode text)")
        return value


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone UTF-16 surrogate (YAML's ``"\\ud800"``, or undecodable bytes of a
    command line): Python keeps it, but no file, terminal or database can be given it as UTF-8."""
    return any("\ud800" <= c <= "\udfff" for c in text)


def _first_surrogate(text: str) -> str:
    return next(f"\\u{ord(c):04x}" for c in text if "\ud800" <= c <= "\udfff")


# ---- environment variables -------------------------------------------------------------------

def expand_env(value: Any, path: tuple, unset: Callable[[tuple, str], None]) -> Any:
    """``${VAR}`` and ``${VAR:-default}`` in every string, as in the shell (an empty variable
    takes the default too). ``unset(path, name)`` is told of each variable that is unset and
    has no default; its ``${VAR}`` is left in the string."""
    if isinstance(value, dict):
        return {k: expand_env(v, path + (k,), unset) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, path + (i,), unset) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        got = os.environ.get(name)
        if got:
            return got
        if default is not None:
            return default
        unset(path, name)
        return m.group(0)

    return _ENV.sub(substitute, value)
