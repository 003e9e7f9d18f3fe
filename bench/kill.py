"""kill -9 at random points of conversions and quantizations: nothing invalid at a final path,
no stale partial after the next run, no quantize child outliving its killed parent.

Each run is `edge-lora convert` (HF -> F16 GGUF, alternately without and with a PEFT adapter:
merged F16 + adapter GGUF + manifest + Modelfile + state) or `edge-lora quantize` (Q4_K_M then
Q8_0, one child process each), started in its own process and sent SIGKILL after a delay drawn
uniformly from [0, 1.1 x the uninterrupted run's time] (measured first, in this run). Then:

- invalid final files: every file at a final name (``*.gguf``, manifest.json, Modelfile,
  state.json) is checked — a GGUF must pass the header validator and be byte-identical to
  the uninterrupted run's, a manifest must load with every row matching its file's sha256, a
  Modelfile must name an existing file, state.json must be a JSON object. Must be 0.
- stale partials: the same command is run again to completion; partial files and staging
  directories left in the output directory afterwards. Must be 0.
- orphans: quantize children still alive 5 s after their parent was killed. Must be 0.

The baseline, in the same run with the same kill delays: the same code writing every file in
place at its final path (what a converter without temp files does) — its invalid-file count
shows what the atomic scheme prevents.

Usage: python bench/kill.py [--conversions 20] [--quantizations 20] [--seed N] [--work DIR]
                            [--no-baseline] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the repo root: edge_lora and tests.support

QUANTS = "Q4_K_M,Q8_0"

# Run as `python -c IN_PLACE -m edge_lora ...`: the same CLI, with every partial file being the
# final file itself, opened in place (the baseline).
IN_PLACE = r"""
import os, runpy, sys
from edge_lora.core import atomic

def in_place(final):
    final = atomic.Path(final)
    return final, os.open(final, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)

