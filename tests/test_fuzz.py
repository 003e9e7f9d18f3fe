"""A short seeded run of bench/fuzz.py's corpus (issue 12 §5): 40 mutated inputs through convert,
adapter convert, adapters add, fit, ppl and run, each a subprocess of the real CLI — no traceback,
no death by a signal, none over 10 CPU seconds, every refusal one `edge-lora: error:` line with
exit 2. The unmutated seeds are accepted by every command (so refusals mean something)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fuzz import FAILURES, Summary, build_seeds, classify, controls, generate_cases, run_case

SEED = 12
CASES = 40


@pytest.fixture(scope="module")
def fuzz_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_classification() -> None:
    assert classify(0, "edge-lora: WARNING: x\n") == "accepted"
    assert classify(2, "edge-lora: error: bad — fix\n") == "refused"
    assert classify(2, "edge-lora: WARNING: w\nedge-lora: error: bad\n") == "bad-refusal"
    assert classify(1, "edge-lora: error: bug\n") == "bad-refusal"
    assert classify(2, 'Traceback (most recent call last):\n  File "x"\nValueError: x\n') == "traceback"
    assert classify(-11, "") == "signal"
    assert classify(None, "") == "timeout"
    assert classify(0, "", over_time=True) == "timeout"


def test_the_corpus_is_reproducible_and_covers_every_command(fuzz_work: Path) -> None:
    seeds = build_seeds(fuzz_work)
    first = generate_cases(seeds, fuzz_work / "a", 30, SEED)
    second = generate_cases(seeds, fuzz_work / "b", 30, SEED)
    assert [(c.command, c.mutated, c.mutation) for c in first] == [(c.command, c.mutated, c.mutation) for c in second]
    assert {c.command for c in first} == {"convert", "adapter convert", "adapters add", "fit", "ppl", "run"}
    assert all(c.directory.is_dir() and any(c.directory.iterdir()) for c in first)  # one file per case on disk
    assert len({c.mutation for c in first}) > 10  # the mutations vary


@pytest.mark.slow
def test_seeded_fuzz_finds_no_traceback_crash_overrun_or_bad_refusal(fuzz_work: Path) -> None:
    seeds = build_seeds(fuzz_work)
    cache = fuzz_work / "cache"
    baseline = [run_case(c, timeout=30, cache=cache, wall_limit=300) for c in controls(seeds, fuzz_work)]
    assert all(o.verdict == "accepted" for o in baseline), [(o.case.command, o.stderr[-500:]) for o in baseline
                                                            if o.verdict != "accepted"]
    cases = generate_cases(seeds, fuzz_work / "corpus", CASES, SEED)
    summary = Summary([run_case(c, timeout=10, cache=cache, wall_limit=120) for c in cases])
    print("\n" + summary.table())
    failures = [(o.case.index, o.case.command, o.case.mutated, o.case.mutation, o.verdict, o.stderr[-400:])
                for o in summary.outcomes if o.verdict in FAILURES]
    assert not failures, failures
    assert summary.count("refused") >= CASES // 4  # the mutations do reach the checks
