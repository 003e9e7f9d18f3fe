"""The model file formats, one row per llama.cpp file type (``llama_ftype``, gguf-py's
``LlamaFileType``), and the file-name convention that carries them (``<stem>-<FORMAT>.gguf``).

Rows are listed best quality first: a row's ``rank`` is its position, so choosing "the best
format" (fit, run) and "the full-precision reference" (KLD) read the same order.

Bits per weight are llama.cpp's quantize README figures for Llama-3.1-8B (the whole file, with
the per-tensor mix each file type makes), used to predict output sizes; the legacy types it does
not list are given their block size. ``needs_imatrix``: llama.cpp's quantizer refuses the file
type without an importance matrix (``tensor_requires_imatrix`` in src/llama-quant.cpp: tensors
it makes IQ1_*, IQ2_XXS/XS/S or IQ3_XXS). ``ladder``: the ``--quant`` word that writes the row
(``all``: every K-quant and Q8_0; ``iq``: the IQ formats; ``all,iq`` asks for both).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from gguf import LlamaFileType

from edge_lora.core.errors import InputError


class Ladder(str, Enum):
    """A ``--quant`` word that names a whole family of formats."""

    K = "all"  # every K-quant and Q8_0: the default
    IQ = "iq"  # the importance-matrix-aware formats


@dataclass(frozen=True)
class Format:
    file_type: LlamaFileType
    name: str  # as in file names and --quant, upper case
    bits_per_weight: float
    full_precision: bool = False  # a conversion writes it; quantization starts from it
    needs_imatrix: bool = False
    ladder: Ladder | None = None  # the `--quant` word that writes it
    quantizable: bool = False  # accepted by `--quant`
    rank: int = 0  # 0 = best quality; set from the table's order

    def file_name(self, stem: str) -> str:
        """``gemma-3-270m`` -> ``gemma-3-270m-Q4_K_M.gguf`` (DESIGN.md output layout)."""
        return f"{stem}-{self.name}.gguf"


FT = LlamaFileType
_ROWS: tuple[Format, ...] = (
    # full precision: what convert writes; F16 and BF16 are equal quality, F16 runs faster on most CPUs
    Format(FT.ALL_F32, "F32", 32.0, full_precision=True),
    Format(FT.MOSTLY_F16, "F16", 16.0, full_precision=True),
    Format(FT.MOSTLY_BF16, "BF16", 16.0, full_precision=True),
    # the ladder `--quant all` writes: every K-quant and Q8_0
    Format(FT.MOSTLY_Q8_0, "Q8_0", 8.50, ladder=Ladder.K, quantizable=True),
    Format(FT.MOSTLY_Q6_K, "Q6_K", 6.56, ladder=Ladder.K, quantizable=True),
    Format(FT.MOSTLY_Q5_K_M, "Q5_K_M", 5.70, ladder=Ladder.K, quantizable=True),
    Format(FT.MOSTLY_Q5_K_S, "Q5_K_S", 5.57, ladder=Ladder.K, quantizable=True),
    Format(FT.MOSTLY_Q5_1, "Q5_1", 6.0),  # legacy: read, not written
    Format(FT.MOSTLY_Q5_0, "Q5_0", 5.5),  # legacy
    Format(FT.MOSTLY_Q4_K_M, "Q4_K_M", 4.89, ladder=Ladder.K, quantizable=True),
    Format(FT.MOSTLY_Q4_K_S, "Q4_K_S", 4.67, ladder=Ladder.K, quantizable=True),
    Format(FT.MOSTLY_Q4_1, "Q4_1", 5.0),  # legacy
    Format(FT.MOSTLY_Q4_0, "Q4_0", 4.5),  # legacy
    # non-linear 4-bit: no importance matrix needed. IQ formats whose 256-wide blocks do not fit a
    # row (Gemma 3 270M's 640) fall back to IQ4_NL for that tensor, as llama.cpp decides.
    Format(FT.MOSTLY_IQ4_NL, "IQ4_NL", 4.68, ladder=Ladder.IQ, quantizable=True),
    Format(FT.MOSTLY_IQ4_XS, "IQ4_XS", 4.46, ladder=Ladder.IQ, quantizable=True),
    Format(FT.MOSTLY_Q3_K_L, "Q3_K_L", 4.30, ladder=Ladder.K, quantizable=True),
    Format(FT.MOSTLY_Q3_K_M, "Q3_K_M", 4.00, ladder=Ladder.K, quantizable=True),
    Format(FT.MOSTLY_IQ3_S, "IQ3_S", 3.66, ladder=Ladder.IQ, quantizable=True),
    Format(FT.MOSTLY_Q3_K_S, "Q3_K_S", 3.64, ladder=Ladder.K, quantizable=True),
    Format(FT.MOSTLY_IQ3_XXS, "IQ3_XXS", 3.25, needs_imatrix=True, ladder=Ladder.IQ, quantizable=True),
    Format(FT.MOSTLY_Q2_K, "Q2_K", 3.16, ladder=Ladder.K, quantizable=True),
    Format(FT.MOSTLY_IQ2_S, "IQ2_S", 2.74, needs_imatrix=True, ladder=Ladder.IQ, quantizable=True),
    Format(FT.MOSTLY_IQ2_XS, "IQ2_XS", 2.59, needs_imatrix=True, ladder=Ladder.IQ, quantizable=True),
    Format(FT.MOSTLY_IQ2_XXS, "IQ2_XXS", 2.38, needs_imatrix=True, ladder=Ladder.IQ, quantizable=True),
)
del FT

# Keyed by file type, best quality first.
FORMATS: dict[LlamaFileType, Format] = {
    row.file_type: Format(**{**row.__dict__, "rank": rank}) for rank, row in enumerate(_ROWS)}
BY_NAME: dict[str, Format] = {f.name: f for f in FORMATS.values()}
# Longest first, so BF16 is tried before F16 and IQ2_XXS before IQ2_XS.
_NAMES_LONGEST_FIRST = sorted(BY_NAME, key=len, reverse=True)
# What may stand before the format in a file name: ``gemma-Q4_K_M``, ``llama.Q4_K_M``, ``x_Q8_0``.
_SEPARATORS = "-._"

# `--quant all` / `--quant iq`: smallest file first, the order llama.cpp lists them in.
LADDERS: dict[Ladder, tuple[Format, ...]] = {
    ladder: tuple(sorted((f for f in FORMATS.values() if f.ladder is ladder), key=lambda f: -f.rank))
    for ladder in Ladder}
LADDER: tuple[Format, ...] = LADDERS[Ladder.K]
QUANTIZABLE: tuple[Format, ...] = tuple(sorted((f for f in FORMATS.values() if f.quantizable), key=lambda f: -f.rank))
FULL_PRECISION: tuple[Format, ...] = tuple(f for f in FORMATS.values() if f.full_precision)
UNRANKED = len(FORMATS)  # the rank of a format the table does not know: after every known one


def format_named(name: str) -> Format | None:
    """The row for a format name, any case (``q4_k_m``, ``F16``)."""
    return BY_NAME.get(name.strip().upper())


def format_of_file_type(file_type: int | None) -> Format | None:
    """The row for a GGUF's ``general.file_type``; None when absent or unknown to the table."""
    if file_type is None:
        return None
    try:
        return FORMATS.get(LlamaFileType(file_type))
    except ValueError:
        return None


