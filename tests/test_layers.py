"""The package's layers run one way (docs/ARCHITECTURE.md): each layer imports only its own and
those below, the TUI never imports the CLI, and no module imports itself back through others.
``python -m tests.support.import_graph`` prints the same graph for people."""

from __future__ import annotations

from pathlib import Path

from tests.support.import_graph import Violation, cycles, import_graph, layer_of, violations

REPO = Path(__file__).resolve().parent.parent


def test_no_module_imports_a_layer_above_its_own() -> None:
    found = violations(import_graph(REPO))
    assert not found, "layer violations:\n" + "\n".join(map(str, found))


def test_no_import_cycles() -> None:
    found = cycles(import_graph(REPO))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_lazy_upward_imports(tmp_path: Path) -> None:
    """The rule is only as good as the checker: an import inside a function counts, and an
    upward one is reported."""
    pkg = tmp_path / "edge_lora"
    for sub in ("core", "converters", "cli"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime.py").write_text("")
    (pkg / "core" / "errors.py").write_text("def f():\n    from edge_lora.runtime import x\n")
    (pkg / "converters" / "peft.py").write_text("from ..core import errors\nfrom edge_lora.cli import main\n")
    found = {(v.importer, v.imported) for v in violations(import_graph(tmp_path))}
    assert found == {("edge_lora.core.errors", "edge_lora.runtime"), ("edge_lora.converters.peft", "edge_lora.cli")}
    assert layer_of("edge_lora.core.errors") < layer_of("edge_lora.converters.peft") < layer_of("edge_lora.fit") \
        < layer_of("edge_lora.workflows.demo") < layer_of("edge_lora.cli.run") == layer_of("edge_lora.tui.app")
    assert isinstance(next(iter(violations(import_graph(tmp_path)))), Violation)
