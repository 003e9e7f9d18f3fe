"""An HF checkpoint directory: config.json plus single or sharded safetensors.

Tensor lookups go through the shard index (``model.safetensors.index.json``) so a sharded
checkpoint reads like one file; shards are opened (mmapped, header-validated) once.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from edge_lora.converters.architectures import text_only_view
from edge_lora.converters.safetensors_io import SafetensorsFile, TensorInfo
from edge_lora.core.bounded_json import JsonKind, read_json_object
from edge_lora.core.errors import InputNotFoundError, InvalidCheckpointError, UnsafeFormatError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _read_json_object(path: Path, what: str, kind: JsonKind) -> dict[str, Any]:
    value = read_json_object(path, kind, missing_ok=True)
    if value is None:
        raise InvalidCheckpointError(f"{path.parent} has no {path.name}",
                                     fix=f"point at a Hugging Face checkpoint directory with {what}")
    return value


def checkpoint_name(path: Path) -> str:
    """A display name from the directory: HF cache snapshots live in
    ``models--org--name/snapshots/<rev>``, so use the repo name there."""
    path = Path(path).resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name


def _text_only_names(weight_map: dict[str, str], config: dict[str, Any]
                     ) -> tuple[dict[str, str], dict[str, str]]:
    """(text name -> shard, text name -> stored name): a multimodal checkpoint seen as its text
    model, with the vision tower and projector dropped from the map so they are never read."""
    view = text_only_view(config)
    if view is None:
        return weight_map, {n: n for n in weight_map}
    shards: dict[str, str] = {}
    stored: dict[str, str] = {}
    for name, shard in weight_map.items():
        text_name = view.text_name(name)
        if text_name is None:
            continue
        if text_name in stored:
            raise InvalidCheckpointError(f"checkpoint holds both {stored[text_name]!r} and {name!r}",
                                         fix="re-download the checkpoint (it mixes two transformers layouts)")
        shards[text_name], stored[text_name] = shard, name
    return shards, stored


class HFCheckpoint:
    """``config`` and tensor names are the text model's for a multimodal architecture with a
    text-only view (``edge_lora.converters.architectures.TextOnlyView``): ``config`` is then the text
    architecture's config.json, ``raw_config`` the file as written."""

    def __init__(self, path: Path, config: dict[str, Any], weight_map: dict[str, str],
                 shards: dict[str, SafetensorsFile] | None = None) -> None:
        self.path = path
        self.raw_config = config
        view = text_only_view(config)
        self.config = view.flatten_config(config) if view is not None else config
        self._weight_map, self._stored_names = _text_only_names(weight_map, config)
        self._shards: dict[str, SafetensorsFile] = shards if shards is not None else {}  # opened once each

    @classmethod
    def open(cls, path: Path | str) -> HFCheckpoint:
        path = Path(path)
        if not path.is_dir():
            raise InputNotFoundError(f"checkpoint directory {path} does not exist",
                                     fix="give a local Hugging Face checkpoint directory or a repo id")
        config = _read_json_object(path / CONFIG_FILE, "config.json", JsonKind.CONFIG)
        architectures = config.get("architectures")
        if (not isinstance(architectures, list) or not architectures
                or not all(isinstance(a, str) for a in architectures)):
            raise InvalidCheckpointError(f"{path / CONFIG_FILE} has no \"architectures\" list",
                                         fix="add e.g. \"architectures\": [\"LlamaForCausalLM\"]")
        weight_map, shards = cls._weight_map_for(path)
        try:
            # The checkpoint takes over ``shards`` (and adds to it), so closing it closes them all.
            ckpt = cls(path, config, weight_map, shards)
            for shard in sorted(set(weight_map.values())):
                ckpt._shard(shard)
            for name, shard in weight_map.items():
                if name not in shards[shard]:
                    raise InvalidCheckpointError(
                        f"{path / INDEX_FILE} maps {name!r} to {shard}, which does not contain it",
                        fix="re-download the checkpoint")
        except BaseException:
            for shard_file in shards.values():
                shard_file.close()
            raise
        return ckpt

    @staticmethod
    def _weight_map_for(path: Path) -> tuple[dict[str, str], dict[str, SafetensorsFile]]:
        """(tensor name -> shard file name, shards already opened to list their names: a single
        file is, and its parsed header is kept rather than parsed again)."""
        index_path = path / INDEX_FILE
        if index_path.exists():
            index = _read_json_object(index_path, "a shard index", JsonKind.SHARD_INDEX)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise InvalidCheckpointError(f"{index_path} has no valid \"weight_map\"",
                                             fix="re-download the checkpoint")
            for shard in set(weight_map.values()):
                shard_path = path / shard
                # A shard name is a file in this directory, never a path out of it.
                if Path(shard).name != shard or not shard.endswith(".safetensors"):
                    raise InvalidCheckpointError(f"{index_path} names an invalid shard {shard!r}",
                                                 fix="re-download the checkpoint")
                if not shard_path.is_file():
                    raise InvalidCheckpointError(
                        f"{index_path} names shard {shard}, which is missing from {path}",
                        fix="re-download the checkpoint (an interrupted download leaves shards missing)")
            return dict(weight_map), {}
        if (path / SINGLE_FILE).is_file():
            single = SafetensorsFile(path / SINGLE_FILE)
            return dict.fromkeys(single.names(), SINGLE_FILE), {SINGLE_FILE: single}
        if any((path / p).exists() for p in PICKLE_FILES):
            raise UnsafeFormatError(
                f"{path} holds only PyTorch pickle weights (pytorch_model.bin), which can run code when loaded",
                fix="use a checkpoint with safetensors weights (most Hub repos have one)")
        raise InvalidCheckpointError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE}",
                                     fix="point at a Hugging Face checkpoint with safetensors weights")

    def _shard(self, shard: str) -> SafetensorsFile:
        if shard not in self._shards:
            self._shards[shard] = SafetensorsFile(self.path / shard)
        return self._shards[shard]

    @property
    def architecture(self) -> str:
        """What config.json says (``config`` names the text architecture for a multimodal one)."""
        return str(self.raw_config["architectures"][0])

    @property
    def name(self) -> str:
        return checkpoint_name(self.path)

    def tensor_names(self) -> list[str]:
        return list(self._weight_map)

    def has_tensor(self, name: str) -> bool:
        return name in self._weight_map

    def _file_for(self, name: str) -> SafetensorsFile:
        shard = self._weight_map.get(name)
        if shard is None:
            raise InvalidCheckpointError(f"checkpoint {self.path} has no tensor {name!r}",
                                         fix="check the checkpoint is complete")
        return self._shard(shard)

    def tensor_info(self, name: str) -> TensorInfo:
        return self._file_for(name).info(self._stored_names[name])

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        return self._file_for(name).read(self._stored_names[name], rows)

    def release(self, name: str, rows: slice | None = None) -> None:
        """See ``SafetensorsFile.release``: drop a copied row block's pages from RSS."""
        self._file_for(name).release(self._stored_names[name], rows)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
