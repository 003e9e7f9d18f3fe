"""`edge-lora export vllm` without vLLM: what is written (PEFT directories equal to the adapters
edge-lora hot-applies, serve.sh, compose.yaml and kubernetes.yaml checked by the compose
specification's schema and the kubernetes client's models), and what is refused.
The same export served by a real vLLM: tests/test_vllm_serving.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_lora.cli import main
from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf
from edge_lora.converters.architectures import arch_spec_for
from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.peft import PeftAdapter
from edge_lora.converters.combine import write_peft_adapter
from edge_lora.converters.peft_export import (PEFT_PATH_KEY, PEFT_SHA256_KEY, peft_dir_sha256, rebuild_from_gguf,
                                              scaled)
from edge_lora.core.errors import AdapterError, OutputError
from edge_lora.core.gguf_check import validate_gguf
from edge_lora.export.vllm import SourceKind, plan_export, write_export
from edge_lora.serving.registry import AdapterRegistry
from tests.support.model_fixtures import make_checkpoint, make_peft_adapter
from tests.support.vllm_setup import SCALES, TinyDeployment, build_tiny_deployment


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyDeployment:
    return build_tiny_deployment(tmp_path_factory.mktemp("vllm-export"))


@pytest.fixture()
def registry(tiny: TinyDeployment, tmp_path: Path) -> AdapterRegistry:
    registry = AdapterRegistry(tmp_path / "home")
    tiny.register(registry)
    return registry


def delta_weights(peft_dir: Path) -> dict[str, np.ndarray]:
    """ΔW per HF weight, as PEFT computes it (scale from r / alpha / rsLoRA / patterns)."""
    adapter = PeftAdapter.open(peft_dir)
    return {name: d.scale * (d.lora_b.astype(np.float64) @ d.lora_a.astype(np.float64))
            for name, d in adapter.deltas.items()}


def assert_same_deltas(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float) -> None:
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        err = np.abs(got[name] - expected).max() / np.abs(expected).max()
        assert err < rtol, (name, err)


def launched_args(script: Path, tmp_path: Path) -> list[str]:
    """The arguments serve.sh hands `vllm` (a stand-in on PATH prints them, one a line)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "vllm").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "vllm").chmod(0o755)
    result = subprocess.run([str(script)], capture_output=True, text=True, check=True,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    return result.stdout.split("\n")[:-1]


def test_gguf_adapter_records_its_peft_source(tiny: TinyDeployment) -> None:
    info = validate_gguf(tiny.gguf["plain"], expect_type="adapter")
    assert info.metadata[PEFT_PATH_KEY] == str(tiny.peft["plain"].resolve())
    assert info.metadata[PEFT_SHA256_KEY] == peft_dir_sha256(tiny.peft["plain"])


@pytest.mark.parametrize(("outtype", "rtol"), [("f32", 1e-6), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_peft_rebuilt_from_gguf_computes_the_same_delta(tiny: TinyDeployment, tmp_path: Path, outtype: str,
                                                        rtol: float) -> None:
    """rank_pattern + alpha_pattern, the Llama q/k permutation and Q8_0's padded rank all undone."""
    gguf_path = convert_adapter_to_gguf(tiny.peft["pat"], tiny.base, tmp_path / f"pat-{outtype}.gguf", outtype=outtype)
    with HFCheckpoint.open(tiny.base) as ckpt:
        spec = arch_spec_for(ckpt.config)
    adapter = rebuild_from_gguf(gguf_path, spec)
    assert {d.rank for d in adapter.deltas.values()} == {4, 8}  # q_proj's rank 4 survived Q8_0's padding to 32
    rebuilt = write_peft_adapter(scaled(adapter, 0.5), tmp_path / "rebuilt")
    want = {k: 0.5 * v for k, v in delta_weights(tiny.peft["pat"]).items()}
    assert_same_deltas(delta_weights(rebuilt), want, rtol)
    config = json.loads((rebuilt / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"] and config["peft_type"] == "LORA"


def test_export_writes_a_deployment_serving_the_same_names(tiny: TinyDeployment, registry: AdapterRegistry,
                                                          tmp_path: Path) -> None:
    plan = plan_export(tmp_path / "export", model=tiny.out, registry=registry, port=8123)
    out = write_export(plan)
    kinds = {a.name: a.kind for a in plan.adapters}
    assert kinds == {"gone": SourceKind.GGUF, "pat": SourceKind.PEFT, "plain": SourceKind.PEFT,
                     "rs": SourceKind.PEFT, "scaled": SourceKind.PEFT}
    assert plan.refused == []
    assert plan.max_lora_rank == 16  # rs has r=16: the smallest vLLM choice holding it
    # every exported adapter computes what edge-lora hot-applies (the registry scale folded in)
    for name in kinds:
        want = {k: SCALES.get(name, 1.0) * v for k, v in delta_weights(tiny.peft[name]).items()}
        assert_same_deltas(delta_weights(out / "adapters" / name), want, 1e-6)
    script = (out / "serve.sh").read_text()
    assert script.startswith("#!/bin/sh") and (out / "serve.sh").stat().st_mode & 0o111
    args = launched_args(out / "serve.sh", tmp_path)
    assert args[:3] == ["serve", str(tiny.base.resolve()), "--served-model-name"]
    assert args[3] == "base-F16"  # the id `edge-lora serve` answers to for this directory
    modules = args[args.index("--lora-modules") + 1:args.index("--max-lora-rank")]
    assert modules == [f"{n}={out}/adapters/{n}" for n in sorted(kinds)]
    assert args[args.index("--max-lora-rank") + 1] == "16" and args[args.index("--max-loras") + 1] == "5"
    assert args[-4:] == ["--host", "127.0.0.1", "--port", "8123"]
    readme = (out / "README.md").read_text()
    assert "rebuilt from the GGUF adapter" in readme and "0.5 (folded into lora_B)" in readme
    # moved elsewhere, the script still finds its adapters
    moved = shutil.move(str(out), tmp_path / "moved")
    args = launched_args(Path(moved) / "serve.sh", tmp_path)
    assert f"plain={moved}/adapters/plain" in args


def test_a_changed_peft_source_is_not_used(tiny: TinyDeployment, tmp_path: Path) -> None:
    source = shutil.copytree(tiny.peft["plain"], tmp_path / "plain")
    gguf_path = convert_adapter_to_gguf(source, tiny.base, tmp_path / "adapter-edited.gguf")
    make_peft_adapter(tiny.base, source, r=8, alpha=16, seed=99)  # retrained in place after conversion
    registry = AdapterRegistry(tmp_path / "home")
    registry.add("edited", gguf_path)
    plan = plan_export(tmp_path / "export", model=tiny.out, registry=registry)
    assert [(a.name, a.kind) for a in plan.adapters] == [("edited", SourceKind.GGUF)]
    out = write_export(plan)
    assert_same_deltas(delta_weights(out / "adapters" / "edited"), delta_weights(tiny.peft["plain"]), 1e-6)


def test_compose_and_kubernetes_files_pass_their_validators(tiny: TinyDeployment, registry: AdapterRegistry,
                                                            tmp_path: Path) -> None:
    from kubernetes.client import ApiClient, V1Deployment, V1Service  # noqa: F401 (the kinds checked)

    plan = plan_export(tmp_path / "export", model=tiny.out, registry=registry, tensor_parallel_size=2,
                       replicas=3, port=9000)
    out = write_export(plan)
    checker = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec", str(out / "compose.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load((out / "compose.yaml").read_text())
    service = compose["services"]["vllm"]
    command = service["command"]
    assert command[0] == "/models/base" and command[command.index("--served-model-name") + 1] == "base-F16"
    assert "plain=/models/adapters/plain" in command
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    assert service["ports"][0]["published"] == "9000" and service["ports"][0]["host_ip"] == "127.0.0.1"
    assert {"source": str(tiny.base.resolve()), "target": "/models/base"}.items() <= service["volumes"][0].items()

    client = ApiClient()
    documents = list(yaml.safe_load_all((out / "kubernetes.yaml").read_text()))
    assert [d["kind"] for d in documents] == ["Deployment", "Service"]
    for document in documents:
        model = client._ApiClient__deserialize(document, f"V1{document['kind']}")
        assert client.sanitize_for_serialization(model) == document  # nothing unknown, nothing lost
    deployment, service_doc = documents
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 3
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["args"][container["args"].index("--served-model-name") + 1] == "base-F16"
    assert "scaled=/models/adapters/scaled" in container["args"]
    assert service_doc["spec"]["ports"][0]["port"] == 9000
    assert service_doc["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def _refusal(tmp_path: Path, tiny: TinyDeployment, adapter: Path) -> str:
    with pytest.raises(AdapterError) as caught:
        plan_export(tmp_path / "export", model=tiny.out, adapters=[str(adapter)],
                    registry=AdapterRegistry(tmp_path / "home"))
    assert not (tmp_path / "export").exists()
    return caught.value.one_line()


def test_what_vllm_cannot_serve_is_refused_naming_the_way_out(tiny: TinyDeployment, tmp_path: Path) -> None:
    dora = make_peft_adapter(tiny.base, tmp_path / "dora", use_dora=True)
    assert "DoRA" in _refusal(tmp_path, tiny, dora) and "merged checkpoint" in _refusal(tmp_path, tiny, dora)
    saved = make_peft_adapter(tiny.base, tmp_path / "saved", modules_to_save=["lm_head"])
    assert "modules_to_save ['lm_head']" in _refusal(tmp_path, tiny, saved)
    big = make_peft_adapter(tiny.base, tmp_path / "big", r=640, target_modules=("down_proj",))
    assert "rank 640 is above 512" in _refusal(tmp_path, tiny, big)
    ia3 = shutil.copytree(tiny.peft["plain"], tmp_path / "ia3")
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert "llama.cpp's LoRA runtime and vLLM cannot apply IA3; merge it instead" in _refusal(tmp_path, tiny, ia3)


def test_adapters_for_another_base_are_refused(tiny: TinyDeployment, tmp_path: Path) -> None:
    deeper = make_checkpoint("llama", tmp_path / "deeper", n_layers=3)
    other = convert_adapter_to_gguf(make_peft_adapter(deeper, tmp_path / "deep-lora"), deeper,
                                    tmp_path / "adapter-deep.gguf")
    qwen = make_checkpoint("qwen2", tmp_path / "qwen")
    qwen_gguf = convert_adapter_to_gguf(make_peft_adapter(qwen, tmp_path / "qwen-lora"), qwen,
                                        tmp_path / "adapter-qwen.gguf")
    registry = AdapterRegistry(tmp_path / "home")
    tiny.register(registry)
    registry.add("deep", other)
    registry.add("qwen", qwen_gguf)
    # by default: every adapter made for a llama; the misfit is refused, the others exported
    plan = plan_export(tmp_path / "export", model=tiny.out, registry=registry)
    assert [r.name for r in plan.refused] == ["deep"] and "deep" not in [a.name for a in plan.adapters]
    assert re.search(r"(blk|model\.layers)\.2\.", plan.refused[0].reason) and "base" in plan.refused[0].reason
    assert "qwen" not in [a.name for a in plan.adapters]
    with pytest.raises(AdapterError, match="made for a qwen2 model"):
        plan_export(tmp_path / "export", model=tiny.out, registry=registry, adapters=["qwen"])


def test_cli_refuses_a_base_vllm_cannot_load_in_one_line(tiny: TinyDeployment, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tiny.out / "base-F16.gguf", lone / "base-F16.gguf")  # a GGUF alone: no manifest
    assert main(["export", "vllm", "--out", str(tmp_path / "x"), "--model", str(lone / "base-F16.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vLLM cannot serve a GGUF alone" in err and "--base" in err
    pickled = shutil.copytree(tiny.base, tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert main(["export", "vllm", "--out", str(tmp_path / "x"), "--model", str(tiny.out),
                 "--base", str(pickled)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only pickled weights" in err
    foreign = shutil.copytree(tiny.base, tmp_path / "foreign")
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    assert main(["export", "vllm", "--out", str(tmp_path / "x"), "--base", str(foreign),
                 "--model", str(tiny.out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FooForCausalLM" in err
    assert not (tmp_path / "x").exists()
    assert main(["export", "vllm"]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_cli_exports_with_json(tiny: TinyDeployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny.register(AdapterRegistry())  # the test's own EDGE_LORA_HOME
    assert main(["export", "vllm", "--out", str(tmp_path / "export"), "--model", str(tiny.out),
                 "--adapter", "plain", "--adapter", "gone", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [(a["name"], a["source"]) for a in record["adapters"]] == [
        ("plain", "PEFT source"), ("gone", "rebuilt from the GGUF adapter")]
    assert record["max_lora_rank"] == 8 and record["max_loras"] == 2
    with pytest.raises(OutputError):  # an export directory is only ever replaced by another export
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        write_export(plan_export(tmp_path / "other", model=tiny.out, registry=AdapterRegistry()))


def test_a_recorded_source_that_is_another_adapter_is_not_used(tiny: TinyDeployment, tmp_path: Path) -> None:
    """The GGUF's metadata is untrusted: pointing it (with a matching hash) at another adapter
    does not make the export serve that adapter."""
    from tests.support.gguf_edit import rewrite_gguf

    other = tiny.peft["pat"]
    forged = rewrite_gguf(tiny.gguf["gone"], tmp_path / "adapter-forged.gguf",
                          set_values={PEFT_PATH_KEY: str(other.resolve()), PEFT_SHA256_KEY: peft_dir_sha256(other)})
    registry = AdapterRegistry(tmp_path / "home")
    registry.add("forged", forged)
    plan = plan_export(tmp_path / "export", model=tiny.out, registry=registry)
    assert [(a.name, a.kind) for a in plan.adapters] == [("forged", SourceKind.GGUF)]
    out = write_export(plan)
    assert_same_deltas(delta_weights(out / "adapters" / "forged"), delta_weights(tiny.peft["gone"]), 1e-6)


def test_check_compares_greedy_tokens_and_recognises_near_ties() -> None:
    from edge_lora.export.check import CheckReport, ModelCheck, compare, format_report

    local = ([1, 2, 3, 4], [{1: -0.1}, {2: -0.50, 7: -0.52}, {3: -0.1}, {4: -0.1}])
    assert compare(local, local, 0, 4) == (4, None)
    tie = compare(local, ([1, 7, 5], [{1: -0.1}, {7: -0.50, 2: -0.53}, {5: -0.2}]), 0, 4)
    assert tie[0] == 1 and tie[1] is not None and tie[1].near_tie
    assert tie[1].local_gap == pytest.approx(0.02) and tie[1].server_gap == pytest.approx(0.03)
    clear = compare(local, ([1, 7], [{1: -0.1}, {7: -0.2, 2: -1.5}]), 0, 4)[1]
    assert clear is not None and not clear.near_tie and clear.position == 1
    ended = compare(local, ([1, 2], [{1: -0.1}, {2: -0.5}]), 2, 4)[1]  # the server stopped early
    assert ended is not None and ended.server_token is None and not ended.near_tie and ended.prompt == 2
    assert compare(local, local, 0, 2) == (2, None)  # only the first K count
    report = CheckReport("http://x", 4, ["p"], [ModelCheck("base", None, 4, 4),
                                                ModelCheck("a", "a", 1, 4, [tie[1]]), ModelCheck("b", "b", 1, 4, [clear])])
    assert [m.passed for m in report.models] == [True, True, False] and not report.passed
    table = format_report(report)
    assert "pass (near-tie)" in table and "FAIL" in table and "edge-lora #2 vs server #7" in table
    assert json.loads(json.dumps(report.to_json()))["models"][2]["divergence"]["near_tie"] is False
