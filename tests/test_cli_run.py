"""`edge-lora run`, `serve` and `adapters` end to end: stdout carries only generated text, model
directories resolve, interactive adapter switching, and bad files exit 2 with one stderr line
(checked in subprocesses, so a crash inside llama.cpp could not hide)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from edge_lora import state
from edge_lora.cli import main
from edge_lora.core.context_size import MAX_CTX, MIN_CTX
from edge_lora.core.errors import InputError, InputNotFoundError
from edge_lora.serving.model_choice import AdapterChoice, parse_adapter_arg, resolve_model_path
from edge_lora.serving.runtime import Runtime

PROMPT = "The Apache License, Version 2.0, grants"


@pytest.fixture(scope="module")
def expected(gemma_q4_gguf: Path, random_gemma_loras: tuple[Path, Path]) -> dict[str, str]:
    """Greedy texts made through the library, to compare the CLI's stdout with (exact mode: each
    `run` starts with an empty cache, and here a chat's first turn is requested twice)."""
    with Runtime(gemma_q4_gguf, n_ctx=512, prompt_cache=False) as rt:
        rt.load_adapter("a", random_gemma_loras[0])
        return {"base": rt.generate(PROMPT, max_tokens=10).text(),
                "a": rt.generate(PROMPT, adapters={"a": 1.0}, max_tokens=10).text(),
                "a_half": rt.generate(PROMPT, adapters={"a": 0.5}, max_tokens=10).text(),
                "chat_a": rt.chat([{"role": "user", "content": "Hello"}], adapters={"a": 1.0},
                                  max_tokens=6).text(),
                "chat_base_2": rt.chat([{"role": "user", "content": "Hello"}, {"role": "assistant", "content":
                                        rt.chat([{"role": "user", "content": "Hello"}], adapters={"a": 1.0},
                                                max_tokens=6).text()},
                                        {"role": "user", "content": "More"}], max_tokens=6).text()}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_prompt_prints_only_generated_text(capsys, gemma_q4_gguf: Path, expected: dict) -> None:
    code, out, err = run_cli(capsys, "run", "--model", str(gemma_q4_gguf), "--prompt", PROMPT,
                             "--max-tokens", "10", "--temperature", "0", "--ctx", "512")
    assert code == 0 and err == ""
    assert out == expected["base"] + "\n"


def test_run_with_registered_adapter_and_scale(capsys, gemma_q4_gguf: Path, random_gemma_loras, expected) -> None:
    assert run_cli(capsys, "adapters", "add", "a", str(random_gemma_loras[0]))[0] == 0
    common = ("run", "--model", str(gemma_q4_gguf), "--prompt", PROMPT, "--max-tokens", "10",
              "--temperature", "0", "--ctx", "512")
    code, out, _ = run_cli(capsys, *common, "--adapter", "a")
    assert code == 0 and out == expected["a"] + "\n" and expected["a"] != expected["base"]
    code, out, _ = run_cli(capsys, *common, "--adapter", "a:0.5")
    assert code == 0 and out == expected["a_half"] + "\n"
    code, out, _ = run_cli(capsys, *common, "--adapter", f"{random_gemma_loras[0]}:1")  # a path works too
    assert code == 0 and out == expected["a"] + "\n"


def test_interactive_chat_switches_adapters(capsys, monkeypatch, gemma_q4_gguf: Path, random_gemma_loras,
                                            expected) -> None:
    run_cli(capsys, "adapters", "add", "a", str(random_gemma_loras[0]))
    monkeypatch.setattr(sys, "stdin", io.StringIO("/adapter a\nHello\n/adapter none\nMore\n/bogus\n/quit\nignored\n"))
    code, out, err = run_cli(capsys, "run", "--model", str(gemma_q4_gguf), "--max-tokens", "6",
                             "--temperature", "0", "--ctx", "512")
    assert code == 0
    # Each answer is printed followed by a newline (an answer may itself hold newlines).
    assert out == expected["chat_a"] + "\n" + expected["chat_base_2"] + "\n"
    assert "adapters: a:1" in err and "adapters: none" in err and "commands:" in err


def test_interactive_chat_forgets_oldest_turns_to_fit(capsys, monkeypatch, gemma_q4_gguf: Path) -> None:
    turns = "".join(f"Tell me about licence number {i} and its many clauses please\n" for i in range(12))
    monkeypatch.setattr(sys, "stdin", io.StringIO(turns))
    code, out, err = run_cli(capsys, "run", "--model", str(gemma_q4_gguf), "--max-tokens", "16",
                             "--temperature", "0", "--ctx", "128")
    assert code == 0 and len(out.splitlines()) >= 12
    assert "oldest messages are left out of the prompt to fit the context" in err and "error" not in err


CLAUSES_SCHEMA = {"type": "object", "properties": {
    "license": {"enum": ["MIT", "Apache-2.0", "other"]},
    "clauses": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 16}}},
    "required": ["license", "clauses"]}


