"""The house's floors (docs/architecture.md): every module imports only from its own floor and
the floors below it, and only the Ray layer and the entry points import Ray. Read from the
source with ``ast`` (nothing is imported), every import counted: at module level, inside
functions, under ``if TYPE_CHECKING``. The checker is tested on a planted upward import in a
synthetic tree, then run on the repository. And no import circle: the modules of ``codebook``
import each other one way only, counting imports inside functions (not annotations under
``TYPE_CHECKING``)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ the rule
# Floors, lowest first. A module on a floor may import its own floor and those below.
FLOORS = ("core", "model", "store", "ray_glue", "entry")

# Where each module lives: the first row that matches its path (relative to the repository,
# "/" separators) gives its floor. A row ending in "/" holds everything under that folder; any
# other row is a glob for files in one folder ("*" stays inside it). A module under codebook/
# that no row places fails the test: add it to the table (and to docs/architecture.md).
PLACES: tuple[tuple[str, str], ...] = (
    ("codebook/ray_glue/", "ray_glue"),  # the Ray layer
    ("codebook/store/", "store"),  # the code store and everything that reads it
    ("codebook/browser/", "store"),  # the code browser, over a store
    ("codebook/training/", "model"),  # the one training loop
    ("codebook/analysis/", "model"),  # what is measured on a model
    ("codebook/compare/", "model"),  # codebooks against SAEs and neurons
    ("codebook/lm_table/", "model"),  # the LM table (issue 26), as a package ...
    ("codebook/lm_table*.py", "model"),  # ... or as modules
    ("codebook/steering.py", "model"),  # topic codes, steered generation
    ("codebook/kernels/", "core"),  # fused kernels (issue 27), as a package ...
    ("codebook/kernels*.py", "core"),  # ... or as modules
    ("codebook/data/", "core"),  # datasets
    ("codebook/*.py", "core"),  # layer, config, sites, model, checkpoint, hub, ...
    ("pipelines/", "entry"),
    ("tuning/", "entry"),
    ("benchmarks/", "entry"),
    ("scripts/", "entry"),
)

# What each floor may import (its own floor and those below), written out.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "core": frozenset({"core"}),
    "model": frozenset({"core", "model"}),
    "store": frozenset({"core", "model", "store"}),
    "ray_glue": frozenset({"core", "model", "store", "ray_glue"}),
    "entry": frozenset({"core", "model", "store", "ray_glue", "entry"}),
}
# Floors whose modules may import Ray (``ray`` and ``ray.*``).
MAY_IMPORT_RAY = frozenset({"ray_glue", "entry"})
# The entry points' folders: one never imports another's (``pipelines`` is imported by nobody).
ENTRY_FOLDERS = ("pipelines", "tuning", "benchmarks", "scripts")
# The library's top-level packages whose modules the checker places on floors.
PROJECT_PACKAGES = ("codebook", *ENTRY_FOLDERS)


# ------------------------------------------------------------------------------ the checker
def floor_of(rel: str) -> str | None:
    """The floor of the module at ``rel`` (a path like ``codebook/store/search.py``), or None
    if no row of ``PLACES`` places it."""
    for pattern, floor in PLACES:
        if pattern.endswith("/"):
            if rel.startswith(pattern):
                return floor
        elif fnmatch(rel, pattern) and rel.count("/") == pattern.count("/"):
            return floor
    return None


def imported_modules(path: Path, package: str) -> list[tuple[int, str, list[str]]]:
    """Every import in ``path``: (line, module, names imported from it), at any depth.
    ``package`` (e.g. ``codebook.store``) resolves relative imports."""
    return imported_modules_of(ast.parse(path.read_text(encoding="utf-8"), str(path)), package)


def imported_modules_of(tree: ast.AST, package: str) -> list[tuple[int, str, list[str]]]:
    """``imported_modules`` of a parsed tree."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            out.append((node.lineno, module, [a.name for a in node.names]))
    return out