atomic.create_partial = in_place
sys.argv = ["edge_lora", *sys.argv[1:]]
runpy.run_module("edge_lora", run_name="__main__")
"""


@dataclass
class Phase:
    name: str
    runs: int = 0
    killed: int = 0  # runs the kill landed in (the others had finished first)
    kill_fractions: list[float] = field(default_factory=list)
    partials_after_kill: int = 0
    invalid_final_files: int = 0
    invalid_examples: list[str] = field(default_factory=list)
    stale_partials_after_next_run: int = 0
    next_run_failures: int = 0
    orphan_children: int = 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _partials(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.name.endswith(".partial") or ".partial-" in p.name]


def _final_files(out: Path, home: Path) -> list[Path]:
    files = [p for p in out.iterdir() if p.is_file() and not p.name.startswith(".")
             and not p.name.endswith(".partial")] if out.is_dir() else []
    state = home / "state.json"
    return files + ([state] if state.exists() else [])


def _invalid(path: Path, reference: dict[str, str]) -> str | None:
    """Why the file at a final path is not a valid, complete output (None when it is)."""
    from edge_lora.core.bounded_json import JsonKind, read_json_object
    from edge_lora.core.errors import EdgeLoraError
    from edge_lora.core.gguf_check import validate_gguf
    from edge_lora.core.manifest import Manifest

    try:
        if path.suffix == ".gguf":
            validate_gguf(path)
            if reference.get(path.name) != _sha256(path):
                return f"{path.name}: differs from the uninterrupted run's file"
        elif path.name == "manifest.json":
            manifest = Manifest.load(path.parent)
            for row in manifest.files:
                row_file = path.parent / row.path
                if not row_file.is_file() or _sha256(row_file) != row.sha256:
                    return f"manifest.json: row {row.path} does not match its file"
        elif path.name == "Modelfile" or path.name.startswith("Modelfile"):
            lines = [line for line in path.read_text().splitlines() if line.startswith("FROM ")]
            if not lines or not (path.parent / lines[0].split(maxsplit=1)[1]).is_file():
                return f"{path.name}: no FROM line naming an existing file"
        elif path.name == "state.json":
            read_json_object(path, JsonKind.STATE)
    except (EdgeLoraError, OSError, ValueError) as exc:
        return f"{path.name}: {exc}"
    return None


class Bench:
    def __init__(self, work: Path, seed: int) -> None:
        self.work = work
        self.rng = random.Random(seed)
        self.home = work / "home"
        self.env = dict(os.environ, EDGE_LORA_HOME=str(self.home), EDGE_LORA_CACHE=str(work / "cache"),
                        HF_HUB_OFFLINE="1")
        self.env.pop("PYTHONPATH", None)

    def command(self, args: list[str], in_place: bool) -> list[str]:
        if in_place:
            return [sys.executable, "-c", IN_PLACE, *args]
        return [sys.executable, "-m", "edge_lora", *args]

    def run(self, args: list[str], in_place: bool = False) -> float:
        started = time.perf_counter()
        done = subprocess.run(self.command(args, in_place), env=self.env, cwd=self.work, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()[-500:]}")
        return time.perf_counter() - started

    def kill_run(self, args: list[str], delay: float, in_place: bool) -> tuple[bool, int]:
        """Start the command, SIGKILL it after ``delay`` s: (killed before it finished,
        children still alive 5 s later)."""
        import psutil

        process = subprocess.Popen(self.command(args, in_place), env=self.env, cwd=self.work,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=delay)
            return False, 0
        except subprocess.TimeoutExpired:
            pass
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        gone, alive = psutil.wait_procs(children, timeout=5)
        for child in alive:  # an orphan: counted, then stopped so the bench can go on
            child.kill()
        return True, len(alive)


def _reference(bench: Bench, args: list[str], out: Path) -> tuple[float, dict[str, str]]:
    """An uninterrupted run: its time and the sha256 of every GGUF it wrote."""
    shutil.rmtree(out, ignore_errors=True)
    seconds = bench.run(args)
    return seconds, {p.name: _sha256(p) for p in out.glob("*.gguf")}


def _kill_phase(bench: Bench, phase: Phase, jobs: list[tuple[list[str], Path, float, dict[str, str]]],
                fractions: list[float], in_place: bool, prepare: Callable[[Path], None]) -> None:
    for (args, out, seconds, reference), fraction in zip(jobs, fractions):
        prepare(out)
        killed, orphans = bench.kill_run(args, fraction * seconds, in_place)
        phase.runs += 1
        phase.killed += killed
        phase.kill_fractions.append(round(fraction, 3))
        phase.orphan_children += orphans
        phase.partials_after_kill += len(_partials(out)) + len(_partials(bench.home))
        for path in _final_files(out, bench.home):
            why = _invalid(path, reference)
            if why is not None:
                phase.invalid_final_files += 1
                if len(phase.invalid_examples) < 3:
                    phase.invalid_examples.append(why)
        if in_place:
            continue  # the baseline is only measured for what a kill leaves at final paths
        try:
            bench.run(args)  # the next run, to completion
        except RuntimeError:
            phase.next_run_failures += 1
        phase.stale_partials_after_next_run += len(_partials(out)) + len(_partials(bench.home))
        for path in _final_files(out, bench.home):
            if _invalid(path, reference) is not None:
                phase.invalid_final_files += 1


def run_bench(work: Path, conversions: int, quantizations: int, seed: int, baseline: bool) -> dict:
    from tests.support.large_checkpoint import make_large_llama
    from tests.support.model_fixtures import make_peft_adapter

    bench = Bench(work, seed)
    # ~25M parameters (100 MB float32): a conversion or a quantization takes seconds,
    # so kills land in every stage (start-up, reading, writing, publishing, manifest).
    ckpt = make_large_llama(work / "base", vocab=16384, hidden=512, layers=2, ffn=1536)
    adapter = make_peft_adapter(ckpt, work / "adapter", r=8)
    convert_plain = ["convert", str(ckpt), "--out", str(work / "out-plain"), "--quant", "none"]
    convert_adapter = ["convert", str(ckpt), "--adapter", str(adapter), "--out", str(work / "out-adapter"),
                       "--quant", "none"]
    plain_s, plain_ref = _reference(bench, convert_plain, work / "out-plain")
    adapter_s, adapter_ref = _reference(bench, convert_adapter, work / "out-adapter")
    f16 = next((work / "out-plain").glob("*-F16.gguf"))
    source = work / "source" / f16.name
    source.parent.mkdir(exist_ok=True)
    shutil.copy2(f16, source)
    quantize = ["quantize", str(source), "--quant", QUANTS, "--out", str(work / "out-quant")]
    quant_s, quant_ref = _reference(bench, quantize, work / "out-quant")

    conversion_jobs = [(convert_plain, work / "out-plain", plain_s, plain_ref) if i % 2 == 0 else
                       (convert_adapter, work / "out-adapter", adapter_s, adapter_ref) for i in range(conversions)]
    quant_jobs = [(quantize, work / "out-quant", quant_s, quant_ref)] * quantizations
    conversion_fractions = [bench.rng.uniform(0.0, 1.1) for _ in conversion_jobs]
    quant_fractions = [bench.rng.uniform(0.0, 1.1) for _ in quant_jobs]

    keep = lambda out: None  # noqa: E731 - ours: each kill lands on what the runs before left
    phases = {"convert": Phase("convert (HF -> F16, with and without adapter)"),
              "quantize": Phase(f"quantize ({QUANTS})")}
    _kill_phase(bench, phases["convert"], conversion_jobs, conversion_fractions, False, keep)
    _kill_phase(bench, phases["quantize"], quant_jobs, quant_fractions, False, keep)
    if baseline:
        fresh = lambda out: shutil.rmtree(out, ignore_errors=True)  # noqa: E731
        phases["convert baseline"] = Phase("baseline: convert writing in place")
        phases["quantize baseline"] = Phase("baseline: quantize writing in place")
        _kill_phase(bench, phases["convert baseline"], conversion_jobs, conversion_fractions, True, fresh)
        _kill_phase(bench, phases["quantize baseline"], quant_jobs, quant_fractions, True, fresh)
    return {"seed": seed, "uninterrupted_seconds": {"convert": round(plain_s, 2), "convert_adapter": round(adapter_s, 2),
                                                    "quantize": round(quant_s, 2)},
            "phases": {key: asdict(p) for key, p in phases.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversions", type=int, default=20)
    parser.add_argument("--quantizations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="default: a random seed, printed")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    work = args.work or Path(tempfile.mkdtemp(prefix="edge-lora-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run_bench(work, args.conversions, args.quantizations, seed, not args.no_baseline)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"kill -9 bench, seed {seed} (rerun with --seed {seed}); uninterrupted: "
          + ", ".join(f"{k} {v} s" for k, v in report["uninterrupted_seconds"].items()))
    header = f"{'phase':46s} {'runs':>4s} {'killed':>6s} {'partials':>8s} {'invalid':>7s} {'stale':>5s} {'orphans':>7s}"
    print(header)
    for phase in report["phases"].values():
        stale = "-" if phase["name"].startswith("baseline") else str(phase["stale_partials_after_next_run"])
        print(f"{phase['name']:46s} {phase['runs']:4d} {phase['killed']:6d} {phase['partials_after_kill']:8d} "
              f"{phase['invalid_final_files']:7d} {stale:>5s} {phase['orphan_children']:7d}")
        for example in phase["invalid_examples"]:
            print(f"    e.g. {example}")
    print("partials: partial files the kill left; invalid: files at final paths failing validation "
          "(must be 0 for ours); stale: partials left after the next, complete run (must be 0); "
          "orphans: quantize children alive 5 s after their parent's SIGKILL (must be 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
