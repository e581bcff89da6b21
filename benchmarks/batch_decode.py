"""How much of the dynamic router's decode advantage survives batching: a static top-k checkpoint against a dynamic
one dialled to the same mean experts/token, decode tokens/s at each batch size.

A batch runs, in every MoE layer, the union of the experts its rows chose: at batch 1 a dynamic token
that uses fewer experts reads fewer weights, but as rows are added the union grows towards every expert
for both routers. The dynamic model's dial is set by bisection so that its mean k on held-out text
equals the static model's top-k. Both are measured in interleaved rounds on the same held-out windows
(teacher-forced decode steps after a prompt); the table gives tokens/s, the dynamic/static ratio and
the experts a step touches per layer (the union over the batch). A measurement script, not a test:

    .venv/bin/python benchmarks/batch_decode.py runs/quick-top2 runs/demo/quick/dynamic --corpus data/demo-quick
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dynamoe.bench import WARMUP_STEPS, timed_decode, token_windows
from dynamoe.checkpoint import load_model
from dynamoe.evaluate import evaluate_tokens, split_tokens_by_domain
from dynamoe.model import Dial, Routing, Transformer

BISECTION_STEPS = 14


def mean_k(model: Transformer, tokens: dict[str, np.ndarray], dial: Dial, eval_tokens: int) -> float:
    """Mean experts/token of the model at this dial on held-out text (all domains)."""
    report = evaluate_tokens(model, tokens, max_tokens=eval_tokens, progress=False, dial=dial)
    assert report.total.mean_k is not None
    return report.total.mean_k


def dial_for_mean_k(model: Transformer, tokens: dict[str, np.ndarray], target: float, eval_tokens: int) -> tuple[float, float]:
    """The routing threshold at which the model's mean k is closest to target (bisection), and that mean k."""
    low, high = 1e-3, 1.0
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_k(model, tokens, middle, eval_tokens) < target else (low, middle)
    best = min((low, high), key=lambda t: abs(mean_k(model, tokens, t, eval_tokens) - target))
    return best, mean_k(model, tokens, best, eval_tokens)


class UnionProbe:
    """Counts, per router call, the distinct experts the call's tokens chose: what one step of the batch reads."""

    def __init__(self, model: Transformer) -> None:
        self.counts: list[int] = []
        self.handles = [router.register_forward_hook(self._after) for router in model.routers()]

    def _after(self, module: torch.nn.Module, args: tuple, routing: Routing) -> None:
        self.counts.append(int(routing.experts_TK[routing.mask_TK].unique().numel()))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("static", type=Path, help="static top-k checkpoint")
    parser.add_argument("dynamic", type=Path, help="dynamic checkpoint (dialled to the static model's k)")
    parser.add_argument("--corpus", type=Path, required=True, help="built corpus both were trained on (its test split)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before the timed steps")
    parser.add_argument("--tokens", type=int, default=32, help="timed decode steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per domain for the mean k")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    static, _ = load_model(args.static, pack=True)
    dynamic, _ = load_model(args.dynamic, pack=True)
    if static.config.router != "topk" or not dynamic.dialable:
        raise SystemExit("need a static top-k checkpoint, then a topp/dynamic one")
    tokens = split_tokens_by_domain(args.corpus, "test")
    target = float(static.config.top_k)
    dial, dynamic_k = dial_for_mean_k(dynamic, tokens, target, args.eval_tokens)
    variants: list[tuple[str, Transformer, Dial]] = [(f"static top-{static.config.top_k}", static, None),
                                                     (f"dynamic @{dial:.3f}", dynamic, dial)]
    length = args.prompt + WARMUP_STEPS + args.tokens
    tokens_per_s = {(name, b): [] for name, _, _ in variants for b in args.batch_sizes}
    touched = {(name, b): [] for name, _, _ in variants for b in args.batch_sizes}
    for round_index in range(-1, args.repeats):  # round -1 warms up and is dropped
        for b in args.batch_sizes:
            rows = token_windows(tokens, b * (round_index + 2), length, torch.device("cpu"))[-b:]
            for name, model, variant_dial in variants:
                probe = UnionProbe(model)
                try:
                    run = timed_decode(model, rows[:, :args.prompt], rows[:, args.prompt:], dial=variant_dial)
                finally:
                    probe.close()
                if round_index >= 0:
                    tokens_per_s[name, b].append(b * len(run.step_seconds) / sum(run.step_seconds))
                    touched[name, b] += probe.counts[len(model.routers()):]  # the prefill's calls left out

    print(f"batched decode, static top-{static.config.top_k} ({args.static}) against dynamic ({args.dynamic}) dialled to "
          f"threshold {dial:.3f}: mean k {dynamic_k:.2f} on held-out text (target {target:g}); {args.repeats} interleaved "
          f"rounds of {args.tokens} steps after a {args.prompt}-token prompt; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median tokens/s")
    (static_name, _, _), (dynamic_name, _, _) = variants
    print(f"{'batch':>5} {'static tok/s':>13} {'dynamic tok/s':>14} {'dynamic/static':>15} "
          f"{'experts/layer/step static':>26} {'dynamic':>8}")
    for b in args.batch_sizes:
        s, d = (float(np.median(tokens_per_s[name, b])) for name in (static_name, dynamic_name))
        us, ud = (float(np.mean(touched[name, b])) for name in (static_name, dynamic_name))
        print(f"{b:>5} {s:>13.1f} {d:>14.1f} {d / s:>15.3f} {us:>26.2f} {ud:>8.2f}")


if __name__ == "__main__":
    main()
