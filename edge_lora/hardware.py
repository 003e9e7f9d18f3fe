"""What this machine offers for local inference: RAM, cores, CPU features llama.cpp was built
to use, GPU offload, and the versions of the libraries that matter when reporting a bug."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

# Features worth showing; llama.cpp prints many more (e.g. per-backend flags).
_INTERESTING_FEATURES = ("AVX", "AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "F16C", "FMA", "NEON",
                         "ARM_FMA", "SVE", "DOTPROD", "MATMUL_INT8", "SSE3", "SSSE3", "BMI2", "METAL",
                         "CUDA", "VULKAN", "BLAS", "OPENMP")


@dataclass(frozen=True)
class CpuIdentity:
    """What the kernel says the CPU is: its model name and the feature flags it advertises
    (which, on some VMs, include instructions that trap: REFERENCE.md)."""

    model: str
    flags: tuple[str, ...]

    @property
    def amx_flags(self) -> tuple[str, ...]:
        return tuple(f for f in self.flags if f.startswith("amx"))


_CPUINFO_MODEL_KEYS = ("model name", "cpu model", "hardware", "processor")  # x86, mips/s390, arm, fallback
_CPUINFO_FLAG_KEYS = ("flags", "features")  # x86, arm


def cpu_identity(cpuinfo: str | None = None) -> CpuIdentity:
    """From /proc/cpuinfo (first processor) where there is one, else what ``platform`` knows."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key not in fields:
            fields[key] = value.strip()
    model = next((fields[k] for k in _CPUINFO_MODEL_KEYS if fields.get(k) and not fields[k].isdigit()), "")
    flags = next((fields[k].split() for k in _CPUINFO_FLAG_KEYS if fields.get(k)), [])
    return CpuIdentity(model=model or platform.processor() or platform.machine(), flags=tuple(sorted(set(flags))))


@dataclass(frozen=True)
class Hardware:
    total_ram_bytes: int
    available_ram_bytes: int
    physical_cores: int
    logical_cores: int
    cpu_features: tuple[str, ...]  # features the llama.cpp build uses on this CPU
    cpu_model: str
    cpu_amx_flags: tuple[str, ...]  # AMX as the kernel advertises it (whether or not it runs)
    gpu_offload: bool
    llama_build: str  # llama-cpp-python version, which pins the vendored llama.cpp
    llama_cpp_system_info: str
    os: str
    machine: str
    python: str
    versions: dict[str, str | None] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def cores(self) -> int:
        """Physical cores: llama.cpp runs best with one thread per physical core."""
        return self.physical_cores


def parse_system_info(text: str) -> dict[str, bool]:
    """Parse llama.cpp's ``llama_print_system_info`` (``CPU : AVX = 1 | AVX2 = 1 | ...``):
    every ``NAME = value`` pair, value non-zero means the build uses it."""
    features: dict[str, bool] = {}
    for name, value in re.findall(r"([A-Za-z0-9_]+)\s*=\s*([0-9]+)", text):
        features[name.upper()] = features.get(name.upper(), False) or int(value) != 0
    return features


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _llama_cpp_info() -> tuple[str, bool, str | None]:
    """(system info text, GPU offload supported, llama-cpp-python version); empty when the
    native library cannot load — doctor must still report everything else."""
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # a broken native build shows up here
        return f"llama_cpp unavailable: {exc}", False, None
    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()
    return info, bool(llama_cpp.llama_supports_gpu_offload()), getattr(llama_cpp, "__version__", None)


def detect_hardware() -> Hardware:
    memory = psutil.virtual_memory()
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    system_info, gpu, llama_version = _llama_cpp_info()
    parsed = parse_system_info(system_info)
    features = tuple(name for name in _INTERESTING_FEATURES if parsed.get(name))
    versions = {
        "edge-lora": _package_version("edge-lora"),
        "llama-cpp-python": llama_version or _package_version("llama_cpp_python"),
        "gguf": _package_version("gguf"),
        "textual": _package_version("textual"),
        "numpy": _package_version("numpy"),
        "psutil": _package_version("psutil"),
    }
    cpu = cpu_identity()
    return Hardware(
        total_ram_bytes=int(memory.total), available_ram_bytes=int(memory.available),
        physical_cores=int(physical), logical_cores=int(logical), cpu_features=features,
        cpu_model=cpu.model, cpu_amx_flags=cpu.amx_flags,
        gpu_offload=gpu, llama_build=f"llama-cpp-python {llama_version}" if llama_version else "unavailable",
        llama_cpp_system_info=system_info, os=f"{platform.system()} {platform.release()}",
        machine=platform.machine(), python=platform.python_version(), versions=versions)
