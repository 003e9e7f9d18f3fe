"""``manifest.json`` in an output directory (DESIGN.md schema).

``{"name", "architecture", "base", "adapter", "files": [{"path", "format", "kind", "bytes",
"bpw", "sha256", "ppl"?, "kld"?, "imatrix"?}]}``. ``imatrix`` (a file quantized with an importance
matrix): ``{"sha256"`` of the imatrix file, ``"text_sha256"`` of the calibration text, ``"tokens"``
evaluated, ``"dataset"`` (the text's name), ``"text_sketch"`` (core/text_sketch: lets ``ppl``
warn about an evaluation text that overlaps it), ``"path"`` of the imatrix file when it is in the
directory``}``. Several tools update one manifest (convert adds the F16
row, quantize adds rows, ppl records quality), so ``save`` merges with what is on disk and is
atomic. ``path`` is relative to the directory.

bpw (bits per weight) = 8 x (bytes of tensor data, padding excluded) / (number of weights),
summed over every tensor in the file, as read from the GGUF header. Header and metadata bytes
(e.g. the vocabulary) are excluded, so an F16 file with F32 norms is slightly above 16.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_lora.core.atomic import atomic_write_text, file_lock
from edge_lora.core.bounded_json import JsonKind, read_json_object
from edge_lora.core.errors import InputError, InvalidGGUFError
from edge_lora.core.gguf_check import GGUFInfo, validate_gguf
from edge_lora.core.imatrix_file import read_imatrix

MANIFEST_FILE = "manifest.json"
FileKind = Literal["model", "merged", "adapter"]
_KINDS = ("model", "merged", "adapter")
_HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_bits_per_weight(path: Path) -> tuple[int, float]:
    """(tensor data bytes, bits per weight) from the GGUF header (see module docstring)."""
    return info_bits_per_weight(validate_gguf(path))


def info_bits_per_weight(info: GGUFInfo) -> tuple[int, float]:
    """``gguf_bits_per_weight`` for a header already parsed (callers that hold one skip a re-parse)."""
    n_weights = sum(math.prod(t.shape) for t in info.tensors)
    data_bytes = sum(t.n_bytes for t in info.tensors)
    if n_weights == 0:
        raise InvalidGGUFError(f"{info.path} holds no tensors", fix="re-convert the model")
    return data_bytes, 8.0 * data_bytes / n_weights


@dataclass
class ManifestFile:
    path: str
    format: str
    kind: str
    bytes: int
    bpw: float
    sha256: str
    ppl: float | None = None
    kld: float | None = None
    imatrix: dict[str, Any] | None = None  # see the module docstring; None: not calibrated

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("ppl", "kld", "imatrix")}


@dataclass
class Manifest:
    directory: Path
    name: str = ""
    architecture: str = ""
    base: str = ""
    adapter: str | None = None
    files: list[ManifestFile] = field(default_factory=list)
    # Row paths as loaded from disk; None for a Manifest(directory) built without loading. Lets
    # ``save`` tell a row we dropped from one another tool added meanwhile.
    _loaded_paths: frozenset[str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, directory: Path | str) -> Manifest:
        """The manifest in ``directory``, or an empty one when there is none yet."""
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        raw = read_json_object(path, JsonKind.MANIFEST, missing_ok=True)
        if raw is None:
            return cls(directory, _loaded_paths=frozenset())
        try:
            files = [ManifestFile(**{k: f[k] for k in ManifestFile.__dataclass_fields__ if k in f})
                     for f in raw.get("files", [])]
            if any(row.imatrix is not None and not isinstance(row.imatrix, dict) for row in files):
                raise TypeError("an imatrix entry is not an object")
            manifest = cls(directory, name=str(raw.get("name", "")), architecture=str(raw.get("architecture", "")),
                           base=str(raw.get("base", "")), adapter=raw.get("adapter"), files=files,
                           _loaded_paths=frozenset(f.path for f in files))
        except (TypeError, AttributeError, KeyError) as exc:
            raise InputError(f"{path} is not a valid edge-lora manifest ({exc})",
                             fix="delete it and re-run `edge-lora convert`") from exc
        for row in files:
            # The manifest is untrusted: a row must name a file inside this directory.
            relative = Path(str(row.path))
            if relative.is_absolute() or ".." in relative.parts:
                raise InputError(f"{path} lists {row.path!r}, outside the directory",
                                 fix="re-run `edge-lora convert` to rewrite the manifest")
        return manifest

    def file(self, path: Path | str) -> ManifestFile | None:
        """The row for ``path``: a name relative to the directory (as rows store it) or an
        absolute path. A path relative to the working directory must be made absolute first."""
        rel = self._relative(path)
        return next((f for f in self.files if f.path == rel), None)

    def _relative(self, path: Path | str) -> str:
        """The row path for ``path`` (see ``file``): a relative path is taken as relative to the
        directory, because that is what callers holding a row or a file name pass."""
        p = Path(path)
        if p.is_absolute():
            try:
                # Resolve the directories only: a symlinked file is listed under its own name.
                return (p.parent.resolve() / p.name).relative_to(self.directory.resolve()).as_posix()
            except ValueError as exc:
                raise InputError(f"{p} is not inside the output directory {self.directory}",
                                 fix="write outputs into the manifest's directory") from exc
        return p.as_posix()

    def add_file(self, path: Path | str, *, format: str, kind: FileKind,
                 imatrix: dict[str, Any] | None = None) -> ManifestFile:
        """Measure a GGUF in the directory (size, bpw, sha256) and add or replace its row
        (``imatrix``: ``imatrix_record`` of the matrix it was quantized with). Quality figures of
        a replaced row are dropped: they described the old file."""
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}")
        rel = self._relative(path)
        full = self.directory / rel
        data_bytes, bpw = gguf_bits_per_weight(full)
        row = ManifestFile(path=rel, format=format, kind=kind, bytes=full.stat().st_size,
                           bpw=round(bpw, 4), sha256=sha256_file(full), imatrix=imatrix)
        self.files = [f for f in self.files if f.path != rel] + [row]
        return row

    def record_quality(self, path: Path | str, *, ppl: float | None = None, kld: float | None = None) -> None:
        row = self.file(path)
        if row is None:
            raise InputError(f"{path} is not listed in {self.directory / MANIFEST_FILE}",
                             fix="convert or quantize into this directory first")
        if ppl is not None:
            row.ppl = float(ppl)
        if kld is not None:
            row.kld = float(kld)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "architecture": self.architecture, "base": self.base,
                "adapter": self.adapter, "files": [f.to_json() for f in self.files]}

    def save(self) -> Path:
        """Merge with the manifest on disk (rows another tool added since we loaded are kept,
        rows we loaded and dropped stay dropped; our rows win), then write atomically — under a
        file lock, so two processes saving at once both keep their rows."""
        with file_lock(self.directory / MANIFEST_FILE):
            return self._merge_and_write()

    def _merge_and_write(self) -> Path:
        on_disk = Manifest.load(self.directory)
        ours = {f.path for f in self.files}
        loaded = self._loaded_paths or frozenset()
        merged = self.files + [f for f in on_disk.files if f.path not in ours and f.path not in loaded]
        for row in merged:
            old = on_disk.file(row.path)
            if old is not None and old.sha256 == row.sha256:
                row.ppl = row.ppl if row.ppl is not None else old.ppl
                row.kld = row.kld if row.kld is not None else old.kld
        self.files = merged
        for attr in ("name", "architecture", "base"):
            if not getattr(self, attr):
                setattr(self, attr, getattr(on_disk, attr))
        if self.adapter is None and self._loaded_paths is None:
            # Loaded from disk, None says "no adapter"; in a bare Manifest(directory) it is unknown.
            self.adapter = on_disk.adapter
        path = self.directory / MANIFEST_FILE
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path


def imatrix_record(imatrix_path: Path, directory: Path) -> dict[str, Any]:
    """What a manifest row records of the importance matrix a file was quantized with."""
    imatrix = read_imatrix(imatrix_path)
    record: dict[str, Any] = {"sha256": sha256_file(imatrix_path), "text_sha256": imatrix.text_sha256,
                              "tokens": imatrix.tokens if imatrix.tokens is not None
                              else imatrix.chunk_count * imatrix.chunk_size,
                              "dataset": imatrix.datasets[0] if imatrix.datasets else None}
    if imatrix.adapters:
        record["adapters"] = list(imatrix.adapters)
    if imatrix.text_sketch is not None:
        record["text_sketch"] = imatrix.text_sketch
    if imatrix_path.absolute().parent.resolve() == directory.resolve():
        record["path"] = imatrix_path.name
    return record


def record_quality_beside(directory: Path, model: Path, *, ppl: float, kld: float | None = None) -> bool:
    """Remember measured quality in ``directory``'s manifest.json, when there is one (a lone GGUF
    has none: returns False). Shared by ``edge-lora ppl`` and the TUI. Raises InputError when the
    manifest does not list ``model``."""
    if not (directory / MANIFEST_FILE).is_file():
        return False
    manifest = Manifest.load(directory)
    # A relative name: the manifest resolves absolute paths, which would leave a symlinked directory
    # (or follow a symlinked file out of it).
    name = model.relative_to(directory) if model.is_relative_to(directory) else model
    manifest.record_quality(name, ppl=ppl, kld=kld)
    manifest.save()
    return True
