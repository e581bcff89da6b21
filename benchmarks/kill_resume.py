"""Kill training at random moments, resume it each time with the same command, and compare with an uninterrupted run.

For each way of stopping (`kill -9`, then SIGTERM) the run is started with `dynamoe train ... --resume`, stopped
after a random delay, checked, and started again with the same command, until it has been stopped --kills times;
then it runs to the end. Checked after every stop: each visible ckpt-* folder loads (weights, trainer state,
training settings). Checked at the end: the log equals the uninterrupted run's (every value but the timings) and
the final weights and optimizer state are bitwise equal. A script, not a test (it takes a few minutes):

    .venv/bin/python benchmarks/kill_resume.py --kills 10 --preset tiny
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dynamoe.checkpoint import latest_checkpoint, load_model, load_train_config, load_trainer_state
from dynamoe.data import build_corpus
from dynamoe.errors import DynamoeError

TIMINGS = ("tokens_per_s",)  # the only logged values that may differ between runs


def train_command(corpus: Path, out: Path, preset: str, steps: int, save_every: int) -> list[str]:
    """One command line for the first run and every restart: --resume starts the run when it has no checkpoint."""
    return [sys.executable, "-m", "dynamoe", "train", "--data", str(corpus), "--out", str(out), "--preset", preset,
            "--steps", str(steps), "--batch-size", "8", "--warmup-steps", "5", "--save-every", str(save_every),
            "--log-every", "1", "--eval-every", "20", "--eval-batches", "2", "--device", "cpu", "--no-progress", "--resume"]


def start(command: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every process: bitwise equal arithmetic
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def broken_checkpoints(run: Path) -> list[str]:
    """The visible checkpoints that fail to load, with the reason."""
    broken = []
    for ckpt in sorted(run.glob("ckpt-*")):
        try:
            load_model(ckpt)
            load_trainer_state(ckpt)
            load_train_config(ckpt)
        except DynamoeError as error:
            broken.append(f"{ckpt.name}: {error}")
    return broken


def stop_repeatedly(command: list[str], run: Path, stop: signal.Signals, kills: int, training_s: float,
                    steps: int, rng: random.Random) -> dict[str, Any]:
    """Stop the run `kills` times at random moments of its training, then let it finish; what happened each time.

    Each process is stopped once it has logged a step, after a delay drawn from 0 to its share of the training
    (training_s / kills), so that the stops spread over most of the run. A run that reaches its end before the
    last stop is started over.
    """
    stops: list[dict[str, Any]] = []
    while len(stops) < kills:
        latest = latest_checkpoint(run)
        done = load_trainer_state(latest)["step"] if latest else 0
        old_log = log_identity(run)
        process = start(command)
        # Training has begun once the process has rewritten the log (dropping what the last one wrote past its
        # checkpoint) and logged a step of its own.
        while process.poll() is None and (log_identity(run) == old_log or last_logged_step(run) <= done):
            time.sleep(0.01)
        delay = rng.uniform(0, training_s / kills)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(stop)
        _, stderr = process.communicate()
        latest = latest_checkpoint(run)
        if process.returncode == 0 or (latest is not None and load_trainer_state(latest)["step"] == steps):
            print(f"  {stop.name}: the run reached its end before the signal; starting it over", flush=True)
            for path in run.iterdir():  # the comparison needs every stop: a finished run cannot be resumed
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            stops.clear()
            continue
        stops.append({"after_step": last_logged_step(run), "exit": process.returncode,
                      "stderr": stderr.strip().splitlines(), "resumes_from": latest.name if latest else None,
                      "inside_a_save": any(run.glob(".tmp-ckpt-*")),  # a staging or retired folder left behind
                      "broken": broken_checkpoints(run)})
        print(f"  {stop.name} #{len(stops)} after step {stops[-1]['after_step']}: exit {process.returncode}, resumes "
              f"from {stops[-1]['resumes_from']}{', inside a save' if stops[-1]['inside_a_save'] else ''}"
              f"{', BROKEN: ' + '; '.join(stops[-1]['broken']) if stops[-1]['broken'] else ''}", flush=True)
    finished = start(command)
    _, stderr = finished.communicate()
    if finished.returncode != 0:
        raise SystemExit(f"the last resume failed: {stderr.strip()}")
    return {"stops": stops}


def log_identity(run: Path) -> int | None:
    """The inode of the log file: a resumed run replaces the file, so a new inode means a new process's log."""
    try:
        return (run / "log.jsonl").stat().st_ino
    except OSError:
        return None