def module_file(root: Path, module: str) -> Path | None:
    """The file of a project module (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``)."""
    parts = module.split(".")
    for candidate in (root.joinpath(*parts).with_suffix(".py"),
                      root.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class Violation:
    where: str  # path:line
    floor: str
    imports: str
    why: str

    def __str__(self) -> str:
        return f"{self.where} ({self.floor}) imports {self.imports}: {self.why}"


def check_tree(root: Path) -> tuple[list[Violation], list[str]]:
    """The upward imports (and Ray imports below the Ray layer) of every module under ``root``
    in the project's packages, and the modules under ``codebook/`` that no row places."""
    violations: list[Violation] = []
    unplaced: list[str] = []
    for top in PROJECT_PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            floor = floor_of(rel)
            if floor is None:
                if top == "codebook":
                    unplaced.append(rel)
                continue
            package = ".".join(path.relative_to(root).with_suffix("").parts)
            if path.name != "__init__.py":
                package = package.rsplit(".", 1)[0]
            for line, module, names in imported_modules(path, package):
                where = f"{rel}:{line}"
                head = module.split(".")[0]
                if head == "ray" and floor not in MAY_IMPORT_RAY:
                    violations.append(Violation(where, floor, module, "Ray below the Ray layer"))
                    continue
                if head not in PROJECT_PACKAGES:
                    continue
                if floor == "entry" and head in ENTRY_FOLDERS and head != rel.split("/")[0]:
                    violations.append(Violation(where, floor, module,
                                                "an entry point imports another's folder"))
                    continue
                # submodules imported by name (from a.b import c: a.b.c), else the module
                targets = [f"{module}.{n}" for n in names
                           if module_file(root, f"{module}.{n}") is not None] or [module]
                for target in targets:
                    file = module_file(root, target)
                    if file is None:
                        continue
                    to = floor_of(file.relative_to(root).as_posix())
                    if to is not None and to not in MAY_IMPORT[floor]:
                        violations.append(Violation(where, floor, f"{target} ({to})",
                                                    "a higher floor"))
    return violations, unplaced


def runtime_imports(path: Path, package: str) -> list[str]:
    """The modules ``path`` imports when it runs: at module level and inside functions, not
    the annotations-only imports under ``if TYPE_CHECKING:``."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.extend(m for _, m, _ in _statement_imports(child, package))
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return out


def _statement_imports(node: ast.Import | ast.ImportFrom, package: str
                       ) -> list[tuple[int, str, list[str]]]:
    holder = ast.Module(body=[node], type_ignores=[])
    return imported_modules_of(holder, package)


def import_graph(root: Path, top: str = "codebook") -> dict[str, set[str]]:
    """{module: the project modules it imports at run time} for every module under ``top``
    (``from a.b import c`` counts a.b.c when c is a module, else a.b)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((root / top).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = set()
        for module in runtime_imports(path, package):
            if module_file(root, module) is not None and module.split(".")[0] == top:
                graph[name].add(module)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of more than one
    module (or a module importing itself), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


# ------------------------------------------------------------------------------ the tests
def write(root: Path, rel: str, text: str = "") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def synthetic_tree(root: Path) -> None:
    """A tiny project that keeps the rule: one module per floor, each importing downwards."""
    write(root, "codebook/__init__.py")
    write(root, "codebook/layer.py", "import torch\n")
    write(root, "codebook/analysis/__init__.py")
    write(root, "codebook/analysis/metrics.py", "from codebook.layer import X\n")
    write(root, "codebook/store/__init__.py", "from codebook.store.format import CodeStore\n")
    write(root, "codebook/store/format.py", "from codebook import layer\n")
    write(root, "codebook/store/search.py",
          "from codebook.analysis import metrics\nfrom . import format\n")
    write(root, "codebook/ray_glue/__init__.py")
    write(root, "codebook/ray_glue/evaluate.py",
          "import ray\nfrom codebook.store import search\n")
    write(root, "pipelines/__init__.py")
    write(root, "pipelines/evaluate.py",
          "import ray.data\nfrom codebook.ray_glue.evaluate import x\nfrom pipelines import y\n")
    write(root, "tuning/__init__.py")
    write(root, "tuning/sweep.py", "from tuning.spec import z\nfrom codebook.layer import X\n")


def test_the_checker_passes_a_tree_that_keeps_the_rule(tmp_path):
    synthetic_tree(tmp_path)
    assert check_tree(tmp_path) == ([], [])


@pytest.mark.parametrize(("rel", "text", "expected"), [
    # the core reaching up into the store, at module level and inside a function
    ("codebook/resolve.py", "from codebook.store import SiteInfo\n",
     "codebook/resolve.py:1 (core) imports codebook.store (store): a higher floor"),
    ("codebook/extraction.py", "def f():\n    from codebook.store.search import S\n",
     "codebook/extraction.py:2 (core) imports codebook.store.search (store): a higher floor"),
    # a submodule imported by name from its package
    ("codebook/analysis/neurons.py", "from codebook.store import search\n",
     "codebook/analysis/neurons.py:1 (model) imports codebook.store.search (store): a higher "
     "floor"),
    # relative imports resolve to their package
    ("codebook/analysis/labels.py", "from ..store import format\n",
     "codebook/analysis/labels.py:1 (model) imports codebook.store.format (store): a higher "
     "floor"),
    # under TYPE_CHECKING too
    ("codebook/store/code_page.py",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import codebook.ray_glue.evaluate\n",
     "codebook/store/code_page.py:3 (store) imports codebook.ray_glue.evaluate (ray_glue): a "
     "higher floor"),
    # the library never imports the entry points
    ("codebook/ray_glue/train.py", "from pipelines import evaluate\n",
     "codebook/ray_glue/train.py:1 (ray_glue) imports pipelines.evaluate (entry): a higher "
     "floor"),
    # Ray below the Ray layer, even lazily
    ("codebook/store/evaluate.py", "def f():\n    import ray.data\n",
     "codebook/store/evaluate.py:2 (store) imports ray.data: Ray below the Ray layer"),
    # one entry point's folder importing another's
    ("tuning/report.py", "from pipelines.evaluate import main\n",
     "tuning/report.py:1 (entry) imports pipelines.evaluate: an entry point imports another's "
     "folder"),
])
def test_the_checker_fails_on_a_planted_upward_import(tmp_path, rel, text, expected):
    synthetic_tree(tmp_path)
    write(tmp_path, rel, text)
    violations, unplaced = check_tree(tmp_path)
    assert [str(v) for v in violations] == [expected] and unplaced == []


def test_the_checker_names_a_module_no_row_places(tmp_path):
    synthetic_tree(tmp_path)
    write(tmp_path, "codebook/newfloor/thing.py")
    assert check_tree(tmp_path) == ([], ["codebook/newfloor/thing.py"])


def test_the_repository_keeps_its_floors():
    violations, unplaced = check_tree(REPO)
    assert unplaced == [], "place these modules in PLACES (and docs/architecture.md)"
    assert [str(v) for v in violations] == []


def test_the_circle_finder_finds_a_planted_circle_and_ignores_annotations(tmp_path):
    write(tmp_path, "codebook/__init__.py")
    write(tmp_path, "codebook/model.py", "from codebook.checkpoint import NAMES\n"
          "def push():\n    from codebook import hub\n")
    write(tmp_path, "codebook/checkpoint.py", "NAMES = 1\n")
    write(tmp_path, "codebook/hub.py", "from typing import TYPE_CHECKING\n"
          "from codebook.checkpoint import NAMES\nif TYPE_CHECKING:\n"
          "    from codebook.model import Model\n")
    assert circles(import_graph(tmp_path)) == []  # model -> hub one way, annotations aside
    write(tmp_path, "codebook/checkpoint.py", "def f():\n    from codebook.model import X\n")
    assert circles(import_graph(tmp_path)) == [["codebook.checkpoint", "codebook.model"]]


def test_no_import_circle_in_the_library():
    """Not even through imports inside functions: model -> checkpoint (the file names), model
    -> hub (inside the methods that use it), never back."""
    graph = import_graph(REPO)
    assert circles(graph) == []
    assert "codebook.checkpoint" in graph["codebook.model"]
    assert "codebook.checkpoint" in graph["codebook.hub"]
    assert "codebook.model" not in graph["codebook.hub"] | graph["codebook.checkpoint"]


def test_docs_architecture_names_every_floor():
    text = (REPO / "docs" / "architecture.md").read_text()
    for name in ("core", "training", "analysis", "compare", "store", "ray_glue", "pipelines/",
                 "tuning/", "benchmarks/", "tests/test_architecture.py"):
        assert name in text, name
