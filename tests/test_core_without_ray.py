"""The core library (``codebook`` minus ``codebook.ray_glue``) needs neither Ray nor MLflow to
import: every module imported with both made unimportable. (Which module may import what,
the entry points included, is tests/test_architecture.py's.)"""

from __future__ import annotations

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
