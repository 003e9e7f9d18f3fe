"""BASE/PEFT resolution: local directories as is; repo ids through a pre-filled HF cache,
offline (no network in tests)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from edge_lora.core.errors import InputError, InputNotFoundError, InvalidCheckpointError
from edge_lora.hub import resolve_local_or_hub

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _fill_cache(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub writes: blobs named by etag (sha256 for LFS files),
    snapshots/<rev>/<file> symlinks into blobs, refs/main holding the revision."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_local_directory_is_returned_as_is(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    assert resolve_local_or_hub(d) == d
    assert resolve_local_or_hub(str(d), "adapter") == d


def test_repo_id_resolves_from_offline_cache(tmp_path: Path) -> None:
    snapshot = _fill_cache(tmp_path / "hf-home", "acme/tiny-llama",
                           {"config.json": b'{"architectures": ["LlamaForCausalLM"]}',
                            "model.safetensors": b"x" * 100})
    got = resolve_local_or_hub("acme/tiny-llama", "model")
    assert got.resolve() == snapshot.resolve()
    assert (got / "config.json").read_bytes().startswith(b"{")


def test_repo_not_cached_offline_is_input_not_found_with_fix(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError) as info:
        resolve_local_or_hub("acme/not-there", "model")
    assert "HF_HUB_OFFLINE" in info.value.one_line()
    assert info.value.fix


def test_corrupt_lfs_blob_is_detected(tmp_path: Path) -> None:
    snapshot = _fill_cache(tmp_path / "hf-home", "acme/corrupt", {"model.safetensors": b"y" * 64})
    (snapshot / "model.safetensors").resolve().write_bytes(b"z" * 64)  # same size, other bytes
    with pytest.raises(InvalidCheckpointError, match="sha256"):
        resolve_local_or_hub("acme/corrupt")



def test_verified_blobs_are_not_hashed_again_until_they_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import os

    from edge_lora import hub

    snapshot = _fill_cache(tmp_path / "hf-home", "acme/big", {"model.safetensors": b"w" * 64})
    hashed: list[int] = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(hub.hashlib, "sha256", lambda *a: hashed.append(1) or real_sha256(*a))
    resolve_local_or_hub("acme/big")
    resolve_local_or_hub("acme/big")
    assert len(hashed) == 1  # the second convert trusts the recorded (size, mtime)
    blob = (snapshot / "model.safetensors").resolve()
    blob.write_bytes(b"v" * 64)
    os.utime(blob, ns=(blob.stat().st_atime_ns, blob.stat().st_mtime_ns + 10**9))
    with pytest.raises(InvalidCheckpointError, match="sha256"):
        resolve_local_or_hub("acme/big")


def test_missing_path_and_file_paths(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="does not exist"):
        resolve_local_or_hub(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(InputNotFoundError):
        resolve_local_or_hub("./relative-missing")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InputError, match="is a file, not a model directory"):
        resolve_local_or_hub(str(f))
    with pytest.raises(InputError, match="is a file, not an adapter directory"):
        resolve_local_or_hub(str(f), "adapter")
