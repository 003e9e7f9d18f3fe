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
    """The rule is only as good as the checker: an import inside a function counts, an upward
    one is reported, and the modules in the top-level source folders (converters/, tui/) count
    under the import names they are installed as."""
    pkg = tmp_path / "edge_lora"
    for sub in ("core", "serving", "cli"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (tmp_path / "converters").mkdir()
    (tmp_path / "converters" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "serving" / "runtime.py").write_text("")
    (pkg / "core" / "errors.py").write_text("def f():\n    from edge_lora.serving.runtime import x\n")
    (tmp_path / "converters" / "peft.py").write_text("from ..core import errors\nfrom edge_lora.cli import main\n")
    found = {(v.importer, v.imported) for v in violations(import_graph(tmp_path))}
    assert found == {("edge_lora.core.errors", "edge_lora.serving.runtime"), ("edge_lora.converters.peft", "edge_lora.cli")}
    assert layer_of("edge_lora.core.errors") < layer_of("edge_lora.converters.peft") < layer_of("edge_lora.analysis.fit") \
        < layer_of("edge_lora.workflows.demo") < layer_of("edge_lora.cli.run") == layer_of("edge_lora.tui.app")
    assert isinstance(next(iter(violations(import_graph(tmp_path)))), Violation)


def test_the_graph_reads_every_source_folder() -> None:
    modules = import_graph(REPO)
    assert {"edge_lora.tui.app", "edge_lora.converters.peft", "edge_lora.serving.runtime",
            "edge_lora.analysis.fit"} <= set(modules)
    assert not any(m.startswith(("tui", "converters")) for m in modules)
