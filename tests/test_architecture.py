"""The package's shape, as docs/architecture.md states it: imports point down the layers (function-local ones
included), no module imports itself back through a cycle, and a module over 500 lines says why at its top."""

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dgzoo"
MAX_LINES = 500

# docs/architecture.md's table: each layer and the layers it may import (its own included).
BELOW = {
    "base": {"base"},
    "data": {"base", "data"},
    "models": {"base", "models"},
    "algorithms": {"base", "data", "models", "algorithms"},  # data: the transforms of augmented-view hosts
    "run": {"base", "data", "models", "run"},
    "training": {"base", "data", "models", "algorithms", "run", "training"},
    "experiments": {"base", "data", "models", "algorithms", "run", "training", "experiments"},
    "unlearning": {"base", "data", "models", "algorithms", "run", "training", "unlearning"},
    "cli": set(),  # everything
    "top": set(),  # dgzoo/__init__.py and __main__.py: the public names and the entry point
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "top"
    return parts[1] if parts[1] in BELOW else "base"  # a module directly in dgzoo/ is base


def imported_modules(module: str) -> set[str]:
    """Every dgzoo module ``module`` imports, at its top or inside a function."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # an attribute of a module, or of a package's __init__
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("dgzoo"):
                found.add(name)
    return found


GRAPH = {module: imported_modules(module) for module in MODULES}


def test_imports_point_down_the_layers():
    upward = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if BELOW[layer(module)] and layer(target) not in BELOW[layer(module)]
    ]
    assert upward == []


def test_no_import_cycle():
    # A package's __init__ runs before its submodules; importing a submodule through it is not a cycle of its own.
    graph = {
        module: {t for t in targets if not (MODULES[t].name == "__init__.py" and module.startswith(t + "."))}
        for module, targets in GRAPH.items()
    }
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_a_module_over_500_lines_says_why_at_its_top():
    silent = []
    for module, path in MODULES.items():
        text = path.read_text()
        lines = len(text.splitlines())
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and "Over 500 lines" not in docstring:
            silent.append(f"{module}: {lines} lines")
    assert silent == []


def test_the_checks_see_an_upward_import_and_a_long_module(tmp_path):
    # The rules above must be able to fail: the layer table knows data may not import training, and a module's
    # imports are found inside functions too.
    assert "training" not in BELOW["data"]
    assert "dgzoo.training.engine" in GRAPH["dgzoo.experiments.launchers.base"] | {
        t for m in GRAPH if m.startswith("dgzoo.experiments.launchers") for t in GRAPH[m]
    }
    assert any(len(p.read_text().splitlines()) > MAX_LINES for p in MODULES.values())
