"""A small fingerprint of a text's word n-grams, to tell later whether another text overlaps it.

An importance matrix is tuned to its calibration text; PPL/KLD measured on that same text
overstate a calibrated format. ``edge-lora imatrix`` refuses a calibration text that overlaps
the evaluation text it knows of, but ``ppl --text`` can be given any text long after the matrix
was computed, when the calibration text is gone. So the matrix (and the manifest row of every
file quantized with it) carries a sketch: the hashes of the calibration text's distinct
lower-cased word 13-grams, sampled by hash value (one in ``SAMPLE``), so the same n-gram is
sampled in both texts. At most ``CAPACITY`` hashes are kept, the smallest ones (a bottom-k
sample); the evaluation side then only looks at hashes up to the largest one kept.

Exact for calibration texts up to about SAMPLE x CAPACITY distinct n-grams (~16k words, the
shipped text has ~10k); beyond that an estimate. 32-bit hashes: a false match is about one in
ten million per sampled n-gram pair checked.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

NGRAM = 13  # words: a shared 13-word run is a shared passage, not a common phrase
SAMPLE = 32  # keep the n-grams whose hash is a multiple of this
CAPACITY = 512  # hashes kept at most: ~2.7 KB in base64
_ALL = 0xFFFFFFFF
_WORD = re.compile(r"\w+")
_PREFIX = "ngram-sketch-v1"


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int = NGRAM) -> Iterator[tuple[str, ...]]:
    for i in range(len(tokens) - n + 1):
        yield tuple(tokens[i:i + n])


def ngram_hash(gram: tuple[str, ...]) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(gram).encode(), digest_size=4).digest(), "little")


def stream_ngrams(blocks: Iterable[str], n: int = NGRAM) -> Iterator[tuple[str, ...]]:
    """The word n-grams of a text given in blocks, including those spanning a block boundary."""
    tail: list[str] = []
    for block in blocks:
        tokens = tail + words(block)
        yield from ngrams(tokens, n)
        tail = tokens[-(n - 1):] if n > 1 else []


@dataclass(frozen=True)
class Overlap:
    shared: int  # n-grams of the evaluation text also in the other text (sampled, for a sketch)
    total: int  # distinct n-grams of the evaluation text looked at

    @property
    def fraction(self) -> float:
        return self.shared / self.total if self.total else 0.0


@dataclass(frozen=True)
class TextSketch:
    hashes: frozenset[int]
    bound: int = _ALL  # the largest hash that could have been kept

    @classmethod
    def of_blocks(cls, blocks: Iterable[str]) -> TextSketch:
        sampled = {h for h in map(ngram_hash, stream_ngrams(blocks)) if h % SAMPLE == 0}
        if len(sampled) <= CAPACITY:
            return cls(frozenset(sampled))
        kept = sorted(sampled)[:CAPACITY]
        return cls(frozenset(kept), bound=kept[-1])

    def overlap_of(self, text: str) -> Overlap:
        """How many of ``text``'s sampled distinct n-grams the sketched text holds. ``total`` is 0
        when the text is too short for any n-gram to be sampled: then nothing can be said."""
        looked = {h for h in map(ngram_hash, ngrams(words(text))) if h % SAMPLE == 0 and h <= self.bound}
        return Overlap(len(looked & self.hashes), len(looked))

    def encode(self) -> str:
        """``ngram-sketch-v1:<bound>:<base64 of sorted little-endian uint32>``."""
        data = np.array(sorted(self.hashes), dtype="<u4").tobytes()
        return f"{_PREFIX}:{self.bound}:{base64.b64encode(data).decode()}"

    @classmethod
    def decode(cls, encoded: object) -> TextSketch | None:
        """The sketch ``encode`` wrote; None for anything else (the field is untrusted and only
        feeds a warning)."""
        if not isinstance(encoded, str) or len(encoded) > 8 * CAPACITY:
            return None
        prefix, _, rest = encoded.partition(":")
        bound, _, payload = rest.partition(":")
        try:
            data = base64.b64decode(payload, validate=True)
            bound_value = int(bound)
        except ValueError:
            return None
        if prefix != _PREFIX or len(data) % 4 or not 0 <= bound_value <= _ALL:
            return None
        return cls(frozenset(int(h) for h in np.frombuffer(data, dtype="<u4")), bound=bound_value)
