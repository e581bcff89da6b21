"""Hostile clients against `dynamoe serve`, each measured beside the ordinary request it competes with.

Starts the server as a subprocess and measures, on loopback:

- huge stop strings: a completion of 20 tokens with four stop strings of 240,000 characters (960 KB) against
  the same completion without stops (median of --repeats); then an ordinary request sent 50 ms after a hostile
  one, against one sent 50 ms after an ordinary one (a batch that has started runs to its end, so it waits either way);
- a 1 MB prompt (text, then token ids): the slowest /health answer (polled every 20 ms) while the server
  reads and tokenizes it, against idle;
- a slow body: how long a request declaring Content-Length: 100 and sending 2 bytes holds its connection;
- slow headers: how long a connection dripping one header byte every 0.1 s stays open.

Every wait is capped (--cap seconds): a figure at the cap means "at least". A measurement script, not a test:

    .venv/bin/python benchmarks/serve_abuse.py runs/demo/quick/dynamic
    .venv/bin/python benchmarks/serve_abuse.py          # a random `small` model and a freshly built tokenizer

The server runs whatever `dynamoe` the interpreter imports, so PYTHONPATH=OTHER/src measures another version.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from serve_load import start_server

STOP_CHARACTERS = 240_000
PROMPT = "To be, or not to be, that is the question:"


def random_checkpoint(folder: Path) -> Path:
    """A checkpoint of a random-weight `small` dynamic model with a tokenizer built from the built-in corpus."""
    from dynamoe.checkpoint import save_checkpoint
    from dynamoe.config import small
    from dynamoe.data import build_corpus
    from dynamoe.data.tokenizer import TOKENIZER_FILE
    from dynamoe.model import Transformer

    corpus = build_corpus(folder / "corpus", vocab_size=2048, bytes_per_domain=300_000, seed=0, progress=False)
    model = Transformer(small(router="dynamic", vocab_size=2048))
    return save_checkpoint(folder / "run", 1, model, {"step": 1, "optimizer": {}}, {}, corpus / TOKENIZER_FILE)


def seconds(base: str, payload: dict[str, Any], cap: float, path: str = "/v1/completions") -> tuple[float, str]:
    """How long a request takes (the cap if it takes longer) and how it ended."""
    started = time.perf_counter()
    try:
        status = str(requests.post(f"{base}{path}", json=payload, timeout=cap).status_code)
    except requests.Timeout:
        status = "timed out"
    return min(time.perf_counter() - started, cap), status


def in_background(function: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=function, args=args, daemon=True)
    thread.start()
    return thread


def stop_strings(base: str, cap: float, repeats: int) -> None:
    plain = {"model": "bench", "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    hostile = {**plain, "stop": [(word * STOP_CHARACTERS)[:STOP_CHARACTERS] for word in ("To be", " or", "not ", "e")]}
    plain_runs, hostile_runs = [], []
    for _ in range(repeats):  # interleaved, so that both see the same load on a shared machine
        plain_runs.append(seconds(base, plain, cap))
        hostile_runs.append(seconds(base, hostile, cap))
    alone, with_stops = (statistics.median(run[0] for run in runs) for runs in (plain_runs, hostile_runs))
    print(f"stops      without: {alone:.3f} s   four of {STOP_CHARACTERS:,} characters: {with_stops:.3f} s "
          f"({with_stops / alone:.2f}x; {', '.join(status for _, status in hostile_runs)})")
    beside: dict[str, list[tuple[float, str]]] = {"ordinary": [], "hostile": []}
    for _ in range(repeats):
        for label, first in (("ordinary", plain), ("hostile", hostile)):
            running = in_background(seconds, base, first, cap)
            time.sleep(0.05)  # the first request is on its way
            beside[label].append(seconds(base, plain, cap))
            running.join()
    ordinary, after_hostile = (statistics.median(run[0] for run in beside[label]) for label in ("ordinary", "hostile"))
    print(f"           an ordinary request sent 50 ms after an ordinary one: {ordinary:.3f} s; after a hostile one: "
          f"{after_hostile:.3f} s ({after_hostile - ordinary:+.3f} s; {', '.join(s for _, s in beside['hostile'])})")


def health_during_big_prompt(base: str, cap: float) -> None:
    def worst_health(until: threading.Event, worst: list[float]) -> None:
        while not until.is_set():
            started = time.perf_counter()
            requests.get(f"{base}/health", timeout=cap)
            worst.append(time.perf_counter() - started)
            time.sleep(0.02)

    text = {"model": "bench", "prompt": (PROMPT + " ") * (990_000 // (len(PROMPT) + 1)), "max_tokens": 1}
    ids = {"model": "bench", "prompt": [i % 1000 for i in range(200_000)], "max_tokens": 1}  # 978 KB of JSON
    for label, busy in (("idle", None), ("1 MB of text", text), ("1 MB of ids", ids)):
        done, latencies = threading.Event(), []
        poller = in_background(worst_health, done, latencies)
        if busy is None:
            time.sleep(1.0)
            meanwhile = "nothing else"
        else:
            elapsed, status = seconds(base, busy, cap)
            meanwhile = f"the prompt's request took {elapsed:.2f} s, {status}"
        done.set()
        poller.join()
        print(f"/health    {label:<12} worst {max(latencies):.3f} s, median {statistics.median(latencies):.3f} s "
              f"over {len(latencies)} polls ({meanwhile})")


def open_for(base: str, opening: bytes, drip: bytes, cap: float) -> tuple[float, bytes]:
    """Seconds until the server closes a connection that sends opening, then drip a byte every 0.1 s; its answer."""
    host, port = base.removeprefix("http://").split(":")
    started, answer = time.perf_counter(), b""
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(opening)
        sock.settimeout(0.1)
        position = 0
        while time.perf_counter() - started < cap:
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            except TimeoutError:
                if drip:
                    sock.sendall(drip[position % len(drip):][:1])
                    position += 1
            except ConnectionError:
                break
    return min(time.perf_counter() - started, cap), answer


def slow_clients(base: str, cap: float) -> None:
    held, answer = open_for(base, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 100\r\n\r\n{\"", b"", cap)
    status_line = answer.partition(b"\r\n")[0].decode() or "none"
    print(f"slow body  (Content-Length 100, 2 bytes sent) held {held:.2f} s; answer: {status_line}")
    held, _ = open_for(base, b"GET /health HTTP/1.1\r\n", b"X-Slow: aaaaaaaa\r\n", cap)
    print(f"slow headers (a byte every 0.1 s) held {held:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="?", help="default: a random `small` model")
    parser.add_argument("--port", type=int, default=8741)
    parser.add_argument("--cap", type=float, default=60.0, help="longest wait for any one measurement, seconds")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or random_checkpoint(Path(scratch))
        process = start_server(checkpoint, args.port, max_batch_size=32, threads=None, batch_window_ms=5.0)
        base = f"http://127.0.0.1:{args.port}"
        try:
            seconds(base, {"model": "bench", "prompt": "warm up", "max_tokens": 4}, args.cap)
            print(f"checkpoint {checkpoint}; every figure capped at {args.cap:.0f} s")
            slow_clients(base, args.cap)
            health_during_big_prompt(base, args.cap)
            stop_strings(base, args.cap, args.repeats)  # last: a server that matches stops slowly stays busy
        finally:
            process.kill()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
