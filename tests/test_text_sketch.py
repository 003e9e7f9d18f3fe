"""The calibration-text sketch ``ppl`` warns from: its estimate against the exact streamed count on
real licence texts (which share boilerplate in known amounts), bottom-k past its capacity, the
encoding round trip, and untrusted encodings refused."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from edge_lora.core.text_sketch import CAPACITY, TextSketch
from edge_lora.analysis.imatrix import text_overlap
from tests.support.paths import LICENSES

# Texts of 2,400+ words: over 60 sampled 13-grams each, enough for a +-0.15 estimate.
TEXTS = ["GPL-2", "GPL-3", "LGPL-2.1", "Apache-2.0", "MPL-2.0", "MPL-1.1", "GFDL-1.2", "GFDL-1.3"]


def _sketch(name: str) -> TextSketch:
    return TextSketch.of_blocks([(LICENSES / name).read_text()])


@pytest.mark.parametrize("calibration,evaluation", list(itertools.permutations(TEXTS, 2)))
def test_estimate_follows_the_exact_overlap(calibration: str, evaluation: str) -> None:
    text = (LICENSES / evaluation).read_text()
    exact = text_overlap(LICENSES / calibration, text).fraction
    estimate = _sketch(calibration).overlap_of(text)
    assert estimate.total >= 40
    assert abs(estimate.fraction - exact) <= 0.15, (exact, estimate)


def test_the_same_text_overlaps_fully_and_blocks_do_not_matter() -> None:
    text = (LICENSES / "GPL-3").read_text()
    whole = _sketch("GPL-3")
    assert whole.overlap_of(text).fraction == 1.0
    # Blocks cut between words give the same sketch (n-grams spanning a cut are kept).
    cuts = [i for i in range(0, len(text), 997) if text[i] == " "] + [len(text)]
    pieces = [text[a:b] for a, b in zip([0, *cuts], cuts)]
    assert TextSketch.of_blocks(pieces) == whole
    # A short excerpt is still recognised; an unrelated text is not.
    assert whole.overlap_of(text[10000:20000]).fraction == 1.0
    assert whole.overlap_of((LICENSES / "Apache-2.0").read_text()).fraction < 0.05


def test_past_capacity_it_keeps_the_smallest_hashes_and_still_spots_a_passage(tmp_path: Path) -> None:
    names = ["GPL-2", "GPL-3", "LGPL-2.1", "Apache-2.0", "MPL-2.0", "MPL-1.1", "GFDL-1.3", "Artistic", "CC0-1.0"]
    # Distinct words per copy, so the n-grams do not repeat: ~90k words, far past the capacity.
    big = "\n\n".join(f"copy{i} " + (LICENSES / n).read_text().replace(" the ", f" the{i} ")
                      for i in range(3) for n in names)
    sketch = TextSketch.of_blocks([big])
    assert len(sketch.hashes) == CAPACITY and sketch.bound < 0xFFFFFFFF
    assert max(sketch.hashes) == sketch.bound
    passage = big[len(big) // 3:len(big) // 3 + 60000]
    seen = sketch.overlap_of(passage)
    assert seen.total >= 5 and seen.fraction == 1.0
    assert sketch.overlap_of((LICENSES / "BSD").read_text() * 3).shared == 0


def test_encoding_round_trips_and_garbage_decodes_to_none() -> None:
    sketch = _sketch("LGPL-2.1")
    encoded = sketch.encode()
    assert encoded.startswith("ngram-sketch-v1:") and len(encoded) < 4 * CAPACITY * 4 // 3 + 64
    assert TextSketch.decode(encoded) == sketch
    capped = TextSketch(frozenset({64, 128}), bound=200)
    assert TextSketch.decode(capped.encode()) == capped
    for bad in [None, 3, "", "ngram-sketch-v2:1:AAAA", "ngram-sketch-v1:x:AAAA", "ngram-sketch-v1:1:AAA",
                "ngram-sketch-v1:1:!!!!", "ngram-sketch-v1:-1:AAAA", "ngram-sketch-v1:99999999999:AAAA",
                "ngram-sketch-v1:1:" + "A" * 9000]:
        assert TextSketch.decode(bad) is None, bad