def last_logged_step(run: Path) -> int:
    """The step of the log's last complete line (0 before any)."""
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):  # no log yet, or a line being written
        return 0


def timed_run(command: list[str], run: Path) -> dict[str, float]:
    """Run to the end; seconds of start-up (until the first log line) and of training."""
    started = time.perf_counter()
    process = start(command)
    while process.poll() is None and not (run / "log.jsonl").is_file():
        time.sleep(0.01)
    startup = time.perf_counter() - started
    if process.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed: {process.communicate()[1]}")
    return {"startup_s": round(startup, 2), "training_s": round(time.perf_counter() - started - startup, 2)}


def read_log(run: Path) -> list[dict[str, Any]]:
    return [{key: value for key, value in json.loads(line).items() if key not in TIMINGS}
            for line in (run / "log.jsonl").read_text().splitlines()]


def compare(run: Path, reference: Path) -> dict[str, Any]:
    """Where a finished run differs from the uninterrupted one (empty lists: nowhere)."""
    log, expected_log = read_log(run), read_log(reference)
    ckpt, expected_ckpt = latest_checkpoint(run), latest_checkpoint(reference)
    assert ckpt is not None and expected_ckpt is not None
    weights, expected = load_file(ckpt / "model.safetensors"), load_file(expected_ckpt / "model.safetensors")
    state, expected_state = load_trainer_state(ckpt), load_trainer_state(expected_ckpt)
    moments = [(index, key) for index, values in expected_state["optimizer"]["state"].items() for key in values
               if not torch.equal(state["optimizer"]["state"][index][key], values[key])]
    return {"log_lines": len(log), "log_lines_differing": [r["step"] for r, e in zip(log, expected_log) if r != e]
            + ([f"{len(log)} lines, expected {len(expected_log)}"] if len(log) != len(expected_log) else []),
            "weights_differing": [name for name in expected if not torch.equal(weights[name], expected[name])],
            "optimizer_state_differing": [f"{index}.{key}" for index, key in moments]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="stops per signal")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--save-every", type=int, default=3, help="often, so that many stops land inside a save")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random delays")
    parser.add_argument("--out", type=Path, default=Path("runs/kill-resume"))
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty; choose a new --out")
    rng = random.Random(args.seed)
    corpus = build_corpus(args.out / "corpus", vocab_size=512, bytes_per_domain=40_000, seed=0, progress=False)

    reference = args.out / "uninterrupted"
    timing = timed_run(train_command(corpus, reference, args.preset, args.steps, args.save_every), reference)
    print(f"uninterrupted run: {timing}", flush=True)

    report: dict[str, Any] = {"settings": {**vars(args), "out": str(args.out)}, "uninterrupted": timing}
    for stop in (signal.SIGKILL, signal.SIGTERM):
        run = args.out / stop.name.lower()
        run.mkdir(parents=True)
        command = train_command(corpus, run, args.preset, args.steps, args.save_every)
        result = stop_repeatedly(command, run, stop, args.kills, timing["training_s"], args.steps, rng)
        result.update(compare(run, reference))
        report[stop.name] = result
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    failed = False
    for stop in ("SIGKILL", "SIGTERM"):
        result = report[stop]
        broken = sum(len(s["broken"]) for s in result["stops"])
        inside = sum(s["inside_a_save"] for s in result["stops"])
        lines = max(len(s["stderr"]) for s in result["stops"])
        differing = [key for key in ("log_lines_differing", "weights_differing", "optimizer_state_differing") if result[key]]
        # kill -9 ends the process; SIGTERM makes it save, then exit with 128 + 15 and one line.
        expected_exit = -signal.SIGKILL if stop == "SIGKILL" else 128 + signal.SIGTERM
        unexpected = [s["exit"] for s in result["stops"] if s["exit"] != expected_exit]
        failed |= bool(broken or differing or unexpected)
        print(f"{stop}: {len(result['stops'])} stops ({inside} inside a save; exit codes other than {expected_exit}: "
              f"{unexpected or 'none'}; at most {lines} line(s) on stderr), {broken} broken visible checkpoints; "
              f"final log ({result['log_lines']} lines), weights and optimizer state "
              f"{'EQUAL to the uninterrupted run' if not differing else 'DIFFER: ' + ', '.join(differing)}")
    print(f"report: {args.out / 'report.json'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
