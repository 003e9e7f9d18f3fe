"""The import graph of the ``edge_lora`` package, by layer, and the layer rule.

    python -m tests.support.import_graph     # layer -> layer edges, violations, cycles

Layers (docs/ARCHITECTURE.md), each importing only its own layer and those below:
1 ``edge_lora.core``, 2 ``edge_lora.converters`` (source in ``converters/``), 3
``edge_lora.serving``, ``edge_lora.analysis`` and the other modules directly in ``edge_lora``,
4 ``edge_lora.workflows``, 5 ``edge_lora.cli`` and ``edge_lora.tui`` (source in ``tui/``; the
TUI never imports the CLI). ``tests/test_layers.py`` enforces it.
Every import counts, including those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "edge_lora"
# Import package -> source folder, as pyproject.toml's package-dir maps them
# (tests/test_packaging.py checks the two agree).
SOURCE_DIRS = {"edge_lora": "edge_lora", "edge_lora.tui": "tui", "edge_lora.converters": "converters"}
LAYER_NAMES = {0: "edge_lora (package)", 1: "core", 2: "converters", 3: "runtime+analysis",
               4: "workflows", 5: "cli+tui"}
_SUBPACKAGE_LAYER = {"core": 1, "converters": 2, "workflows": 4, "cli": 5, "tui": 5, "__main__": 5}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        raise ValueError(f"{module} is outside {PACKAGE}")
    if len(parts) == 1:
        return 0
    return _SUBPACKAGE_LAYER.get(parts[1], 3)


def group_of(module: str) -> str:
    """The unit the graph is drawn between: a subpackage, or 'edge_lora.<module>' for a loose module."""
    parts = module.split(".")
    return ".".join(parts[:2])


def find_modules(top: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in SOURCE_DIRS.items():
        root = top / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def import_graph(top: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    modules = find_modules(top)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names] + [base]
            targets |= {t for t in map(resolve, names) if t and t != module}
        graph[module] = targets
    return graph


@dataclass(frozen=True)
class Violation:
    importer: str
    imported: str

    def __str__(self) -> str:
        a, b = layer_of(self.importer), layer_of(self.imported)
        return f"{self.importer} (layer {a}, {LAYER_NAMES[a]}) imports {self.imported} (layer {b}, {LAYER_NAMES[b]})"


def violations(graph: dict[str, set[str]]) -> list[Violation]:
    found = []
    for importer, targets in graph.items():
        for imported in targets:
            upward = layer_of(imported) > layer_of(importer)
            tui_to_cli = importer.startswith(f"{PACKAGE}.tui") and imported.startswith(f"{PACKAGE}.cli")
            package_init = importer == PACKAGE
            if upward or tui_to_cli or package_init:
                found.append(Violation(importer, imported))
    return sorted(found, key=str)


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for t in graph[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen

    closure = {m: reach(m) for m in graph}
    return sorted({tuple(sorted({m} | {t for t in closure[m] if m in closure[t]}))
                   for m in graph if m in closure[m]})


def main(argv: list[str]) -> int:
    top = Path(argv[0]) if argv else Path.cwd()
    graph = import_graph(top)
    edges: Counter[tuple[int, int]] = Counter()
    for importer, targets in graph.items():
        for imported in targets:
            edges[(layer_of(importer), layer_of(imported))] += 1
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports between them")
    print("layer -> layer (module imports):")
    for (a, b), n in sorted(edges.items()):
        print(f"  {a} {LAYER_NAMES[a]:18s} -> {b} {LAYER_NAMES[b]:18s} {n:4d}{'   UPWARD' if b > a else ''}")
    bad = violations(graph)
    print(f"layer violations: {len(bad)}")
    for v in bad:
        print(f"  {v}")
    found = cycles(graph)
    print(f"module-level import cycles: {len(found)}")
    for c in found:
        print("  " + " <-> ".join(c))
    return 1 if bad or found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
