"""The package's layering: stage modules build on lower layers, never on each other."""

from __future__ import annotations

import ast
from pathlib import Path

import notbugs

PACKAGE = Path(notbugs.__file__).parent

# Lower layers may be imported by anything above them; stage modules by nothing in the package
# but the command line (which dispatches to them).
LAYERS = [
    {"runtime", "config", "references", "stats"},
    {"hdf5", "batches", "sampling", "models"},
    {"attacks"},
    {"data", "train", "construct", "evaluate", "tables", "plots", "studies", "gaussian"},  # stages
    {"bench", "cli"},  # tools
]
STAGES = LAYERS[3]


def _layer(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module in layer)


def _notbugs_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("notbugs"):
            if node.module == "notbugs":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("notbugs.")}
    return found - {"__version__"}


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set().union(*LAYERS)


def test_imports_only_go_down():
    wrong = []
    for path in PACKAGE.glob("*.py"):
        if path.stem == "__init__":
            continue
        for imported in _notbugs_imports(path):
            same_stage = path.stem in STAGES and imported in STAGES
            if _layer(imported) > _layer(path.stem) or (same_stage and imported != path.stem):
                wrong.append(f"{path.stem} imports {imported}")
    assert not wrong, wrong
