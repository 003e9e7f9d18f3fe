"""How often conversion opens its inputs: every open of a checkpoint or an adapter parses (and
validates) a header that can be up to 100 MB, so each is opened once however many files are
written from it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import edge_lora.converters.checkpoint
import edge_lora.converters.peft
from edge_lora.converters.checkpoint import HFCheckpoint
from edge_lora.converters.peft import PeftAdapter
from edge_lora.workflows.convert_model import convert_model
from edge_lora.converters.safetensors_io import SafetensorsFile
from tests.support.model_fixtures import make_checkpoint, make_peft_adapter


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """File name -> how many times a SafetensorsFile, an HFCheckpoint or a PeftAdapter was opened."""
    counts: Counter[str] = Counter()

    class CountingSafetensorsFile(SafetensorsFile):
        def __init__(self, path: Path | str) -> None:
            counts[Path(path).name] += 1
            super().__init__(path)

    for module in (edge_lora.converters.checkpoint, edge_lora.converters.peft):
        monkeypatch.setattr(module, "SafetensorsFile", CountingSafetensorsFile)
    for cls in (HFCheckpoint, PeftAdapter):
        original = cls.open.__func__  # type: ignore[attr-defined]

        def counting_open(klass: type, path: Path | str, _original=original, _name=cls.__name__):  # type: ignore[no-untyped-def]
            counts[_name] += 1
            return _original(klass, path)

        monkeypatch.setattr(cls, "open", classmethod(counting_open))
    return counts


def test_single_file_checkpoint_header_is_parsed_once(opened: Counter[str], tmp_path: Path) -> None:
    ckpt_dir = make_checkpoint("llama", tmp_path / "llama")
    with HFCheckpoint.open(ckpt_dir) as ckpt:
        ckpt.read("model.norm.weight")
    assert opened["model.safetensors"] == 1


def test_convert_with_adapter_opens_base_and_adapter_once(opened: Counter[str], tmp_path: Path) -> None:
    ckpt_dir = make_checkpoint("llama", tmp_path / "base")
    adapter_dir = make_peft_adapter(ckpt_dir, tmp_path / "ad")
    opened.clear()
    manifest = convert_model(ckpt_dir, tmp_path / "out", adapter=adapter_dir, quants="none")
    assert {f.kind for f in manifest.files} == {"merged", "adapter"}  # both files written from one open
    assert opened == {"HFCheckpoint": 1, "PeftAdapter": 1, "model.safetensors": 1,
                      "adapter_model.safetensors": 1}


def test_values_beyond_the_f16_range_encode_to_inf_without_a_numpy_warning() -> None:
    """The caller refuses non-finite rows with one line; a RuntimeWarning printed before that
    line made the refusal two lines (found by bench/fuzz.py)."""
    import warnings

    import numpy as np

    from edge_lora.converters.gguf_output import GGMLType, encode_rows

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoded = encode_rows(np.array([[1.0, 1e30]], dtype=np.float32), GGMLType.F16)
    assert encoded[0, 0] == 1.0 and np.isinf(encoded[0, 1])
