"""Does batch-1 decode latency follow the experts a token uses? Static top-k on random weights, no checkpoint needed.

(a) the small preset (D=256, 4 layers, experts of hidden 512, vocab 8192) with 16 experts at k = 1, 2, 4, 8;
(b) k = 2 with 8 and with 64 experts: if dispatch only touches the selected experts, the total number
    of experts should barely matter.
All variants are measured in interleaved rounds (A B C ..., A B C ...), so that the machine's drifts
cancel in the ratios. Each ratio is relative to k=8, E=16, beside the ideal ratio: that of the bytes of
weights a token reads (`dynamoe.bench.bytes_per_token`; for static top-k on random weights k is exact).

    python benchmarks/decode_scaling.py [--repeats 5] [--tokens 96] [--threads N] [--device cpu]

On a shared machine, --threads 1 is far steadier: with every core's thread in use, a busy neighbour
process stalls whole decode steps (see the spread column: interquartile range over the median).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from dynamoe.bench import WARMUP_STEPS, bytes_per_token, timed_decode
from dynamoe.config import preset
from dynamoe.model import Transformer
from dynamoe.train import resolve_device

REFERENCE = (16, 8)  # (experts, k) that the ratios are relative to
VARIANTS = [(16, 1), (16, 2), (16, 4), (16, 8), (8, 2), (64, 2)]  # (a) then (b)


@dataclass
class Variant:
    """A random small-preset model with static top-k routing, and its timed decode steps."""

    n_experts: int
    top_k: int
    model: Transformer
    step_seconds: list[float]

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.model, [self.top_k] * len(self.model.routers()))


def build(n_experts: int, top_k: int, device: torch.device) -> Variant:
    """The small preset at E experts and static top-k, random weights."""
    torch.manual_seed(0)
    cfg = preset("small", router="topk", n_experts=n_experts, top_k=top_k, k_max=min(8, n_experts))
    return Variant(n_experts, top_k, Transformer(cfg).to(device).eval(), [])


def measure(variants: list[Variant], repeats: int, tokens: int, prompt: int, device: torch.device) -> None:
    """Interleaved rounds: each round decodes the same random text with every variant in turn."""
    vocab = variants[0].model.config.vocab_size
    for round_index in range(-1, repeats):  # round -1 warms up and is dropped
        generator = torch.Generator().manual_seed(max(round_index, 0))
        row = torch.randint(0, vocab, (1, prompt + WARMUP_STEPS + tokens), generator=generator).to(device)
        for variant in variants:
            run = timed_decode(variant.model, row[:, :prompt], row[:, prompt:])
            if round_index >= 0:
                variant.step_seconds += run.step_seconds


def table(variants: list[Variant]) -> str:
    """One line per variant: latency, its ratio to the reference, and the ideal (bytes) ratio."""
    reference = next(v for v in variants if (v.n_experts, v.top_k) == REFERENCE)
    ref_ms, ref_bytes = float(np.median(reference.step_seconds)) * 1e3, reference.bytes_per_token
    lines = [f"{'E':>4} {'k':>3} {'p50 ms':>8} {'p95 ms':>8} {'spread':>7} {'measured':>9} {'ideal':>7} {'MB/token':>9}"]
    for v in variants:
        steps_ms = np.asarray(v.step_seconds) * 1e3
        p50 = float(np.median(steps_ms))
        # Interquartile range over the median: how noisy the steps behind p50 were.
        spread = (np.percentile(steps_ms, 75) - np.percentile(steps_ms, 25)) / p50
        lines.append(f"{v.n_experts:>4} {v.top_k:>3} {p50:>8.3f} {np.percentile(steps_ms, 95):>8.3f} {spread:>7.1%} "
                     f"{p50 / ref_ms:>9.3f} {v.bytes_per_token / ref_bytes:>7.3f} {v.bytes_per_token / 2 ** 20:>9.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--tokens", type=int, default=96, help="timed decode steps per round (default: 96)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before the decode steps (default: 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    args = parser.parse_args()
    if min(args.repeats, args.tokens, args.prompt) < 1 or args.prompt + WARMUP_STEPS + args.tokens > preset("small").max_seq_len:
        parser.error(f"need positive counts and prompt + {WARMUP_STEPS} + tokens <= {preset('small').max_seq_len}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    variants = [build(n_experts, top_k, device) for n_experts, top_k in VARIANTS]
    measure(variants, args.repeats, args.tokens, args.prompt, device)
    print(f"batch-1 decode, small preset, static top-k, random weights; {args.repeats} interleaved rounds of {args.tokens} "
          f"steps; torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")
    print(f"ratios relative to E={REFERENCE[0]}, k={REFERENCE[1]}; ideal = ratio of weight bytes read per token")
    print(table(variants))


if __name__ == "__main__":
    main()
