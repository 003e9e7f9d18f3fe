from __future__ import annotations

import json

import importlib.metadata
import llama_cpp
import psutil

from edge_lora.cli import main
from edge_lora.hardware import detect_hardware, parse_system_info


def test_parse_system_info_reads_every_flag() -> None:
    text = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 0 | NEON = 1 | LLAMAFILE = 1 | CUDA : ARCHS = 890 |"
    parsed = parse_system_info(text)
    assert parsed["AVX"] and parsed["NEON"] and parsed["SSE3"]
    assert parsed["AVX2"] is False
    assert parsed["ARCHS"] is True


def test_detect_hardware_matches_psutil_and_llama_cpp() -> None:
    hw = detect_hardware()
    assert hw.total_ram_bytes == psutil.virtual_memory().total
    assert 0 < hw.available_ram_bytes <= hw.total_ram_bytes
    assert 1 <= hw.physical_cores <= hw.logical_cores
    assert hw.cores == hw.physical_cores
    flags = parse_system_info(llama_cpp.llama_print_system_info().decode())
    assert set(hw.cpu_features) == {name for name in hw.cpu_features if flags.get(name)}
    assert all(flags[name] for name in hw.cpu_features)
    assert hw.gpu_offload == bool(llama_cpp.llama_supports_gpu_offload())
    assert hw.versions["gguf"] == importlib.metadata.version("gguf")
    assert hw.versions["llama-cpp-python"] == llama_cpp.__version__
    assert llama_cpp.__version__ in hw.llama_build


def test_doctor_json_is_one_document(capsys) -> None:
    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_ram_bytes"] == psutil.virtual_memory().total
    assert isinstance(data["cpu_features"], list)
    assert data["versions"]["llama-cpp-python"] == llama_cpp.__version__


def test_doctor_plain_lists_ram_and_versions(capsys) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("RAM ")
    assert "llama-cpp-python" in out and "gguf" in out
