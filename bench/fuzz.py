"""Fuzz the real CLI with a corpus generated from valid files (issue 12 §5): mutated safetensors
headers and bodies, GGUF headers and metadata (models and LoRA adapters), PEFT adapter configs
and tensors, tokenizer.json / tokenizer.model, config.json — each case one mutated file through
one command (`convert`, `adapter convert`, `adapters add`, `fit`, `ppl`, `run`) as a subprocess
of the real CLI with a time limit: --timeout CPU seconds (the command and its children; wall time
on a shared machine measures the neighbours), and a kill at --wall-limit seconds of wall time.

Required: 0 tracebacks, 0 deaths by a signal, 0 runs over the timeout, and every refusal exactly
one stderr line ``edge-lora: error: ...`` with exit code 2. The baseline in the same run: the
unmutated seeds through every command, each accepted.

Usage: python bench/fuzz.py [--cases 1000] [--seed 12] [--workers 2] [--timeout 10] [--wall-limit 60] [--work DIR]
Failures are written to WORK/failures.json (argv, mutation, stderr) for replay.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.support.fuzz import Summary, build_seeds, controls, generate_cases, run_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2, help="cases run at once (the machine has 2 cores)")
    parser.add_argument("--timeout", type=float, default=10.0, help="CPU seconds per case")
    parser.add_argument("--wall-limit", type=float, default=60.0, help="wall seconds before a case is killed")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edge-lora-fuzz")
    args = parser.parse_args()

    work = args.work
    cache = work / "cache"  # shared: the extra-buffer probe runs once, not per case
    seeds = build_seeds(work)
    corpus = work / f"corpus-seed{args.seed}"
    started = time.monotonic()
    cases = generate_cases(seeds, corpus, args.cases, args.seed)
    generated = time.monotonic() - started
    print(f"seed {args.seed}: {len(cases)} cases generated in {generated:.0f} s under {corpus}")

    baseline = [run_case(c, timeout=60, cache=cache) for c in controls(seeds, work)]
    print("baseline (unmutated seeds):")
    for o in baseline:
        print(f"  {o.case.command:<26} exit {o.returncode}  cpu {o.cpu_seconds:5.1f} s  wall {o.seconds:5.1f} s  "
              f"{o.verdict}")
    if any(o.verdict != "accepted" for o in baseline):
        print("a valid seed was not accepted; fix that first:", file=sys.stderr)
        for o in baseline:
            if o.verdict != "accepted":
                print(o.stderr[-1500:], file=sys.stderr)
        return 1

    outcomes = []
    started = time.monotonic()
    run = functools.partial(run_case, timeout=args.timeout, cache=cache, wall_limit=args.wall_limit)
    # Processes, not threads: each case's CPU time is its worker's children's usage.
    with multiprocessing.Pool(max(1, args.workers)) as pool:
        for i, outcome in enumerate(pool.imap_unordered(run, cases), 1):
            outcomes.append(outcome)
            if outcome.verdict in ("traceback", "signal", "timeout", "bad-refusal"):
                print(f"  FAIL #{outcome.case.index} {outcome.case.command} {outcome.case.mutated}: "
                      f"{outcome.case.mutation} -> {outcome.verdict} ({outcome.seconds:.1f} s)", flush=True)
            if i % 50 == 0:
                print(f"  {i}/{len(cases)} run, {time.monotonic() - started:.0f} s", flush=True)
    elapsed = time.monotonic() - started
    summary = Summary(sorted(outcomes, key=lambda o: o.case.index))
    (work / "failures.json").write_text(json.dumps([o.to_json() for o in summary.failures], indent=1))
    (work / f"outcomes-seed{args.seed}.json").write_text(json.dumps([o.to_json() for o in summary.outcomes]))

    print(f"\n{len(outcomes)} cases, seed {args.seed}, {args.workers} workers, limit {args.timeout:.0f} CPU s "
          f"(killed at {args.wall_limit:.0f} wall s), {elapsed / 60:.1f} min (measured under load: other jobs "
          f"share the 2 cores)\n")
    print(summary.table())
    print(f"\ntracebacks {summary.count('traceback')}, deaths by signal {summary.count('signal')}, "
          f"runs over {args.timeout:.0f} s {summary.count('timeout')}, "
          f"refusals not one line with exit 2 {summary.count('bad-refusal')}")
    print("refusals by what stopped them: " + ", ".join(f"{kind} {n}" for kind, n in
                                                       summary.refusals_by_kind().most_common()))
    over_wall = sum(1 for o in outcomes if o.seconds > args.timeout)
    print(f"(wall time over {args.timeout:.0f} s, for information: {over_wall} — the machine's load, not the case)")
    slowest = sorted(outcomes, key=lambda o: o.cpu_seconds)[-3:]
    print("most CPU: " + ", ".join(f"#{o.case.index} {o.case.command} {o.cpu_seconds:.1f} s" for o in slowest))
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
