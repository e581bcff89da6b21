"""Run the real lm-evaluation-harness against `dynamoe serve`, then check its loglikelihoods against `dynamoe eval`.

Serves a checkpoint on a free loopback port, runs `lm-eval run --model local-completions` (remote
tokenizer, i.e. the server's /tokenize) on the three local tasks in tasks/ (multiple choice, rolling
perplexity, generation) with --log_samples, prints lm-eval's metrics, then recomputes every logged
loglikelihood with `dynamoe.evaluate.evaluate_tokens` (the computation behind `dynamoe eval`) on
the same tokens and reports the largest difference. Run from the repository root:

    .venv/bin/python benchmarks/lm_eval/run.py runs/demo/quick/dynamic
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from dynamoe.checkpoint import load_model, load_tokenizer_for
from dynamoe.evaluate import evaluate_tokens
from dynamoe.model import Transformer
from dynamoe.serve import ServeSettings, create_app
from dynamoe.serve.background import serve_in_thread

HERE = Path(__file__).resolve().parent
TASKS = ("dynamoe_mc", "dynamoe_rolling", "dynamoe_gen")
MODEL_NAME = "dynamoe"


def run_lm_eval(url: str, max_length: int, out: Path, concurrency: int, batch_size: int, api_key: str | None) -> None:
    """The lm-eval command line, as a user would type it."""
    model_args = (f"model={MODEL_NAME},base_url={url}/v1/completions,tokenizer_backend=remote,"
                  f"max_length={max_length},num_concurrent={concurrency},max_retries=1")
    # With a key, lm-eval sends it from OPENAI_API_KEY (completions) and from auth_token (its remote tokenizer).
    env = dict(os.environ, **({"OPENAI_API_KEY": api_key} if api_key else {}))
    model_args += f",auth_token={api_key}" if api_key else ""
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
               "--tasks", ",".join(TASKS), "--include_path", str(HERE / "tasks"), "--batch_size", str(batch_size),
               "--output_path", str(out), "--log_samples"]
    shown = " ".join(command).replace(api_key, "***") if api_key else " ".join(command)
    print("$", shown, flush=True)
    subprocess.run(command, check=True, cwd=HERE.parents[1], env=env)


def latest(out: Path, pattern: str) -> Path:
    files = sorted(out.rglob(pattern), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"lm-eval wrote no {pattern} under {out}")
    return files[-1]


def total_nll(model: Transformer, ids: list[int]) -> float:
    """-sum log p(ids[i] | ids[:i]) over i >= 1, by dynamoe eval's evaluate_tokens."""
    if len(ids) < 2:
        return 0.0
    report = evaluate_tokens(model, {"text": np.array(ids)}, max_tokens=None, progress=False)
    return report.total.loss * report.total.tokens


def reference_loglikelihood(model: Transformer, context: list[int], continuation: list[int], max_length: int) -> float:
    """log p(continuation | context) on the tokens lm-eval sends (left-truncated to its max_length - 1)."""
    window = max_length - 1  # lm-eval keeps one position for the generated token
    whole = (context + continuation)[-window:]
    context_len = len(context) - max(0, len(context) + len(continuation) - window)
    return total_nll(model, whole[:context_len]) - total_nll(model, whole)


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into tokens: trailing spaces move to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = encode(context + continuation), encode(context)
    return context_ids, whole[len(context_ids):]


def check_loglikelihoods(model: Transformer, encode, eos_id: int, out: Path, max_length: int) -> float:
    """Largest |lm-eval's loglikelihood - dynamoe eval's| over every multiple-choice and rolling sample."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    worst, count = 0.0, 0
    for line in latest(out, "samples_dynamoe_mc_*.jsonl").read_text().splitlines():
        sample = json.loads(line)
        for arguments, response in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = arguments["arg_0"], arguments["arg_1"]
            expected = reference_loglikelihood(model, *encode_pair(encode, context, continuation), max_length)
            worst, count = max(worst, abs(float(response[0][0]) - expected)), count + 1
    for line in latest(out, "samples_dynamoe_rolling_*.jsonl").read_text().splitlines():
        sample = json.loads(line)
        text = next(iter(sample["arguments"].values()))["arg_0"]
        windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
            token_list=encode(text), prefix_token=eos_id, max_seq_len=max_length - 2, context_len=1)]
        expected = sum(reference_loglikelihood(model, ctx, cont, max_length) for ctx, cont in windows)
        worst, count = max(worst, abs(float(sample["resps"][0][0]) - expected)), count + 1
    print(f"compared {count} loglikelihoods (multiple choice and rolling) with dynamoe eval's: "
          f"largest difference {worst:.2e}")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/lm-eval"))
    parser.add_argument("--concurrency", type=int, default=4, help="lm-eval's num_concurrent")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per lm-eval request")
    parser.add_argument("--api-key", default=None, help="serve with this API key (lm-eval then sends it)")
    args = parser.parse_args()

    model, config = load_model(args.checkpoint)
    tokenizer = load_tokenizer_for(args.checkpoint)
    app = create_app(model, tokenizer, ServeSettings(model_name=MODEL_NAME, api_key=args.api_key))
    server = app.state.server
    with serve_in_thread(app) as url:
        run_lm_eval(url, config.max_seq_len, args.out.resolve(), args.concurrency, args.batch_size, args.api_key)
    results = json.loads(latest(args.out, "results_*.json").read_text())["results"]
    for task in TASKS:
        metrics = {k: v for k, v in results[task].items() if isinstance(v, float) and "stderr" not in k}
        print(f"{task:<16} " + "  ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    with torch.no_grad():
        encode = lambda text: server.tokenizer.encode(text, add_special_tokens=False).ids  # as /tokenize does
        worst = check_loglikelihoods(model, encode, server.eos_id, args.out, config.max_seq_len)
    if worst > 1e-3:
        raise SystemExit(f"loglikelihoods differ by {worst:.2e} > 1e-3")


if __name__ == "__main__":
    main()
