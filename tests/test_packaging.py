"""The repository's top level is the design card's (edge_lora/, tui/, converters/) while the
installed distribution holds one import package, edge_lora: the wheel maps tui/ and converters/
to edge_lora.tui and edge_lora.converters (pyproject.toml's package-dir)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

import edge_lora.converters
import edge_lora.tui
from tests.support.import_graph import SOURCE_DIRS

REPO = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_source_folder_is_a_listed_package() -> None:
    """A new subfolder with an __init__.py that pyproject.toml does not list would be missing
    from the wheel (and only from the wheel: the editable install would still find it)."""
    setuptools = pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == SOURCE_DIRS
    on_disk = set()
    for package, folder in SOURCE_DIRS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            on_disk.add(".".join((package, *init.parent.relative_to(REPO / folder).parts)))
    assert on_disk == set(setuptools["packages"])


def test_the_editable_install_imports_from_the_top_level_folders(tmp_path: Path) -> None:
    assert Path(edge_lora.tui.__file__).resolve() == REPO / "tui" / "__init__.py"
    assert Path(edge_lora.converters.__file__).resolve() == REPO / "converters" / "__init__.py"
    # From a foreign working directory (no repo on sys.path), through the installed finder:
    code = ("import json, edge_lora.tui.app, edge_lora.converters.peft, edge_lora.serving.runtime; "
            "print(json.dumps([edge_lora.tui.app.__file__, edge_lora.converters.peft.__file__]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    tui_app, peft = map(Path, json.loads(out))
    assert tui_app.resolve() == REPO / "tui" / "app.py"
    assert peft.resolve() == REPO / "converters" / "peft.py"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: the test environment's setuptools, no index needed.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out), str(REPO)],
                   check=True, timeout=600, capture_output=True, cwd=out)
    (built,) = out.glob("edge_lora-*.whl")
    return built


def test_the_wheel_holds_one_import_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"edge_lora"}
    for module in ("edge_lora/tui/app.py", "edge_lora/tui/screens/main_screen.py",
                   "edge_lora/converters/peft.py", "edge_lora/converters/load_check.py",
                   "edge_lora/serving/runtime.py", "edge_lora/analysis/fit.py",
                   "edge_lora/data/legal-adapter/adapter_model.safetensors"):
        assert module in names
    tcss = {n for n in names if n.endswith(".tcss")}
    assert tcss == {f"edge_lora/tui/{p.relative_to(REPO / 'tui').as_posix()}" for p in (REPO / "tui").rglob("*.tcss")}
    assert len(tcss) >= 8


_PILOT = """
import asyncio, json, sys
import edge_lora, edge_lora.tui, edge_lora.converters.peft
from edge_lora.tui.app import make_app
from tests.support.tui_fakes import fake_services, write_fixture_dir
from pathlib import Path

async def main():
    app = make_app(write_fixture_dir(Path(sys.argv[1])), **fake_services())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        screen = type(pilot.app.screen).__name__
    print(json.dumps({"files": [edge_lora.__file__, edge_lora.tui.__file__, edge_lora.converters.peft.__file__],
                      "screen": screen}))

asyncio.run(main())
"""


@pytest.mark.slow
def test_a_venv_installs_the_wheel_and_opens_the_app(wheel: Path, tmp_path: Path) -> None:
    """A fresh venv that sees the test environment's packages (textual, llama_cpp, ...) installs
    the wheel with --no-deps; edge_lora, its TUI and its converters then come from the wheel."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The test environment is itself a venv: --system-site-packages would show only the base
    # interpreter's packages, so its site-packages is added by a path file (plain path lines:
    # its own .pth files, the editable install's finder among them, are not run).
    import sysconfig
    (site / "test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, timeout=300, capture_output=True)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(tmp_path / "support")}
    # tests.support.tui_fakes (fake services, a fixture dir) without the repo on the path:
    support = tmp_path / "support" / "tests" / "support"
    support.mkdir(parents=True)
    (support.parent / "__init__.py").write_text("")
    (support / "__init__.py").write_text("")
    (support / "tui_fakes.py").write_text((REPO / "tests" / "support" / "tui_fakes.py").read_text())
    (tmp_path / "models").mkdir()
    result = subprocess.run([str(python), "-c", _PILOT, str(tmp_path / "models")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    for file in shown["files"]:
        assert Path(file).resolve().is_relative_to(site.resolve()), file
    assert shown["screen"] == "MainScreen"