@pytest.mark.slow
def test_run_json_schema_answers_with_valid_json(capsys, monkeypatch, tmp_path: Path, gemma_q4_gguf: Path) -> None:
    import jsonschema

    schema = tmp_path / "clauses.json"
    schema.write_text(json.dumps(CLAUSES_SCHEMA))
    common = ("run", "--model", str(gemma_q4_gguf), "--json-schema", str(schema), "--max-tokens", "120",
              "--ctx", "512")
    code, out, err = run_cli(capsys, *common, "--prompt", "Describe the MIT license.", "--seed", "3")
    assert code == 0 and err == ""
    jsonschema.validate(json.loads(out), CLAUSES_SCHEMA)
    # The interactive chat answers every turn with the schema too, in exact mode here.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe the MIT license.\nAnd Apache?\n"))
    code, out, err = run_cli(capsys, *common, "--no-prompt-cache", "--temperature", "0")
    assert code == 0 and "error" not in err
    answers = out.splitlines()
    assert len(answers) == 2
    for answer in answers:
        jsonschema.validate(json.loads(answer), CLAUSES_SCHEMA)


def test_run_json_schema_errors_are_one_line(capsys, tmp_path: Path, gemma_q4_gguf: Path) -> None:
    unsupported = tmp_path / "minimum.json"
    unsupported.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path, message in ((unsupported, "'minimum'"), (broken, "is not valid JSON"),
                          (tmp_path / "missing.json", "has no missing.json")):
        code, out, err = run_cli(capsys, "run", "--model", str(gemma_q4_gguf), "--prompt", "x",
                                 "--json-schema", str(path))
        lines = err.splitlines()
        assert code == 2 and out == "" and len(lines) == 1 and message in lines[0], (path, err)


def test_model_directory_resolution(tmp_path: Path, gemma_q4_gguf: Path) -> None:
    by_manifest = tmp_path / "m"
    by_manifest.mkdir()
    (by_manifest / "gemma-Q4_K_M.gguf").symlink_to(gemma_q4_gguf)
    (by_manifest / "gemma-Q8_0.gguf").symlink_to(gemma_q4_gguf)
    row = {"bytes": 1, "bpw": 4.0, "sha256": "0" * 64}  # measured figures are not what this test is about
    (by_manifest / "manifest.json").write_text(json.dumps({"name": "gemma", "files": [
        {"path": "gemma-Q4_K_M.gguf", "format": "Q4_K_M", "kind": "merged", **row},
        {"path": "gemma-Q8_0.gguf", "format": "Q8_0", "kind": "merged", **row},
        {"path": "adapter-x.gguf", "format": "F32", "kind": "adapter", **row}]}))
    assert resolve_model_path(by_manifest, "q8_0") == by_manifest / "gemma-Q8_0.gguf"
    from edge_lora.analysis.fit import fit_report

    [recommended] = [row for row in fit_report([by_manifest / "gemma-Q4_K_M.gguf", by_manifest / "gemma-Q8_0.gguf"])
                     .models if row.recommended]
    assert resolve_model_path(by_manifest, None) == Path(recommended.path)  # the fit estimator decides
    with pytest.raises(InputNotFoundError, match="no Q2_K file"):
        resolve_model_path(by_manifest, "Q2_K")
    by_name = tmp_path / "n"
    by_name.mkdir()
    (by_name / "gemma-Q6_K.gguf").symlink_to(gemma_q4_gguf)
    (by_name / "adapter-legal.gguf").symlink_to(gemma_q4_gguf)
    assert resolve_model_path(by_name, None) == by_name / "gemma-Q6_K.gguf"
    with pytest.raises(InputError, match="no --model given"):
        resolve_model_path(None, None)
    state.remember_output_dir(by_name)
    assert resolve_model_path(None, "Q6_K") == by_name.resolve() / "gemma-Q6_K.gguf"


def test_parse_adapter_arg() -> None:
    assert parse_adapter_arg("legal") == AdapterChoice("legal", None)
    assert parse_adapter_arg("legal:0.5").scale == 0.5 and parse_adapter_arg("legal:0.5").name_or_path == "legal"
    assert parse_adapter_arg("/x/a.gguf").scale is None
    assert parse_adapter_arg("/x/a.gguf:-1").scale == -1.0


@pytest.mark.parametrize("command", [["run", "--prompt", "x"], ["serve"], ["fit"], ["tui"],
                                     ["modelfile", "--model", "m.gguf"]])
def test_one_ctx_range_for_every_command(capsys, command: list[str]) -> None:
    for ctx in (MIN_CTX - 1, MAX_CTX + 1):
        code, out, err = run_cli(capsys, *command, "--ctx", str(ctx))
        assert code == 2 and out == ""
        assert err == f"edge-lora: error: --ctx {ctx} is out of range — use a context between {MIN_CTX} and {MAX_CTX}\n"


