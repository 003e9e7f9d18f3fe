"""BASE / PEFT references: a local directory, or a Hugging Face repo id fetched (or found in
the cache) with ``huggingface_hub.snapshot_download``.

``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are read at call time (huggingface_hub
reads them once at import, which would ignore a change made after). Only safetensors and
JSON/tokenizer files are fetched: pickled ``*.bin`` weights are never downloaded. LFS blobs
are re-hashed against their sha256 name, because the hub client checks only sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal

from edge_lora.core import constants
from edge_lora.core.atomic import atomic_write_text
from edge_lora.core.bounded_json import JsonKind, read_json_object
from edge_lora.core.errors import EdgeLoraError, InputError, InputNotFoundError, InvalidCheckpointError, OutputError

RefKind = Literal["model", "adapter"]

# What a conversion needs; everything else in a repo (pickles, ONNX, GGUFs) is skipped.
ALLOW_PATTERNS: dict[RefKind, list[str]] = {
    "model": ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"],
    "adapter": ["adapter_config.json", "adapter_model.safetensors", "*.json", "README.md"],
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 8 * 1024 * 1024


def hub_cache_dir() -> Path:
    explicit = os.environ.get("HF_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or constants.HF_HUB_OFFLINE


def _looks_like_path(ref: str) -> bool:
    # A repo id has at most one slash ("org/name"); anything else is meant as a path.
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def verify_lfs_blobs(snapshot: Path) -> None:
    """Files in the cache are symlinks to ``blobs/<etag>``; an LFS etag is the content's
    sha256. Re-hash those, so a corrupted or tampered blob is caught before conversion. A blob
    already verified with the same size and mtime is not hashed again: re-reading a 16 GB model
    on every convert would cost half a minute."""
    verified = _load_verified()
    before = dict(verified)
    for file in sorted(snapshot.rglob("*")):
        if not file.is_symlink():
            continue
        blob = file.resolve()
        if not _SHA256_NAME.match(blob.name):
            continue  # small git files: etag is a git sha1, not the content's sha256
        stat = blob.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        if verified.get(str(blob)) == stamp:
            continue
        digest = hashlib.sha256()
        with open(blob, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != blob.name:
            raise InvalidCheckpointError(
                f"{file.relative_to(snapshot)} in the Hugging Face cache is corrupt (sha256 mismatch)",
                fix=f"delete {blob} and download again")
        verified[str(blob)] = stamp
    if verified != before:
        try:
            _verified_path().parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(_verified_path(), json.dumps(verified))
        except (OSError, OutputError):
            pass  # only a cache: the blobs are hashed again next time


def _verified_path() -> Path:
    return constants.EDGE_LORA_CACHE / "verified-blobs.json"


def _load_verified() -> dict[str, list[int]]:
    try:
        return read_json_object(_verified_path(), JsonKind.CACHE_RECORD, missing_ok=True) or {}
    except EdgeLoraError:
        return {}  # only a cache: the blobs are hashed again


def resolve_local_or_hub(ref: str | os.PathLike[str], kind: RefKind = "model") -> Path:
    """An existing local directory as is; otherwise a repo id resolved through the HF cache
    (downloading unless offline)."""
    text = os.fspath(ref)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise InputError(f"{text} is a file, not {'an' if kind[0] in 'aeiou' else 'a'} {kind} directory",
                         fix=f"give the directory that holds the {kind}'s files")
    if _looks_like_path(text) or not _REPO_ID.match(text):
        raise InputNotFoundError(f"{kind} directory {text} does not exist",
                                 fix="check the path, or give a Hugging Face repo id like org/name")
    return _snapshot(text, kind)


def _snapshot(repo_id: str, kind: RefKind) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = hub_offline()
    try:
        path = Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), local_files_only=offline,
                                      allow_patterns=ALLOW_PATTERNS[kind]))
    except GatedRepoError as exc:
        raise InputError(f"Hugging Face repo {repo_id} is gated",
                         fix="accept its license on huggingface.co and run `hf auth login`") from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise InputNotFoundError(f"Hugging Face repo {repo_id} was not found (or is private)",
                                 fix="check the repo id, or log in with `hf auth login`") from exc
    except LocalEntryNotFoundError as exc:
        if offline:
            raise InputNotFoundError(
                f"{repo_id} is not a local directory and is not in the Hugging Face cache "
                f"({hub_cache_dir()}), and HF_HUB_OFFLINE is set",
                fix="unset HF_HUB_OFFLINE to download it, or give a local directory") from exc
        raise InputNotFoundError(f"could not download {repo_id} (no connection?) and it is not cached",
                                 fix="check the network, or give a local directory") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise InputNotFoundError(f"could not fetch {repo_id} from the Hugging Face Hub: {exc}",
                                 fix="check the repo id and the network, or give a local directory") from exc
    verify_lfs_blobs(path)
    return path
