"""A strict parser of Ollama's Modelfile grammar, written from ollama/ollama docs/modelfile.md
(independently of edge_lora.analysis.modelfile, so tests check the generator against the documented
format rather than against itself).

Documented rules enforced here:
* ``# comment`` lines and blank lines are ignored; ``INSTRUCTION arguments`` otherwise.
* Instructions are case-insensitive: FROM (required), PARAMETER, TEMPLATE, SYSTEM, ADAPTER,
  LICENSE, MESSAGE, REQUIRES.
* An argument is a bare value (rest of the line), a ``"quoted"`` value, or a ``\"\"\"``
  multi-line value that may span lines.
* ``PARAMETER <name> <value>`` with a name from the "Valid Parameters and Values" table and a
  value of that parameter's type; ``stop`` may repeat.
* ``MESSAGE <role> <message>`` with role system, user or assistant.
* At most one ADAPTER ("only one adapter is supported"), one TEMPLATE, one SYSTEM.
* Paths in FROM / ADAPTER are absolute or relative to the Modelfile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES")
PARAMETERS: dict[str, str] = {
    "num_ctx": "int", "repeat_last_n": "int", "repeat_penalty": "float", "temperature": "float",
    "seed": "int", "stop": "string", "num_predict": "int", "top_k": "int", "top_p": "float",
    "min_p": "float", "num_keep": "int", "typical_p": "float", "presence_penalty": "float",
    "frequency_penalty": "float", "num_batch": "int", "num_gpu": "int", "main_gpu": "int",
    "use_mmap": "bool", "num_thread": "int",
}
MESSAGE_ROLES = ("system", "user", "assistant")
SINGLE = ("FROM", "ADAPTER", "TEMPLATE", "SYSTEM")


class ModelfileSyntaxError(ValueError):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass
class ParsedModelfile:
    from_: str = ""
    adapter: str | None = None
    template: str | None = None
    system: str | None = None
    licenses: list[str] = field(default_factory=list)
    parameters: list[tuple[str, object]] = field(default_factory=list)
    messages: list[tuple[str, str]] = field(default_factory=list)
    requires: str | None = None

    def parameter(self, name: str) -> list[object]:
        return [v for n, v in self.parameters if n == name]


def _read_argument(text: str, pos: int, line_no: int) -> tuple[str, int, int]:
    """(value, new position, lines consumed) for the argument starting at ``pos``."""
    rest = text[pos:]
    if rest.startswith('"""'):
        end = text.find('"""', pos + 3)
        if end < 0:
            raise ModelfileSyntaxError(line_no, 'unterminated """ multi-line value')
        value = text[pos + 3:end]
        after = text.find("\n", end + 3)
        after = len(text) if after < 0 else after
        if text[end + 3:after].strip():
            raise ModelfileSyntaxError(line_no, 'text after the closing """')
        return value, after, value.count("\n")
    eol = text.find("\n", pos)
    eol = len(text) if eol < 0 else eol
    line = text[pos:eol].strip()
    if line.startswith('"'):
        if len(line) < 2 or not line.endswith('"'):
            raise ModelfileSyntaxError(line_no, "unterminated quoted value")
        inner = line[1:-1]
        if '"' in inner.replace('\\"', ""):
            raise ModelfileSyntaxError(line_no, "stray quote inside a quoted value")
        return inner.replace('\\"', '"'), eol, 0
    return line, eol, 0


def _typed(name: str, raw: str, line_no: int) -> object:
    kind = PARAMETERS[name]
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ModelfileSyntaxError(line_no, f"PARAMETER {name} needs a {kind}, got {raw!r}") from None
    if kind == "bool":
        if raw.lower() not in ("true", "false"):
            raise ModelfileSyntaxError(line_no, f"PARAMETER {name} needs true or false, got {raw!r}")
        return raw.lower() == "true"
    return raw


def parse_modelfile(text: str) -> ParsedModelfile:
    parsed = ParsedModelfile()
    seen: set[str] = set()
    pos, line_no = 0, 1
    while pos < len(text):
        eol = text.find("\n", pos)
        eol = len(text) if eol < 0 else eol
        line = text[pos:eol]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            pos, line_no = eol + 1, line_no + 1
            continue
        indent = len(line) - len(line.lstrip())
        word = stripped.split(None, 1)[0]
        instruction = word.upper()
        if instruction not in INSTRUCTIONS:
            raise ModelfileSyntaxError(line_no, f"unknown instruction {word!r}")
        if instruction in SINGLE and instruction in seen:
            raise ModelfileSyntaxError(line_no, f"{instruction} may appear only once")
        seen.add(instruction)
        arg_pos = pos + indent + len(word)
        while arg_pos < eol and text[arg_pos] in " \t":
            arg_pos += 1
        if instruction in ("PARAMETER", "MESSAGE"):
            head = text[arg_pos:eol].split(None, 1)
            if len(head) < 2:
                raise ModelfileSyntaxError(line_no, f"{instruction} needs a name and a value")
            key = head[0]
            arg_pos = text.index(head[1], arg_pos + len(key))
        value, end, extra_lines = _read_argument(text, arg_pos, line_no)
        if value == "" and instruction not in ("SYSTEM", "TEMPLATE"):
            raise ModelfileSyntaxError(line_no, f"{instruction} needs an argument")
        if instruction == "FROM":
            parsed.from_ = value
        elif instruction == "ADAPTER":
            parsed.adapter = value
        elif instruction == "TEMPLATE":
            parsed.template = value
        elif instruction == "SYSTEM":
            parsed.system = value
        elif instruction == "LICENSE":
            parsed.licenses.append(value)
        elif instruction == "REQUIRES":
            parsed.requires = value
        elif instruction == "PARAMETER":
            name = key.lower()
            if name not in PARAMETERS:
                raise ModelfileSyntaxError(line_no, f"unknown parameter {key!r}")
            parsed.parameters.append((name, _typed(name, value, line_no)))
        elif instruction == "MESSAGE":
            if key.lower() not in MESSAGE_ROLES:
                raise ModelfileSyntaxError(line_no, f"MESSAGE role must be one of {MESSAGE_ROLES}, got {key!r}")
            parsed.messages.append((key.lower(), value))
        pos, line_no = end + 1, line_no + 1 + extra_lines
    if "FROM" not in seen:
        raise ModelfileSyntaxError(line_no, "FROM is required")
    return parsed


def resolve_modelfile_path(modelfile: Path, value: str) -> Path:
    """Where Ollama looks for a FROM/ADAPTER file: absolute, ~-expanded, or relative to the
    Modelfile's directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (modelfile.parent / path)
