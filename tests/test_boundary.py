"""The house rules, checked on the source: between the library and the command line (issue 10, items 4 and 5), and
the house by stage (issue 16, item 7; docs/layout.md).

- No module outside ``qkweights/cli/`` prints: no ``print(``, no ``sys.stdout``/``sys.stderr``
  (writing, or handing them to something that writes, e.g. ``file=sys.stderr``), no ``input(``.
  The library reports through :class:`qkweights.workflow.Reporter` and ``QkWarning``.
- Progress bars and exit codes are command-line things: ``progress.py`` and ``EXIT_*`` live in ``cli/``.
- Library messages word options for the API (``part=…``), never as flags (``--part``).
- An import edge is any ``import``/``from … import`` of a ``qkweights`` module, at module level, **inside a
  function** (a deferred import is a cycle put off, not removed) and **under** ``if TYPE_CHECKING:`` (what the type
  checker reads is a dependency too), and ``importlib.import_module("qkweights.…")`` with a literal name.
  ``from qkweights import figures`` is an edge to ``qkweights.figures``, not to the package.
- The import graph has no cycle.
- Each module imports only from its own stage or earlier ones (``STAGES``: foundation, checkpoints, specs, weights,
  vision | datasets, analyses, figures, atlas, workflow, cli); vision and datasets do not import each other.
- No module takes a private name (``_x``) from another qkweights module.
- No module is over ``MAX_LINES`` = 600 lines.
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


# The stage of each name directly under qkweights (a package with all its modules, or a module): (rank, stage).
# A module may import from its own stage, or from a stage of lower rank (docs/layout.md). vision and datasets share
# rank 4 and may not import each other. Every module must be listed here (a new package gets a stage).
STAGES = {
    "errors": (0, "foundation"),
    "version": (0, "foundation"),
    "outputs": (0, "foundation"),
    "checkpoints": (1, "checkpoints"),
    "specs": (2, "specs"),
    "weights": (3, "weights"),
    "vision": (4, "vision"),
    "datasets": (4, "datasets"),
    "analyses": (5, "analyses"),
    "figures": (6, "figures"),
    "atlas": (7, "atlas"),
    "__init__": (8, "top"),  # qkweights/__init__.py, the Python API
    "workflow": (8, "top"),
    "demo": (8, "top"),
    "cli": (9, "cli"),
    "__main__": (10, "__main__"),
}
MAX_LINES = 600  # issue 16: no module over ~600 lines


def _stage(module: str) -> tuple[int, str] | None:
    """(rank, stage) of a qkweights module, or None where STAGES does not list it."""
    parts = module.split(".")
    return STAGES.get(parts[1] if len(parts) > 1 else "__init__")


def _edges(tree: ast.Module, modules) -> list[tuple[str, int]]:
    """(imported qkweights module, line) for every import in ``tree``: at module level, inside a function (deferred),
    under ``if TYPE_CHECKING:``, and ``importlib.import_module("qkweights.…")`` with a literal name.

    ``from qkweights.figures import compare`` is an edge to ``qkweights.figures.compare`` (a module of ``modules``),
    ``from qkweights.figures import CELL_PX`` one to ``qkweights.figures``.
    """
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module in modules:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            out += [(sub, node.lineno) for sub in subs]
            if len(subs) < len(node.names):  # a name defined in the module itself
                out.append((node.module, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value in modules
        ):
            out.append((node.args[0].value, node.lineno))
    return out


def _imports(path: Path) -> set[str]:
    return {module for module, _ in _edges(_tree(path), MODULES)}


def _stage_violations(edges: dict[str, list[tuple[str, int]]]) -> list[str]:
    """One line per import of a later stage, or of another stage of the same rank, and per module without a stage."""
    found = []
    for module, imported in sorted(edges.items()):
        here = _stage(module)
        if here is None:
            found.append(f"{module} has no stage: add its package to STAGES")
            continue
        for target, line in imported:
            there = _stage(target)
            if there is not None and there[1] != here[1] and there[0] >= here[0]:
                found.append(
                    f"{module} (stage {here[0]} {here[1]}) imports {target} (stage {there[0]} {there[1]}), line {line}"
                )
    return found


def test_every_import_goes_to_the_same_or_an_earlier_stage():
    """The stage order (STAGES), TYPE_CHECKING and deferred imports included: a reader who knows the data flow
    checkpoint → spec → weights → forward → analysis → figures → atlas finds no import going back up it."""
    found = _stage_violations({name: _edges(_tree(path), MODULES) for name, path in MODULES.items()})
    assert not found, "imports against the stage order:\n" + "\n".join(found)


def test_stage_rule_finds_an_import_of_a_later_stage():
    allowed = {
        "qkweights.weights.qk": [("qkweights.specs.spec", 1), ("qkweights.errors", 2), ("qkweights.weights.x", 3)],
        "qkweights.workflow": [("qkweights.demo", 4), ("qkweights", 5)],
        "qkweights.outputs": [("qkweights.errors", 6)],
    }
    assert _stage_violations(allowed) == []
    assert _stage_violations(
        {
            "qkweights.specs.spec": [("qkweights.vision.forward", 7)],
            "qkweights.vision.model": [("qkweights.datasets.o3", 8)],
            "qkweights.cli.x": [("qkweights.__main__", 9)],
            "qkweights.newstage.x": [],
        }
    ) == [
        "qkweights.cli.x (stage 9 cli) imports qkweights.__main__ (stage 10 __main__), line 9",
        "qkweights.newstage.x has no stage: add its package to STAGES",
        "qkweights.specs.spec (stage 2 specs) imports qkweights.vision.forward (stage 4 vision), line 7",
        "qkweights.vision.model (stage 4 vision) imports qkweights.datasets.o3 (stage 4 datasets), line 8",
    ]


def test_edges_count_type_checking_deferred_and_import_module():
    source = """
