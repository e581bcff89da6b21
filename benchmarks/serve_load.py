"""Load on loopback: N concurrent clients x M completion requests against `dynamoe serve`, batched vs one at a time.

Starts the server twice as a subprocess (`--max-batch-size 32`, then `--max-batch-size 1`), runs the
same requests against each (every request seeded, so both servers generate the same tokens), and
prints failures, throughput and latency percentiles. A measurement script, not a test:

    .venv/bin/python benchmarks/serve_load.py runs/demo/quick/dynamic --clients 32 --requests 20
"""

from __future__ import annotations

import argparse
import os
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


@dataclass
class LoadResult:
    """What one server did under the load."""

    label: str
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    wall_s: float = 0.0
    mean_batch_rows: float = 0.0

    def summary(self) -> str:
        done = len(self.latencies)
        p95 = statistics.quantiles(self.latencies, n=20)[-1] if done >= 2 else float("nan")
        return (f"{self.label:<28} {done:>4} ok {len(self.failures):>4} failed  {self.wall_s:7.1f} s  "
                f"{done / self.wall_s:6.2f} req/s  {self.completion_tokens / self.wall_s:7.1f} tok/s  "
                f"latency p50 {statistics.median(self.latencies):6.2f} s  p95 {p95:6.2f} s  "
                f"mean batch {self.mean_batch_rows:5.1f} rows")


def start_server(checkpoint: Path, port: int, max_batch_size: int, threads: int | None,
                 batch_window_ms: float) -> subprocess.Popen:
    """`dynamoe serve` in a subprocess, returned once /health answers."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    command = [sys.executable, "-m", "dynamoe", "serve", str(checkpoint), "--port", str(port), "--model-name", "bench",
               "--max-batch-size", str(max_batch_size), "--max-queue", "1024", "--timeout", "3600",
               "--batch-window-ms", str(batch_window_ms)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read() if process.stderr else ''}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return process
        except requests.ConnectionError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start within 120 s")


def client_loop(base: str, client: int, n_requests: int, max_tokens: int, result: LoadResult, lock: threading.Lock) -> None:
    """One client: n_requests completions in a row, each seeded by (client, request)."""
    session = requests.Session()
    for i in range(n_requests):
        body = {"model": "bench", "prompt": PROMPTS[(client + i) % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0.8, "seed": client * 1000 + i}
        started = time.perf_counter()
        try:
            response = session.post(f"{base}/v1/completions", json=body, timeout=600)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            tokens = response.json()["usage"]["completion_tokens"]
        except Exception as error:  # every failure is counted and shown, none stops the load
            with lock:
                result.failures.append(f"client {client} request {i}: {error}")
            continue
        with lock:
            result.latencies.append(elapsed)
            result.completion_tokens += tokens


def mean_batch_rows(base: str) -> float:
    """Rows per batch the server ran, from its /metrics histogram."""
    page = requests.get(f"{base}/metrics", timeout=10).text
    total = float(re.search(r"^dynamoe_batch_rows_sum (\S+)$", page, re.M).group(1))
    count = float(re.search(r"^dynamoe_batch_rows_count (\S+)$", page, re.M).group(1))
    return total / count if count else 0.0


def run_load(checkpoint: Path, port: int, max_batch_size: int, clients: int, n_requests: int, max_tokens: int,
             threads: int | None, batch_window_ms: float) -> LoadResult:
    """Start a server, warm it up, run the load, stop it."""
    label = f"max batch {max_batch_size}" + (" (batched)" if max_batch_size > 1 else " (one at a time)")
    process = start_server(checkpoint, port, max_batch_size, threads, batch_window_ms)
    base = f"http://127.0.0.1:{port}"
    try:
        requests.post(f"{base}/v1/completions", json={"prompt": "warm up", "max_tokens": 4}, timeout=120)
        result, lock = LoadResult(label), threading.Lock()
        workers = [threading.Thread(target=client_loop, args=(base, c, n_requests, max_tokens, result, lock))
                   for c in range(clients)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        result.wall_s = time.perf_counter() - started
        result.mean_batch_rows = mean_batch_rows(base)
        return result
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="max batch size of the batched server")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--batch-window-ms", type=float, default=5.0, help="the batched server's --batch-window-ms")
    parser.add_argument("--skip-unbatched", action="store_true", help="only run the batched server")
    args = parser.parse_args()

    print(f"{args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}, checkpoint {args.checkpoint}")
    results = [run_load(args.checkpoint, args.port, args.batch_size, args.clients, args.requests, args.max_tokens,
                        args.threads, args.batch_window_ms)]
    print(results[-1].summary(), flush=True)
    if not args.skip_unbatched:
        results.append(run_load(args.checkpoint, args.port + 1, 1, args.clients, args.requests, args.max_tokens,
                                args.threads, 0.0))
        print(results[-1].summary(), flush=True)
        batched, single = results
        print(f"throughput ratio (batched / one at a time): {batched.completion_tokens / batched.wall_s / (single.completion_tokens / single.wall_s):.2f}x tokens/s, "
              f"{len(batched.latencies) / batched.wall_s / (len(single.latencies) / single.wall_s):.2f}x requests/s")
    for result in results:
        for failure in result.failures[:5]:
            print(f"  {result.label}: {failure}")


if __name__ == "__main__":
    main()
