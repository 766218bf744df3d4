"""The import graph of ``ablate``: no cycle, and every import at the top of its module.

An import inside a function hides a cycle as easily as it defers a cost, so there is one way to
import late, and it says why: a ``# lazy: <reason>`` comment on the import's line (or on the line
of a dynamic import: ``importlib.import_module``, ``__import__``, ``spec_from_file_location``).
The reason is what the deferral buys, measured: a command that must not pay for a heavy package
(torch, timm, MLflow, Optuna, scikit-learn, SciPy's stats) imports the module that needs it only
where it is used. ``ablate/__init__.py`` states the rule for the package.

Cycles are counted among the imports that run when a module is imported: those at module level
(in ``if``/``try`` blocks and class bodies too), each ``import ablate.a.b`` also running the
package ``ablate.a``; type-only imports (``if TYPE_CHECKING:``) and lazy ones are left out.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ablate"
LAZY = "# lazy:"
DYNAMIC = ("import_module", "__import__", "spec_from_file_location")

@dataclass(frozen=True)
class Import:
    module: str      # the importing module
    target: str      # the module imported (``from a import b``: ``a.b`` where that is a module)
    line: int
    lazy: bool       # marked ``# lazy:``
    runtime: bool    # runs when ``module`` is imported (not inside a function, not type-only)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """Every import statement (and dynamic import call) of one module."""
    lines = path.read_text().splitlines()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[Import] = []

    def marked(node: ast.AST) -> bool:
        return LAZY in lines[node.lineno - 1]

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            parts = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]

    def visit(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            runtime = False
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, runtime)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.extend(Import(name, t, node.lineno, marked(node), runtime) for t in targets(node))
        elif isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in DYNAMIC:
                out.append(Import(name, f"<{func}>", node.lineno, marked(node), False))
        for child in ast.iter_child_nodes(node):
            visit(child, runtime)

    visit(ast.parse(path.read_text()), True)
    return out


def graph(late: bool = False) -> tuple[dict[str, set[str]], list[Import]]:
    """``{module: the ablate modules its import runs}`` (with ``late``: or any of its functions
    imports) and every import of the package."""
    known = modules()
    every = [i for name, path in known.items() for i in imports(name, path, known)]
    edges: dict[str, set[str]] = {name: set() for name in known}
    for i in every:
        if not (i.runtime or late) or not i.target.startswith("ablate."):
            continue
        target = i.target
        while target not in known:
            target = target.rpartition(".")[0]
        parts = target.split(".")
        for n in range(2, len(parts) + 1):  # ablate.a.b runs ablate.a first (the module's own packages aside)
            step = ".".join(parts[:n])
            if step != i.module and not i.module.startswith(step + "."):
                edges[i.module].add(step)
    return edges, every


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycle():
    edges, _ = graph()
    found = cycles(edges)
    shown = ["; ".join(f"{m} -> {', '.join(sorted(edges[m] & set(c)))}" for m in c) for c in found]
    assert not found, "import cycles:\n" + "\n".join(shown)


def test_no_cycle_through_a_function_either():
    """Counting the imports inside functions too (lazy ones included): a late import defers a
    cost, it must not be what keeps two modules from importing each other."""
    edges, _ = graph(late=True)
    found = cycles(edges)
    shown = ["; ".join(f"{m} -> {', '.join(sorted(edges[m] & set(c)))}" for m in c) for c in found]
    assert not found, "import cycles through functions:\n" + "\n".join(shown)


def test_imports_sit_at_the_top_unless_marked_lazy():
    _, every = graph()
    unexplained = [f"{i.module}, line {i.line}: {i.target}" for i in every if not i.runtime and not i.lazy]
    assert not unexplained, ("imports inside functions without `# lazy: <reason>` (move them to the top, or say "
                             "what importing late buys):\n" + "\n".join(unexplained))


def test_lazy_imports_say_why():
    _, every = graph()
    lines = {name: path.read_text().splitlines() for name, path in modules().items()}
    bare = [f"{i.module}:{i.line}" for i in every if i.lazy
            and not lines[i.module][i.line - 1].split(LAZY, 1)[1].strip()]
    assert not bare, "`# lazy:` without a reason: " + ", ".join(bare)


def test_a_cycle_and_a_late_import_are_found(tmp_path):
    """The checks themselves: a two-module cycle and an unmarked import inside a function."""
    (tmp_path / "a.py").write_text("import ablate.b\n\ndef f():\n    import json\n    import os  # lazy: why\n")
    (tmp_path / "b.py").write_text("from ablate import a\nfrom typing import TYPE_CHECKING\n"
                                   "if TYPE_CHECKING:\n    import ablate.c\n")
    (tmp_path / "c.py").write_text("import ablate.a\n")
    known = {"ablate.a": tmp_path / "a.py", "ablate.b": tmp_path / "b.py", "ablate.c": tmp_path / "c.py"}
    found = {n: imports(n, p, known) for n, p in known.items()}
    assert [(i.target, i.runtime, i.lazy) for i in found["ablate.a"]] == [
        ("ablate.b", True, False), ("json", False, False), ("os", False, True)]
    assert [i.target for i in found["ablate.b"]] == ["ablate.a", "typing"]  # the type-only import is not run
    edges = {"ablate.a": {"ablate.b"}, "ablate.b": {"ablate.a"}, "ablate.c": {"ablate.a"}}
    assert cycles(edges) == [["ablate.a", "ablate.b"]]
