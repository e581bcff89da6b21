"""Load on loopback: N concurrent streaming clients x M completions, each client at its own compute dial, against
`dynamoe serve` (continuous batching) in a fresh server subprocess.

Every client keeps one dial (a routing threshold drawn from --dials) and every request is seeded, so a
run is repeatable: the same tokens for the same checkpoint and seed. Requests stream, with each token's chunk (`dynamoe.token_experts`), so that the client sees
every token arrive. Meanwhile a probe client sends --probes short requests at random moments: the
time to its first token, against one engine step (the server's own step time, from /metrics) plus its
prefill alone (its first-token time on the idle server before the load), says whether a request that
arrives mid-batch starts streaming at the next step. The server has a slot for the probe (--batch-size
defaults to clients + 1). A measurement script, not a test:

    .venv/bin/python benchmarks/serve_load.py runs/demo/quick/dynamic --clients 32 --requests 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

PROMPTS = [
    "To be, or not to be, that is the question:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Q: What is 127 + 385? A:",
    "KING HENRY. Once more unto the breach, dear friends, once more;",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "Q: Solve for x: 3x + 7 = 22. A:",
    "Shall I compare thee to a summer's day?",
    "class Stack:\n    def __init__(self):\n",
]
PROBE_PROMPT = "Q: What is 2 + 2? A:"


@dataclass
class Streamed:
    """One streamed completion as the client saw it."""

    first_token_s: float  # from sending the request to the first token's chunk
    token_gaps_s: list[float]  # between consecutive tokens' chunks
    tokens: int
    total_s: float


@dataclass
class LoadResult:
    """What the server did under the load."""

    done: list[Streamed] = field(default_factory=list)
    probes: list[Streamed] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)  # HTTP status -> count
    wall_s: float = 0.0
    mean_batch_rows: float = 0.0
    step_p95_s: float = 0.0
    idle_probe_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.done) / self.wall_s


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def start_server(checkpoint: Path, port: int, batch_size: int, threads: int | None) -> subprocess.Popen:
    """`dynamoe serve` in a subprocess, returned once /health answers."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    command = [sys.executable, "-m", "dynamoe", "serve", str(checkpoint), "--port", str(port), "--model-name", "bench",
               "--max-batch-size", str(batch_size), "--max-queue", "1024", "--timeout", "3600"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read() if process.stderr else ''}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return process
        except requests.ConnectionError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start within 180 s")


def stream_completion(session: requests.Session, base: str, body: dict) -> tuple[int, Streamed | str]:
    """Send one streamed completion; its HTTP status and what the client saw (or the error text)."""
    body = {**body, "model": "bench", "stream": True, "dynamoe": {**body.get("dynamoe", {}), "token_experts": True}}
    started = time.perf_counter()
    with session.post(f"{base}/v1/completions", json=body, stream=True, timeout=3600) as response:
        if response.status_code != 200:
            return response.status_code, response.text[:200]
        arrivals = []
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 500, chunk["error"]["message"]
            if any(choice["finish_reason"] is None for choice in chunk["choices"]):
                arrivals.append(time.perf_counter())
    if not arrivals:
        return 200, "no token arrived"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return 200, Streamed(arrivals[0] - started, gaps, len(arrivals), arrivals[-1] - started)


def record(result: LoadResult, lock: threading.Lock, where: list[Streamed], label: str, outcome: tuple[int, Streamed | str]) -> None:
    status, seen = outcome
    with lock:
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if isinstance(seen, Streamed):
            where.append(seen)
        else:
            result.failures.append(f"{label}: HTTP {status}: {seen}")


