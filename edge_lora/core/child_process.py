"""Command lines for Python child processes that cannot import code from the user's working
directory.

``python -m pkg`` and ``python -c`` put the working directory first on ``sys.path``: run from a
cloned model repository holding an ``edge_lora`` or ``llama_cpp`` package, a child would run that
repository's code. Children therefore start isolated (``-I``: no working directory, no PYTHON*
variables, no user site) and set their import path to the parent's, made absolute, without the
working directory, led by the directory this edge_lora package was imported from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Prepended to the child's code: argv[1] is the import path; the code then sees its own
# arguments from sys.argv[1] on, as with a plain `python -c CODE ARGS`.
_BOOTSTRAP = "import json, sys; sys.path[:] = json.loads(sys.argv.pop(1))\n"


def child_import_path() -> list[str]:
    """The parent's import path for a child (see the module docstring)."""
    import edge_lora

    cwd = os.path.realpath(os.getcwd())
    package_root = str(Path(edge_lora.__file__).resolve().parent.parent)
    entries = [package_root]
    for entry in sys.path:
        if not entry or (os.path.realpath(entry) == cwd and entry != package_root):
            continue  # '' and '.' (python -m/-c, PYTHONPATH=.) are the working directory
        absolute = os.path.abspath(entry)
        if absolute not in entries:
            entries.append(absolute)
    return entries


def isolated_python(code: str, *args: str) -> list[str]:
    """``[python, -I, -c, code, args...]`` run with ``child_import_path()``."""
    return [sys.executable, "-I", "-c", _BOOTSTRAP + code, json.dumps(child_import_path()), *args]
