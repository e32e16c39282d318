"""The core library (``codebook`` minus ``codebook.ray_glue``) needs neither Ray nor MLflow to
import, and no library code imports the entry points in ``pipelines/``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Every module under codebook/ but the Ray layer, imported with `import ray` / `import mlflow`
# (and their submodules) failing as if neither were installed.
IMPORT_ALL = """
import importlib, pkgutil, sys
sys.modules["ray"] = None
sys.modules["mlflow"] = None
import codebook

def walk(package):
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name == "codebook.ray_glue":
            continue
        module = importlib.import_module(info.name)
        print(info.name)
        if info.ispkg:
            walk(module)

walk(codebook)
loaded = sorted(m for m, v in sys.modules.items()
                if v is not None and m.split(".")[0] in ("ray", "mlflow"))
assert not loaded, loaded
"""


def test_core_imports_without_ray_and_mlflow():
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    imported = set(done.stdout.split())
    expected = {p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
                .removesuffix(".__init__")
                for p in (REPO / "codebook").rglob("*.py") if "ray_glue" not in p.parts}
    assert imported == expected - {"codebook"}  # all of them, Ray layer left out
    assert {"codebook.training.loop", "codebook.extraction", "codebook.data.hf"} <= imported


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names (at any depth)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_library_code_never_imports_the_entry_points():
    """``pipelines/`` holds entry points only: codebook, tuning, benchmarks and the entry
    points themselves use the library (only tests call an entry point's main/parse_args)."""
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imported_modules(p)
                                                  if m.split(".")[0] == "pipelines")
                 for folder in ("codebook", "tuning", "benchmarks", "pipelines")
                 for p in (REPO / folder).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert not (REPO / "pipelines" / "launch.py").exists()