def client_loop(base: str, client: int, dial: float | None, n_requests: int, max_tokens: int, result: LoadResult,
                lock: threading.Lock) -> None:
    """One client: n_requests streamed completions in a row at its dial, each seeded by (client, request)."""
    session = requests.Session()
    for i in range(n_requests):
        body = {"prompt": PROMPTS[(client + i) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8,
                "seed": client * 1000 + i, "dynamoe": {} if dial is None else {"threshold": dial}}
        try:
            outcome = stream_completion(session, base, body)
        except Exception as error:  # every failure is counted and shown, none stops the load
            outcome = (0, f"{type(error).__name__}: {error}")
        record(result, lock, result.done, f"client {client} request {i}", outcome)


def probe_loop(base: str, n_probes: int, stop: threading.Event, result: LoadResult, lock: threading.Lock, seed: int) -> None:
    """Short greedy requests at random moments while the load runs."""
    session, rng = requests.Session(), random.Random(seed)
    for i in range(n_probes):
        if stop.wait(rng.uniform(0.5, 2.0)):
            return
        outcome = stream_completion(session, base, {"prompt": PROBE_PROMPT, "max_tokens": 4, "temperature": 0})
        record(result, lock, result.probes, f"probe {i}", outcome)


def histogram_mean(page: str, name: str) -> float:
    total = float(re.search(rf"^{name}_sum (\S+)$", page, re.M).group(1))
    count = float(re.search(rf"^{name}_count (\S+)$", page, re.M).group(1))
    return total / count if count else 0.0


def histogram_percentile(page: str, name: str, q: float) -> float:
    """The upper bound of the bucket holding the q-th percentile of a Prometheus histogram."""
    buckets = [(float(bound), float(count)) for bound, count in
               re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', page, re.M)]
    total = buckets[-1][1]
    return next(bound for bound, count in buckets if count >= total * q / 100)


def run_load(args: argparse.Namespace, dials: list[float | None]) -> LoadResult:
    """Start a server, measure the idle probe, run the load with the probe beside it, stop the server."""
    process = start_server(args.checkpoint, args.port, args.batch_size or args.clients + 1, args.threads)
    base = f"http://127.0.0.1:{args.port}"
    result, lock = LoadResult(), threading.Lock()
    try:
        session = requests.Session()
        stream_completion(session, base, {"prompt": "warm up", "max_tokens": 4})
        idle = [stream_completion(session, base, {"prompt": PROBE_PROMPT, "max_tokens": 4, "temperature": 0})[1]
                for _ in range(3)]
        result.idle_probe_s = statistics.median(s.first_token_s for s in idle if isinstance(s, Streamed))
        workers = [threading.Thread(target=client_loop, args=(base, c, dials[c], args.requests, args.max_tokens, result, lock))
                   for c in range(args.clients)]
        stop = threading.Event()
        prober = threading.Thread(target=probe_loop, args=(base, args.probes, stop, result, lock, args.seed))
        started = time.perf_counter()
        for worker in (*workers, prober):
            worker.start()
        for worker in workers:
            worker.join()
        result.wall_s = time.perf_counter() - started
        stop.set()
        prober.join()
        page = requests.get(f"{base}/metrics", timeout=10).text
        result.mean_batch_rows = histogram_mean(page, "dynamoe_batch_rows")
        result.step_p95_s = histogram_percentile(page, "dynamoe_batch_seconds", 95)
        return result
    finally:
        process.terminate()
        process.wait(timeout=30)


def summary(result: LoadResult) -> str:
    """Failures, throughput, first-token and inter-token latency, the mid-batch probe."""
    ttft = [s.first_token_s for s in result.done]
    gaps = [gap for s in result.done for gap in s.token_gaps_s]
    probe = [s.first_token_s for s in result.probes]
    bound = result.step_p95_s + result.idle_probe_s
    within = sum(t <= bound for t in probe)
    ms = 1e3
    return "\n".join([
        f"{len(result.done)} ok, {len(result.failures)} failed, statuses {dict(sorted(result.statuses.items()))}, "
        f"wall {result.wall_s:.1f} s",
        f"  throughput       {result.tokens_per_s:8.1f} generated tok/s   {len(result.done) / result.wall_s:6.2f} req/s   "
        f"mean batch {result.mean_batch_rows:.1f} rows per decode step",
        f"  time to 1st tok  p50 {percentile(ttft, 50) * ms:7.0f} ms   p95 {percentile(ttft, 95) * ms:7.0f} ms",
        f"  inter-token      p50 {percentile(gaps, 50) * ms:7.1f} ms   p95 {percentile(gaps, 95) * ms:7.1f} ms",
        f"  mid-batch probe  1st token p50 {percentile(probe, 50) * ms:.0f} ms, max {max(probe, default=float('nan')) * ms:.0f} ms; "
        f"bound = engine step p95 ({result.step_p95_s * ms:.0f} ms, bucket bound) + its prefill alone "
        f"({result.idle_probe_s * ms:.0f} ms, idle server) = {bound * ms:.0f} ms: {within}/{len(probe)} within",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dials", type=float, nargs="+", default=[0.3, 0.5, 0.8],
                        help="routing thresholds the clients draw from (one per client); nothing for a model without a dial")
    parser.add_argument("--no-dial", action="store_true", help="every client as trained (a model without a dial)")
    parser.add_argument("--batch-size", type=int, default=None, help="--max-batch-size of the server (default: clients + 1)")
    parser.add_argument("--probes", type=int, default=10, help="mid-batch probe requests during the load")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    dials: list[float | None] = [None if args.no_dial else rng.choice(args.dials) for _ in range(args.clients)]
    mix = {dial: dials.count(dial) for dial in sorted(set(dials), key=str)}
    print(f"{args.clients} streaming clients x {args.requests} requests, max_tokens {args.max_tokens}, temperature 0.8, "
          f"dials per client {mix}; checkpoint {args.checkpoint}; {os.cpu_count()} CPUs", flush=True)
    result = run_load(args, dials)
    print(summary(result), flush=True)
    for failure in result.failures[:5]:
        print(f"  {failure}")


if __name__ == "__main__":
    main()