def split_file_name(path: Path | str) -> tuple[str, Format | None]:
    """``gemma-3-270m-Q4_K_M.gguf`` -> (``gemma-3-270m``, Q4_K_M); a name that does not end in a
    known format after a separator -> (its stem, None). Any case."""
    stem = Path(path).name.removesuffix(".gguf")
    upper = stem.upper()
    for name in _NAMES_LONGEST_FIRST:
        head = upper.removesuffix(name)
        if head != upper and head and head[-1] in _SEPARATORS:
            return stem[:len(head) - 1], BY_NAME[name]
        if head == "" and upper == name:
            return "", BY_NAME[name]
    return stem, None


def format_of_file(path: Path | str, file_type: int | None = None) -> Format | None:
    """A model file's format: from its name when the name says, else from its header's
    ``general.file_type`` (pass it when the header is at hand)."""
    return split_file_name(path)[1] or format_of_file_type(file_type)


def quality_rank(name: str) -> int:
    """0 for the best format; unknown names after every known one."""
    row = format_named(name)
    return row.rank if row is not None else UNRANKED


def parse_quant_list(spec: str | Iterable[str]) -> list[str]:
    """``all`` | ``iq`` | ``none`` | ``Q4_K_M,IQ4_XS`` | ``all,iq`` (case-insensitive) -> ordered,
    de-duplicated names of formats to quantize into."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if not items or [s.lower() for s in items] == ["none"]:
        return []
    ladders = {ladder.value: ladder for ladder in Ladder}
    names: list[str] = []
    for item in items:
        ladder = ladders.get(item.lower())
        for name in ([f.name for f in LADDERS[ladder]] if ladder is not None else [quant_format(item).name]):
            if name not in names:
                names.append(name)
    return names


def quant_format(name: str) -> Format:
    """The row of a format ``--quant`` accepts; InputError naming the accepted ones otherwise."""
    row = format_named(name)
    if row is None or not row.quantizable:
        raise InputError(f"unknown quantization type {name!r}",
                         fix=f"use all (K-quants), iq (IQ formats), none, or a comma list of "
                             f"{', '.join(f.name for f in QUANTIZABLE)}")
    return row
