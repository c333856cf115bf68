"""The package's structure, checked from the source: imports run one way through the layers of
docs/ARCHITECTURE.md, there are no import cycles, and no module reaches into another module's
private (underscore) names."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1] / "hyclora"

# lower layers never import higher ones (docs/ARCHITECTURE.md); the longest matching prefix counts
LAYERS = {
    "hyclora.kernels.common": 0,
    "hyclora.config": 0,
    "hyclora.compat": 0,
    "hyclora.quant": 1,
    "hyclora.kernels": 2,
    "hyclora.ops": 3,
    "hyclora.models": 4,
    "hyclora.memory": 5,
    "hyclora.cuda_graphs": 5,
    "hyclora.integrations": 5,
    "hyclora.data": 5,
    "hyclora.eval": 6,
    "hyclora.training": 7,
    "hyclora.eval.cli": 8,  # entry points: a command line over training's model set-up
    "hyclora.eval.__main__": 8,
    "hyclora.demo": 8,
    "hyclora": 7,  # the package's __init__: the public API (models, memory, graphs, integrations)
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _layer(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


class _Imports(ast.NodeVisitor):
    """Every hyclora import of one module (at any depth: a lazy import is a dependency too), the
    names imported, and the attributes read off imported hyclora modules."""

    def __init__(self, module: str, is_package: bool, modules: Dict[str, Path]):
        self.module, self.modules = module, modules
        self.package = module if is_package else module.rpartition(".")[0]
        self.edges: Set[str] = set()
        self.private: List[Tuple[int, str]] = []
        self.aliases: Dict[str, str] = {}

    def _resolve(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.package.split(".")
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            if alias.name.startswith("hyclora"):
                self.edges.add(alias.name)
                if alias.asname:
                    self.aliases[alias.asname] = alias.name

    def visit_ImportFrom(self, node: ast.ImportFrom):
        source = self._resolve(node)
        if not source.startswith("hyclora"):
            return
        for alias in node.names:
            full = f"{source}.{alias.name}"
            if full in self.modules:  # a submodule
                self.edges.add(full)
                self.aliases[alias.asname or alias.name] = full
            else:
                self.edges.add(source)
                if alias.name.startswith("_") and source != self.module:
                    self.private.append((node.lineno, f"from {source} import {alias.name}"))

    def visit_Attribute(self, node: ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                self.private.append((node.lineno, f"{self.aliases[node.value.id]}.{node.attr}"))
        self.generic_visit(node)


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    edges, private = {}, {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges[name] = {e for e in visitor.edges if e in modules and e != name}
        private[name] = visitor.private
    return modules, edges, private


def test_every_module_has_a_layer(graph):
    modules, _, _ = graph
    assert all(m == "hyclora" or m.startswith("hyclora.") for m in modules)
    assert "hyclora.kernels.common" in modules and "hyclora.quant.core" in modules


def test_imports_run_one_way(graph):
    _, edges, _ = graph
    upward = sorted(f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
                    for a, targets in edges.items() for b in targets
                    # a package's __init__ re-exports its own submodules
                    if _layer(b) > _layer(a) and not b.startswith(a + "."))
    assert not upward, "\n".join(upward)


def test_leaves_import_nothing_from_the_package(graph):
    _, edges, _ = graph
    for leaf in ("hyclora.kernels.common", "hyclora.config", "hyclora.compat"):
        assert not edges[leaf], (leaf, edges[leaf])


def test_no_import_cycles(graph):
    _, edges, _ = graph
    # a package importing its own submodules is how re-exports work, not a cycle
    deps = {a: {b for b in targets if not b.startswith(a + ".")} for a, targets in edges.items()}
    state: Dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(deps[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(deps):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_no_module_uses_another_modules_private_names(graph):
    _, _, private = graph
    found = [f"{m}:{line}: {what}" for m, uses in sorted(private.items()) for line, what in uses]
    assert not found, "\n".join(found)


def test_the_checks_can_fail(tmp_path):
    """The visitor sees a private import, a private attribute and an upward import."""
    fake = {"hyclora.quant.core": Path("x"), "hyclora.ops.blocks": Path("y")}
    visitor = _Imports("hyclora.quant.core", False, fake)
    visitor.visit(ast.parse("from hyclora.ops import blocks\nfrom hyclora.ops.blocks import _keep\nblocks._plan\n"))
    assert visitor.edges == {"hyclora.ops.blocks"}
    assert [what for _, what in visitor.private] == ["from hyclora.ops.blocks import _keep", "hyclora.ops.blocks._plan"]
    assert _layer("hyclora.ops.blocks") > _layer("hyclora.quant.core")