def test_adapters_cli(capsys, tmp_path: Path, random_gemma_loras) -> None:
    assert run_cli(capsys, "adapters", "list")[1].startswith("no adapters registered")
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(random_gemma_loras[1].read_bytes())
    code, out, _ = run_cli(capsys, "adapters", "add", "b", str(copy), "--scale", "0.5")
    assert code == 0 and "registered b" in out
    copy.unlink()
    code, out, _ = run_cli(capsys, "adapters", "list", "--json")
    [entry] = json.loads(out)["adapters"]
    assert entry["name"] == "b" and entry["scale"] == 0.5 and entry["exists"] is False
    assert "[missing file]" in run_cli(capsys, "adapters", "list")[1]
    assert run_cli(capsys, "adapters", "remove", "b")[0] == 0
    code, out, err = run_cli(capsys, "adapters", "remove", "b")
    assert code == 2 and out == "" and err.startswith("edge-lora: error: no adapter named 'b'")
    code, _, err = run_cli(capsys, "adapters", "add", "../evil", str(random_gemma_loras[0]))
    assert code == 2 and "invalid adapter name" in err


def _cli_subprocess(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_lora", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, gemma_q4_gguf: Path) -> dict[str, Path]:
    import gguf
    import numpy as np

    d = tmp_path_factory.mktemp("bad")
    files = {"junk": d / "junk.gguf", "truncated": d / "truncated.gguf", "zeroed": d / "zeroed.gguf",
             "mismatch": d / "mismatch.gguf"}
    files["junk"].write_bytes(os.urandom(4096))
    with open(gemma_q4_gguf, "rb") as fh:
        head = fh.read(8_000_000)
    files["truncated"].write_bytes(head)
    files["zeroed"].write_bytes(b"\0" * 64 + head[64:100_000])
    w = gguf.GGUFWriter(files["mismatch"], "gemma3")
    w.add_string("general.type", "adapter"); w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((8, 512), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((1024, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return files


@pytest.mark.slow
def test_bad_files_exit_2_with_one_line(bad_files: dict[str, Path], gemma_q4_gguf: Path,
                                        random_gemma_loras, tmp_path: Path) -> None:
    cases = [
        (["run", "--model", str(bad_files["junk"]), "--prompt", "x"], "not a valid GGUF"),
        (["run", "--model", str(bad_files["truncated"]), "--prompt", "x"], "not a valid GGUF"),
        (["run", "--model", str(bad_files["zeroed"]), "--prompt", "x"], "interrupted write"),
        (["run", "--model", str(random_gemma_loras[0]), "--prompt", "x"], "adapter, not a model"),
        (["run", "--model", str(tmp_path / "none.gguf"), "--prompt", "x"], "does not exist"),
        (["run", "--model", str(gemma_q4_gguf), "--adapter", str(bad_files["mismatch"]), "--prompt", "x"],
         "blk.0.attn_q.weight shapes do not fit"),
        (["run", "--model", str(gemma_q4_gguf), "--adapter", str(gemma_q4_gguf), "--prompt", "x"],
         "not a GGUF LoRA adapter"),
        (["run", "--model", str(gemma_q4_gguf), "--adapter", "unregistered", "--prompt", "x"],
         "neither a registered adapter"),
        (["run", "--model", str(gemma_q4_gguf), "--max-tokens", "-1", "--prompt", "x"], "negative"),
        (["run", "--model", str(gemma_q4_gguf), "--ctx", "64", "--prompt", "word " * 200], "context holds 64"),
        (["serve", "--model", str(bad_files["junk"])], "not a valid GGUF"),
    ]
    env = {"EDGE_LORA_HOME": str(tmp_path / "home")}
    for argv, message in cases:
        result = _cli_subprocess(*argv, env=env)
        lines = result.stderr.splitlines()
        assert result.returncode == 2, (argv, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("edge-lora: error: ") and message in lines[0], (argv, lines)
        assert result.stdout == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_end_to_end_and_busy_port(tmp_path: Path, gemma_q4_gguf: Path, random_gemma_loras) -> None:
    port = _free_port()
    env = {**os.environ, "EDGE_LORA_HOME": str(tmp_path / "home")}
    key_file = tmp_path / "api-key"
    key_file.write_text("k-from-a-file\n")
    key_file.chmod(0o600)
    proc = subprocess.Popen([sys.executable, "-m", "edge_lora", "serve", "--model", str(gemma_q4_gguf),
                             "--adapter", f"{random_gemma_loras[0]}:1", "--port", str(port), "--ctx", "512",
                             "--api-key-file", str(key_file), "--no-prompt-cache"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert b"k-from-a-file" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # not visible in ps
        headers = {"Authorization": "Bearer k-from-a-file"}
        deadline = time.time() + 60
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers, timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
        ids = [m["id"] for m in models.json()["data"]]
        assert ids == ["gemma-3-270m-q4_k_m", "a"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 401
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers=headers, timeout=60,
                           json={"model": "a", "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
        again = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers=headers, timeout=60,
                           json={"model": "a", "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # --no-prompt-cache
        assert again.json()["choices"] == reply.json()["choices"]
        busy = _cli_subprocess("serve", "--model", str(gemma_q4_gguf), "--port", str(port),
                               env={"EDGE_LORA_HOME": str(tmp_path / "home")})
        assert busy.returncode == 2 and busy.stderr.startswith("edge-lora: error: cannot listen")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
