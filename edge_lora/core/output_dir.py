"""An output directory as convert / quantize / ppl write it (DESIGN.md "Output directory"): the
model files by format, the GGUF adapters, the full-precision reference. The one reader of that
layout; choosing a file for a context and RAM is the fit estimator's (``edge_lora.analysis.fit``).

``manifest.json`` says which files belong to the conversion (another model's files may stay on
disk beside them); a directory without one (GGUF files copied by hand) is read from the file
names: ``<stem>-<FORMAT>.gguf`` for models, ``adapter-<name>.gguf`` for adapters (an importance
matrix, ``<stem>.imatrix.gguf``, is neither). Nothing here
opens a GGUF: headers are validated by whoever loads or estimates a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_lora.core.errors import InputNotFoundError
from edge_lora.core.formats import Format, format_named, split_file_name
from edge_lora.core.imatrix_file import is_imatrix_file_name
from edge_lora.core.manifest import MANIFEST_FILE, Manifest, ManifestFile

ADAPTER_PREFIX = "adapter-"
ModelKind = Literal["model", "merged"]


def adapter_file_name(name: str) -> str:
    """The file a GGUF adapter named ``name`` is written to: ``adapter-<name>.gguf``."""
    return f"{ADAPTER_PREFIX}{name}.gguf"


def adapter_name(path: Path | str) -> str | None:
    """``adapter-legal.gguf`` -> ``legal``; None for a file not named as an adapter."""
    file_name = Path(path).name
    if not file_name.startswith(ADAPTER_PREFIX):
        return None
    return file_name.removesuffix(".gguf")[len(ADAPTER_PREFIX):] or None


@dataclass(frozen=True)
class ModelFile:
    path: Path
    format_name: str | None  # the manifest's, else the file name's; None when neither says
    kind: ModelKind
    row: ManifestFile | None = None  # size, bpw and measured quality, when the manifest lists it

    @property
    def format(self) -> Format | None:
        return format_named(self.format_name) if self.format_name is not None else None


@dataclass(frozen=True)
class AdapterFile:
    name: str
    path: Path
    row: ManifestFile | None = None


@dataclass(frozen=True)
class OutputDir:
    directory: Path
    manifest: Manifest  # empty when the directory has none
    models: tuple[ModelFile, ...]  # files present on disk, in manifest (else name) order
    adapters: tuple[AdapterFile, ...]
    missing: tuple[str, ...] = ()  # files the manifest lists that are gone

    @classmethod
    def read(cls, directory: Path | str) -> OutputDir:
        """The directory's files, by its manifest when that lists a model file present on disk,
        else by file names. Raises InputError for a damaged manifest."""
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            raise InputNotFoundError(f"{directory} is not a directory",
                                     fix="give a directory written by `edge-lora convert`")
        manifest = Manifest.load(directory)
        models: list[ModelFile] = []
        adapters: list[AdapterFile] = []
        missing: list[str] = []
        for row in manifest.files:
            path = directory / row.path  # Manifest.load refused rows outside the directory
            if not path.is_file():
                missing.append(row.path)
            elif row.kind == "adapter":
                adapters.append(AdapterFile(adapter_name(path) or path.stem, path, row))
            else:
                models.append(ModelFile(path, str(row.format), "merged" if row.kind == "merged" else "model", row))
        if not models:
            by_names = cls.by_file_names(directory)
            return cls(directory, manifest, by_names.models, tuple(adapters) or by_names.adapters, tuple(missing))
        return cls(directory, manifest, tuple(models), tuple(adapters), tuple(missing))

    @classmethod
    def by_file_names(cls, directory: Path | str) -> OutputDir:
        """The GGUF files in ``directory`` read by name alone, ignoring any manifest."""
        directory = Path(directory).expanduser()
        models: list[ModelFile] = []
        adapters: list[AdapterFile] = []
        for path in sorted(p for p in directory.glob("*.gguf") if p.is_file() and not is_imatrix_file_name(p)):
            name = adapter_name(path)
            if name is not None:
                adapters.append(AdapterFile(name, path))
                continue
            fmt = split_file_name(path)[1]
            models.append(ModelFile(path, fmt.name if fmt is not None else None, "model"))
        return cls(directory, Manifest(directory), tuple(models), tuple(adapters))

    @property
    def has_manifest(self) -> bool:
        return (self.directory / MANIFEST_FILE).is_file()

    @property
    def kind(self) -> ModelKind:
        """``merged`` when the directory holds a merged model (base + adapter), else ``model``."""
        return "merged" if any(m.kind == "merged" for m in self.models) else "model"

    @property
    def name(self) -> str:
        return self.manifest.name or self.directory.name

    def by_format(self) -> dict[str, ModelFile]:
        """Format name (upper case) -> model file, for the files whose format is known; the first
        listed wins."""
        found: dict[str, ModelFile] = {}
        for model in self.models:
            if model.format_name is not None:
                found.setdefault(model.format_name.upper(), model)
        return found

    @property
    def reference(self) -> ModelFile | None:
        """The full-precision file KLD is measured against (F32, else F16, else BF16)."""
        ranked = [(fmt.rank, m) for m in self.models if (fmt := m.format) is not None and fmt.full_precision]
        return min(ranked, key=lambda pair: pair[0])[1] if ranked else None