from typing import TYPE_CHECKING
import numpy
import qkweights.a
from qkweights.pkg import sub, NAME
if TYPE_CHECKING:
    from qkweights.b import Curve
def f():
    from qkweights.c import g
    return importlib.import_module("qkweights.d"), importlib.import_module(name)
"""
    modules = {"qkweights.a", "qkweights.pkg", "qkweights.pkg.sub", "qkweights.b", "qkweights.c", "qkweights.d"}
    assert sorted(_edges(ast.parse(source), modules)) == [
        ("qkweights.a", 4),
        ("qkweights.b", 7),
        ("qkweights.c", 9),
        ("qkweights.d", 10),
        ("qkweights.pkg", 5),
        ("qkweights.pkg.sub", 5),
    ]


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
    """No cycle in the import graph, counting deferred imports and imports under ``if TYPE_CHECKING:`` (a cycle
    that only the type checker walks is still two modules that each need the other to be read)."""
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    assert ("qkweights.checkpoints.folders" in graph["qkweights.checkpoints.hub"]) and (
        "qkweights.checkpoints.source" not in graph["qkweights.checkpoints.hub"]
    )
    new = [c for c in _cycles(graph) if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(module: str, tree: ast.Module, modules) -> list[str]:
    """Private names (``_x``, not ``__x__``) that ``module`` takes from another qkweights module: imported
    (``from qkweights.x import _y``), or read off an imported module (``x._y``). A private module
    (``qkweights.pkg._m``) belongs to its package: only ``qkweights.pkg`` and the modules inside it may import it."""

    def outside(target: str) -> bool:  # a private module imported from outside its package
        parts = target.split(".")
        private = [i for i, part in enumerate(parts) if i and _is_private(part)]
        package = ".".join(parts[: private[0]]) if private else module
        return not (module == package or module.startswith(package + "."))

    found, bound = [], {}  # bound: a name of this module -> the qkweights module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    top = a.name.split(".")[0]  # `import qkweights.x` binds qkweights; `import qkweights.x as y`, y
                    bound[a.asname or top] = a.name if a.asname else top
                    if outside(a.name):
                        found.append((node.lineno, f"import {a.name}"))
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module in modules:
            for a in node.names:
                target = f"{node.module}.{a.name}"
                if target in modules:  # a module: private only to code outside its package
                    bound[a.asname or a.name] = target
                    bad = outside(target)
                else:  # a name defined in node.module
                    bad = _is_private(a.name) and node.module != module
                if bad:
                    found.append((node.lineno, f"from {node.module} import {a.name}"))
    for node in ast.walk(tree):
        base = _dotted(node.value) if isinstance(node, ast.Attribute) and _is_private(node.attr) else None
        if base is None or base.split(".")[0] not in bound:
            continue
        first, _, rest = base.partition(".")
        target = ".".join(filter(None, [bound[first], rest]))
        if target in modules and target != module:
            found.append((node.lineno, f"{base}.{node.attr}"))
    return [f"{module} line {line}: {text}" for line, text in sorted(found)]


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` of a chain of attributes on a name, or None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def test_no_module_uses_a_private_name_of_another():
    found = [use for name, path in MODULES.items() for use in _private_uses(name, _tree(path), MODULES)]
    assert not found, "private names taken from another module (make them public, or move them):\n" + "\n".join(found)


def test_private_use_finder_finds_a_private_import():
    source = """
