"""What an adaptive router's allocation costs at batch 1: a checkpoint against its own weights behind static top-k.

Comparing two checkpoints (say need-2 against top-2) mixes the allocator's cost with which experts each model
happens to favour: on a small model whose weights sit in the CPU's caches, a model that keeps to a few experts
decodes faster at the same experts per token. Here the static twins share the checkpoint's gate and experts,
so they rank the experts alike and differ only in how many run: top-floor(k) and top-ceil(k) around the
checkpoint's own mean decode k, interpolated linearly to it. The overhead is the checkpoint's median step time
over that interpolation, minus one. All models decode the same teacher-forced text in interleaved rounds,
packed, on the native fused step where the kernel is available.

    python benchmarks/router_overhead.py CHECKPOINT [--repeats 7] [--tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from dynamoe.bench import WARMUP_STEPS, timed_decode
from dynamoe.checkpoint import load_model
from dynamoe.model import Transformer

PROMPT = 32


def static_twin(model: Transformer, k: int) -> Transformer:
    """The same gate and experts behind static top-k."""
    cfg = dataclasses.replace(model.config, router="topk", top_k=k, k_min=1)
    with torch.random.fork_rng(devices=[]):
        twin = Transformer(cfg)
    missing, _ = twin.load_state_dict(model.state_dict(), strict=False)  # the router's own state is left out
    assert not missing, f"the static twin lacks {missing}"
    return twin.eval()


def decode_k(model: Transformer, row_1N: torch.Tensor) -> float:
    """Mean experts per token over the timed positions, from one forward pass over the same text."""
    with torch.no_grad():
        routings = model(row_1N).routings
    k_LT = torch.stack([routing.k_T for routing in routings]).float()
    return float(k_LT[:, PROMPT + WARMUP_STEPS:].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint or run folder of an adaptive router")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default: 7)")
    parser.add_argument("--tokens", type=int, default=64, help="timed decode steps per round (default: 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, the steadiest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)[0].eval()
    vocab, length = model.config.vocab_size, PROMPT + WARMUP_STEPS + args.tokens
    rows = [torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(r)) for r in range(args.repeats)]
    k = float(np.mean([decode_k(model, row) for row in rows]))
    ks = sorted({max(1, math.floor(k)), max(1, math.ceil(k))})
    models = {f"static top-{k_static}": static_twin(model, k_static) for k_static in ks} | {"checkpoint": model}
    for variant in models.values():
        variant.pack_weights()
    steps: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(-1, args.repeats):  # round -1 warms up and is dropped
        row = rows[max(round_index, 0)]
        for name, variant in models.items():
            run = timed_decode(variant, row[:, :PROMPT], row[:, PROMPT:])
            if round_index >= 0:
                steps[name] += run.step_seconds
    median = {name: float(np.median(seconds)) * 1e3 for name, seconds in steps.items()}
    low, high = (median[f"static top-{k_static}"] for k_static in (ks[0], ks[-1]))
    at_k = low + (high - low) * (k - ks[0]) / max(1, ks[-1] - ks[0])
    print(f"{args.checkpoint} ({model.config.router} router), batch 1, {args.repeats} interleaved rounds of {args.tokens} "
          f"steps, {torch.get_num_threads()} thread(s); {model.kernel_summary()}")
    for name, ms in median.items():
        print(f"  {name:<16} {ms:.4f} ms/token" + (f" at {k:.3f} experts/token" if name == "checkpoint" else ""))
    print(f"static top-k interpolated to {k:.3f} experts/token: {at_k:.4f} ms; the allocator's overhead: "
          f"{median['checkpoint'] / at_k - 1:+.1%}")


if __name__ == "__main__":
    main()
