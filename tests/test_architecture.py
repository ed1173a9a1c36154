"""The package's layers, read from the source: dependencies run one way.

Every import is read, those inside functions included (a lazy import is still a
dependency). The layers, each using only those before it::

    _errors, _hashing, _native  ->  io, models, labels, synthetic  ->  engine  ->  workflows
        ->  cli, testing  ->  _napari (the only one that imports napari or Qt)

(``synthetic``, the sample data, sits beside io.) Imports under ``if TYPE_CHECKING:`` are
annotations, not dependencies, and are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "napari_sam"

# layer of each top-level part; a module may import its own part and lower layers only
LAYERS = {
    "_errors": 0, "_hashing": 0, "_native": 0,
    "io": 1, "models": 1, "labels": 1, "synthetic": 1,
    "engine": 2,
    "workflows": 3,
    "cli": 4, "testing": 4,
    "_napari": 5,
}
GUI = ("napari", "magicgui", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "vispy")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """(imported module, imported names, line) for every import of ``path``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full, [], node.lineno) if full in MODULES else (base, [alias.name], node.lineno)


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            if target in MODULES and target not in (name, "napari_sam"):
                graph[name].add(target)
    return graph


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_of_other_modules():
    bad = []
    for name, path in MODULES.items():
        for target, names, line in _imports(name, path):
            if not target.startswith("napari_sam") or target == name:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{name}:{line} imports {target}.{n}")
            leaf = target.rsplit(".", 1)[-1]
            own_package = target.rsplit(".", 1)[0]
            if leaf.startswith("_") and target in MODULES and own_package != "napari_sam" \
                    and not name.startswith(own_package + ".") and name != own_package:
                bad.append(f"{name}:{line} imports the private module {target}")
    assert not bad, "\n".join(bad)


def test_dependencies_run_one_way():
    bad = []
    for name, path in MODULES.items():
        part = _part(name)
        if part not in LAYERS:
            continue
        for target, _, line in _imports(name, path):
            if target.split(".")[0] in GUI and part != "_napari":
                bad.append(f"{name}:{line} imports {target} (only _napari may import napari / Qt)")
            if not target.startswith("napari_sam.") or target.startswith("napari_sam.__"):
                continue
            other = _part(target)
            if other in LAYERS and other != part and LAYERS[other] >= LAYERS[part]:
                bad.append(f"{name}:{line} imports {target} (layer {LAYERS[other]} from {LAYERS[part]})")
    assert not bad, "\n".join(bad)


def test_every_part_is_a_known_layer():
    parts = {_part(m) for m in MODULES} - {""}
    assert parts <= set(LAYERS), sorted(parts - set(LAYERS))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_readable(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= 450, f"{name} has {lines} lines: split it by concern"
