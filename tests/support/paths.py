"""Paths to the real data every machine has: the bundled legal adapter and licence texts."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LEGAL_ADAPTER_DIR = REPO_ROOT / "edge_lora" / "data" / "legal-adapter"
LICENSES = Path("/usr/share/common-licenses")
