"""The one format table (edge_lora.core.formats) against llama.cpp's facts, and the file-name
convention every reader of an output directory shares."""

from __future__ import annotations

import gguf
import pytest

from edge_lora.core.errors import InputError
from edge_lora.core.formats import (BY_NAME, FORMATS, FULL_PRECISION, LADDER, LADDERS, UNRANKED, Ladder, format_named,
                                    format_of_file, format_of_file_type, parse_quant_list, quality_rank,
                                    split_file_name)

# REFERENCE.md: llama_ftype values (include/llama.h) and the bits per weight llama.cpp's quantize
# README reports for Llama-3.1-8B, in the order `--quant all` writes them (DESIGN.md: every K-quant and Q8_0).
LADDER_FACTS = [("Q2_K", 10, 3.16), ("Q3_K_S", 11, 3.64), ("Q3_K_M", 12, 4.00), ("Q3_K_L", 13, 4.30),
                ("Q4_K_S", 14, 4.67), ("Q4_K_M", 15, 4.89), ("Q5_K_S", 16, 5.57), ("Q5_K_M", 17, 5.70),
                ("Q6_K", 18, 6.56), ("Q8_0", 7, 8.50)]
IQ_FORMATS = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL")


def test_each_row_is_the_llama_cpp_file_type_of_its_name() -> None:
    for file_type, row in FORMATS.items():
        assert row.file_type is file_type
        expected = "ALL_F32" if row.name == "F32" else f"MOSTLY_{row.name}"
        assert gguf.LlamaFileType[expected] is file_type, row


def test_the_ladder_is_every_k_quant_and_q8_0_smallest_first() -> None:
    assert [(f.name, int(f.file_type), f.bits_per_weight) for f in LADDER] == LADDER_FACTS
    assert all(f.quantizable and not f.full_precision and not f.needs_imatrix for f in LADDER)


def test_iq_formats_are_one_row_each_the_iq_ladder_smallest_first() -> None:
    for name in IQ_FORMATS:
        row = BY_NAME[name]
        assert row.file_type is gguf.LlamaFileType[f"MOSTLY_{name}"]
        assert row.ladder is Ladder.IQ and row.quantizable and 2.0 < row.bits_per_weight < 5.0
    assert [f.name for f in LADDERS[Ladder.IQ]] == list(IQ_FORMATS) and LADDERS[Ladder.K] == LADDER
    # llama.cpp's tensor_requires_imatrix: IQ2_XXS / IQ2_XS / IQ2_S / IQ3_XXS tensors (REFERENCE.md)
    assert {f.name for f in FORMATS.values() if f.needs_imatrix} == {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}


def test_ranks_follow_quality() -> None:
    ranked = sorted(FORMATS.values(), key=lambda f: f.rank)
    assert [f.rank for f in ranked] == list(range(len(FORMATS)))
    assert [f.name for f in FULL_PRECISION] == ["F32", "F16", "BF16"] and ranked[:3] == list(FULL_PRECISION)
    # within a family, fewer bits rank lower
    for family in (LADDER, [BY_NAME[n] for n in IQ_FORMATS]):
        by_rank = sorted(family, key=lambda f: f.rank)
        bits = [f.bits_per_weight for f in by_rank]
        assert bits == sorted(bits, reverse=True), [f.name for f in by_rank]
    assert quality_rank("q4_k_m") == BY_NAME["Q4_K_M"].rank < quality_rank("Q2_K") < quality_rank("weird") == UNRANKED


@pytest.mark.parametrize(("file_name", "stem", "fmt"), [
    ("gemma-3-270m-Q4_K_M.gguf", "gemma-3-270m", "Q4_K_M"),
    ("gemma-3-270m-q4_k_m.gguf", "gemma-3-270m", "Q4_K_M"),  # the PyPI package's own name
    ("base-legal-BF16.gguf", "base-legal", "BF16"),  # not F16
    ("base-F16.gguf", "base", "F16"),
    ("llama-2-7b.Q8_0.gguf", "llama-2-7b", "Q8_0"),
    ("m-IQ2_XXS.gguf", "m", "IQ2_XXS"),  # not IQ2_XS
    ("m-IQ2_XS.gguf", "m", "IQ2_XS"),
    ("modelF16.gguf", "modelF16", None),  # no separator: not a format suffix
    ("model.gguf", "model", None),
    ("adapter-legal.gguf", "adapter-legal", None),
])
def test_split_file_name(file_name: str, stem: str, fmt: str | None) -> None:
    got_stem, got = split_file_name(file_name)
    assert (got_stem, got.name if got else None) == (stem, fmt)
    if got is not None and file_name[len(stem)] == "-":  # the name convention edge-lora writes
        assert got.file_name(stem).lower() == file_name.lower()


def test_format_of_file_falls_back_to_the_header_file_type() -> None:
    assert format_of_file("x/gemma-Q6_K.gguf", file_type=15) is BY_NAME["Q6_K"]  # the name wins
    assert format_of_file("x/model.gguf", file_type=15) is BY_NAME["Q4_K_M"]
    assert format_of_file("x/model.gguf", file_type=None) is None
    assert format_of_file_type(999) is None and format_of_file_type(32) is BY_NAME["BF16"]
    assert format_named(" bf16 ") is BY_NAME["BF16"] and format_named("Q4_X") is None


def test_parse_quant_list() -> None:
    assert parse_quant_list("all") == [name for name, _, _ in LADDER_FACTS]
    assert parse_quant_list("none") == [] and parse_quant_list("") == []
    assert parse_quant_list("q8_0, Q4_K_M,Q8_0") == ["Q8_0", "Q4_K_M"]
    assert parse_quant_list(["q6_k"]) == ["Q6_K"]
    # `all` stays the K-quant ladder; `iq` is the IQ one; both at once, de-duplicated
    assert parse_quant_list("iq") == list(IQ_FORMATS)
    assert parse_quant_list("all,IQ") == [name for name, _, _ in LADDER_FACTS] + list(IQ_FORMATS)
    assert parse_quant_list("q4_k_m, iq4_xs,IQ4_XS,all") == ["Q4_K_M", "IQ4_XS"] + [
        name for name, _, _ in LADDER_FACTS if name != "Q4_K_M"]
    for bad in ("Q4_K_M,Q4_X", "F16", "Q4_0"):  # unknown, a source format, legacy (read, not written)
        with pytest.raises(InputError) as caught:
            parse_quant_list(bad)
        assert bad.split(",")[-1] in caught.value.message
        assert all(name in caught.value.one_line() for name, _, _ in LADDER_FACTS)
        assert all(name in caught.value.one_line() for name in IQ_FORMATS) and "iq" in caught.value.fix
