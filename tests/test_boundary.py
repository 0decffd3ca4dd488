"""The house rules between the library and the command line (issue 10, items 4 and 5), checked on the source.

- No module outside ``qkweights/cli/`` prints: no ``print(``, no ``sys.stdout``/``sys.stderr``
  (writing, or handing them to something that writes, e.g. ``file=sys.stderr``), no ``input(``.
  The library reports through :class:`qkweights.workflow.Reporter` and ``QkWarning``.
- Progress bars and exit codes are command-line things: ``progress.py`` and ``EXIT_*`` live in ``cli/``.
- Library messages word options for the API (``part=…``), never as flags (``--part``).
- The import graph has no cycle. An edge is any ``import``/``from … import`` of a ``qkweights``
  module, at module level **or inside a function** (a deferred import is a cycle put off, not
  removed); imports under ``if TYPE_CHECKING:`` do not count (they never run).
  ``from qkweights import figures`` is an edge to ``qkweights.figures``, not to the package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "qkweights"
CLI = ROOT / "cli"
LIBRARY = sorted(
    p for p in ROOT.rglob("*.py") if CLI not in p.parents and p.name != "__main__.py"
)  # __main__: the CLI entry

# Cycles allowed for now (each a cycle's modules, sorted): none.
KNOWN_CYCLES = []


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in ROOT.rglob("*.py")}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _is_std_stream(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr in ("stdout", "stderr")
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    )


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_module_never_prints(path):
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "input"):
            found.append(f"line {node.lineno}: {node.func.id}(")
        if _is_std_stream(node):
            found.append(f"line {node.lineno}: sys.{node.attr}")
    assert not found, (
        f"{path.name} writes to the terminal ({'; '.join(found)}); report through a Reporter or a QkWarning"
    )


def test_progress_bars_and_exit_codes_live_in_the_cli():
    assert not (ROOT / "progress.py").exists() and (CLI / "progress.py").exists()
    for path in LIBRARY:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Name | ast.alias):
                name = node.id if isinstance(node, ast.Name) else node.name
                assert not name.startswith("EXIT_"), f"{path.name} uses {name}: exit codes live in qkweights.cli.exits"
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("qkweights.cli"), f"{path.name} imports {node.module}"
                assert "tqdm" not in node.module, f"{path.name} draws a progress bar"


_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_library_messages_word_options_for_the_api(path):
    """Strings in ``raise …(…)`` and ``warnings.warn(…)`` name no flag (``--part``); commands of other tools may."""
    found = []
    for node in ast.walk(_tree(path)):
        call = node.exc if isinstance(node, ast.Raise) else node
        if not isinstance(call, ast.Call):
            continue
        name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
        if not (isinstance(node, ast.Raise) or name == "warn"):
            continue
        for sub in ast.walk(call):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                text = re.sub(r"`[^`]*`", "", sub.value)  # a quoted command line of another tool (`hf download …`)
                found += [f"line {sub.lineno}: {m}" for m in _FLAG.findall(text)]
    assert not found, f"{path.name}: {'; '.join(found)}"


def _imports(path: Path) -> set[str]:
    out: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            ):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node):
            out.update(a.name for a in node.names if a.name in MODULES)

        def visit_ImportFrom(self, node):
            if node.level or not node.module or node.module not in MODULES:
                return
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            out.update(subs)
            if len(subs) < len(node.names):  # a name defined in the module itself
                out.add(node.module)

    Visitor().visit(_tree(path))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    assert ("qkweights.checkpoints.folders" in graph["qkweights.checkpoints.hub"]) and (
        "qkweights.checkpoints.source" not in graph["qkweights.checkpoints.hub"]
    )
    new = [c for c in _cycles(graph) if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert _cycles({"a": {"b"}, "b": set()}) == []


DOCS = ROOT.parent / "docs"
_CITATION = re.compile(r"\bmethod(?:\.md)? §(\d+)")


def test_every_method_citation_names_a_section_of_docs_method_md():
    """``method.md §N`` (or ``method §N``) in the package and the tests names a ``## N.`` section of docs/method.md;
    ``checkpoints.md`` cited anywhere exists in docs/."""
    sections = set(re.findall(r"^## (\d+)\.", (DOCS / "method.md").read_text(encoding="utf-8"), re.M))
    cited, checkpoints = {}, False
    for path in sorted(ROOT.rglob("*.py")) + sorted((ROOT.parent / "tests").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        checkpoints |= "checkpoints.md" in text
        for n in _CITATION.findall(text):
            cited.setdefault(n, path.name)
    assert cited and not {n: f for n, f in cited.items() if n not in sections}
    assert not checkpoints or (DOCS / "checkpoints.md").is_file()