import qkweights.pkg.other
from qkweights.version import __version__
from qkweights.pkg import other, _private_module
from qkweights.pkg.other import public, _private
other._helper(qkweights.pkg.other._table, self._own, _private)
"""
    modules = {"qkweights.version", "qkweights.pkg", "qkweights.pkg.other", "qkweights.pkg._private_module"}
    inside = _private_uses("qkweights.pkg.mine", ast.parse(source), modules)
    assert inside == [
        "qkweights.pkg.mine line 5: from qkweights.pkg.other import _private",
        "qkweights.pkg.mine line 6: other._helper",
        "qkweights.pkg.mine line 6: qkweights.pkg.other._table",
    ]
    outside = _private_uses("qkweights.elsewhere", ast.parse(source), modules)
    assert outside == ["qkweights.elsewhere line 4: from qkweights.pkg import _private_module"] + [
        f.replace("qkweights.pkg.mine", "qkweights.elsewhere") for f in inside
    ]
    assert _private_uses("qkweights.pkg", ast.parse(source), modules) == [
        f.replace("qkweights.pkg.mine", "qkweights.pkg") for f in inside
    ]


def _long_modules(lengths: dict[str, int]) -> list[str]:
    return [f"{name}: {n} lines" for name, n in sorted(lengths.items(), key=lambda kv: -kv[1]) if n > MAX_LINES]


def test_no_module_is_over_600_lines():
    """A module over MAX_LINES = 600 lines holds several jobs: split it (issue 16)."""
    found = _long_modules(
        {str(p.relative_to(ROOT.parent)): len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES.values()}
    )
    assert not found, f"modules over {MAX_LINES} lines:\n" + "\n".join(found)


def test_long_module_finder_holds_at_the_threshold():
    assert _long_modules({"a.py": MAX_LINES, "b.py": 0}) == []
    assert _long_modules({"a.py": MAX_LINES + 1, "b.py": 2 * MAX_LINES, "c.py": MAX_LINES}) == [
        f"b.py: {2 * MAX_LINES} lines",
        f"a.py: {MAX_LINES + 1} lines",
    ]


DOCS = ROOT.parent / "docs"
_CITATION = re.compile(r"\bmethod(?:\.md)? §(\d+)")


def test_every_method_citation_names_a_section_of_docs_method_md():
    """``method.md §N`` (or ``method §N``) in the package and the tests names a ``## N.`` section of docs/method.md;
    ``checkpoints.md`` cited anywhere exists in docs/."""
    sections = set(re.findall(r"^## (\d+)\.", (DOCS / "method.md").read_text(encoding="utf-8"), re.M))
    cited, checkpoints = {}, False
    for path in sorted(ROOT.rglob("*.py")) + sorted((ROOT.parent / "tests").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        checkpoints |= "checkpoints.md" in text
        for n in _CITATION.findall(text):
            cited.setdefault(n, path.name)
    assert cited and not {n: f for n, f in cited.items() if n not in sections}
    assert not checkpoints or (DOCS / "checkpoints.md").is_file()
