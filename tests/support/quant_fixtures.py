"""Real Gemma 3 270M files in several formats, built once per machine with llama.cpp's own
quantizer: F16 = the Q4_K_M package file dequantized (allow_requantize), then Q8_0 / Q4_K_M /
Q2_K quantized from that F16. Shared by the fit and perplexity tests (cached on disk)."""

from __future__ import annotations

import ctypes
from pathlib import Path

FTYPES = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15, "Q2_K": 10}


def _quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp.llama_cpp as llama

    llama.llama_backend_init()
    params = llama.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = ftype
    params.allow_requantize = True
    tmp = dst.with_name(dst.name + ".partial")
    rc = llama.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} failed with {rc}")
    tmp.replace(dst)


def gemma_formats(cache_dir: Path, q4_package_file: Path) -> dict[str, Path]:
    out = cache_dir / "gemma-formats"
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"gemma-3-270m-{name}.gguf" for name in FTYPES}
    if not files["F16"].exists():
        _quantize(q4_package_file, files["F16"], FTYPES["F16"])
    for name, path in files.items():
        if not path.exists():
            _quantize(files["F16"], path, FTYPES[name])
    return files
