"""Peer benchmark: batch-1 greedy decode of dynamoe against transformers' own `generate`, on the same weights.

transformers builds a Mixtral-architecture model with random weights (hidden 512, 4 layers, 8 experts of
1024, top-2, vocab 8192, fp32: 63M parameters) and saves it; dynamoe imports the folder. In one process,
interleaved rounds then decode the same prompt greedily with every variant in turn:

  - transformers `generate`, once per experts implementation (eager, batched_mm, grouped_mm; the fastest
    one is the reference of the ratios),
  - dynamoe, static top-2 (the imported model as it is),
  - dynamoe, dynamic: the imported gate and experts behind a top-p router (DynamicRouter at temperature 1)
    at each --thresholds value; mean experts/token is reported beside it. No retraining: on random
    weights this only shows what dispatch costs when k varies, not quality.

Each decode step is timestamped as it finishes (a logits processor in transformers, the loop itself in
dynamoe), so prefill is excluded and both sides pay their own per-step bookkeeping.
tokens/s = 1 / median step time.

    python benchmarks/peer_transformers.py [--threads 2] [--repeats 5] [--tokens 64] [--thresholds 0.2 0.3] [--compile]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList, MixtralConfig, MixtralForCausalLM

from dynamoe.generate import GREEDY, decode_one_token, prefill
from dynamoe.hf import load_hf
from dynamoe.model import Transformer

EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
WARMUP_STEPS = 4  # untimed decode steps at the start of every run
PROMPT_TOKENS = 32


def mixtral_config() -> MixtralConfig:
    """The peer model of DESIGN.md section 5."""
    return MixtralConfig(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)


@dataclass
class Run:
    """One greedy decode: wall and CPU seconds of each step, the tokens, and experts/token at each step."""

    wall: list[float]
    cpu: list[float]
    tokens: list[int]
    experts: list[float]


Decoder = Callable[[torch.Tensor, int], Run]


@dataclass
class Variant:
    """One way of decoding, and what it measured."""

    name: str
    decode: Decoder
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    experts: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)


def stamp() -> tuple[float, float]:
    """Wall clock and the process's CPU time (all threads): on a busy machine CPU time is the steadier measure of work."""
    return time.perf_counter(), time.process_time()


def run_of(stamps: list[tuple[float, float]], tokens: list[int], experts: list[float]) -> Run:
    """A Run from the stamps taken as each step finished."""
    wall, cpu = zip(*stamps)
    return Run(list(np.diff(wall)), list(np.diff(cpu)), tokens, experts)


class StepClock(LogitsProcessor):
    """Stamps the clocks each time generate has the next token's logits: once per decode step."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(stamp())
        return scores


def transformers_decoder(model: MixtralForCausalLM) -> Decoder:
    """Greedy decode through transformers' generate, timed per step."""
    def decode(prompt_1T: torch.Tensor, steps: int) -> Run:
        clock = StepClock()
        with torch.no_grad():
            out = model.generate(prompt_1T, attention_mask=torch.ones_like(prompt_1T), max_new_tokens=steps + 1,
                                 min_new_tokens=steps + 1, do_sample=False, logits_processor=LogitsProcessorList([clock]))
        return run_of(clock.stamps, out[0, prompt_1T.shape[1]:].tolist(), [2.0] * steps)
    return decode


def dynamoe_decoder(model: Transformer) -> Decoder:
    """Greedy decode through dynamoe's prefill and decode_one_token, timed per step."""
    def decode(prompt_1T: torch.Tensor, steps: int) -> Run:
        P = prompt_1T.shape[1]
        model.setup_caches(1, P + steps + 1)
        logits_1V, _ = prefill(model, prompt_1T, torch.tensor([P]))
        token_1 = logits_1V.argmax(-1)
        tokens, experts, stamps = [int(token_1)], [], [stamp()]
        for i in range(steps):
            token_1, experts_1 = decode_one_token(model, token_1[:, None], torch.tensor([[P + i]]), GREEDY)
            stamps.append(stamp())
            tokens.append(int(token_1))
            experts.append(float(experts_1[0]))
        return run_of(stamps, tokens, experts)
    return decode


def with_dynamic_routing(static: Transformer, threshold: float) -> Transformer:
    """The same weights behind a dynamic router at this threshold (temperature head at its initial value, 1)."""
    cfg = dataclasses.replace(static.config, router="dynamic", threshold=threshold, target_k=None)
    with torch.random.fork_rng(devices=[]):
        model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(static.state_dict(), strict=False)
    assert not unexpected and all("temperature_head" in name for name in missing), (missing, unexpected)
    return model.eval()


def build_variants(folder: Path, thresholds: list[float], compile_decode: bool) -> list[Variant]:
    """transformers per experts implementation, then dynamoe static and dynamic, all on the weights in folder."""
    variants = []
    for implementation in EXPERTS_IMPLEMENTATIONS:
        try:
            model = MixtralForCausalLM.from_pretrained(folder, experts_implementation=implementation, dtype=torch.float32)
        except (ValueError, ImportError, RuntimeError) as error:
            print(f"transformers experts_implementation={implementation}: unavailable ({str(error).splitlines()[0]})")
            continue
        variants.append(Variant(f"transformers {implementation}", transformers_decoder(model.eval())))
    static, _ = load_hf(folder)
    variants.append(Variant("dynamoe static top-2 unpacked", dynamoe_decoder(static)))
    packed, _ = load_hf(folder)
    packed.pack_weights()
    variants.append(Variant("dynamoe static top-2", dynamoe_decoder(packed)))
    for threshold in thresholds:
        dynamic = with_dynamic_routing(static, threshold)
        dynamic.pack_weights()
        variants.append(Variant(f"dynamoe dynamic p={threshold}", dynamoe_decoder(dynamic)))
    if compile_decode:
        compiled = [("dynamoe static top-2 compiled", load_hf(folder)[0])]
        compiled += [(f"dynamoe dynamic p={t} compiled", with_dynamic_routing(static, t)) for t in thresholds]
        for name, model in compiled:
            model.compile_decode()
            variants.append(Variant(name, dynamoe_decoder(model)))
    return variants


def measure(variants: list[Variant], repeats: int, steps: int) -> None:
    """Interleaved rounds; round -1 warms every variant up and is dropped."""
    for round_index in range(-1, repeats):
        generator = torch.Generator().manual_seed(max(round_index, 0))
        prompt_1T = torch.randint(0, 8192, (1, PROMPT_TOKENS), generator=generator)
        for variant in variants:
            run = variant.decode(prompt_1T, WARMUP_STEPS + steps)
            if round_index >= 0:
                variant.wall += run.wall[WARMUP_STEPS:]
                variant.cpu += run.cpu[WARMUP_STEPS:]
                variant.experts += run.experts[WARMUP_STEPS:]
                variant.tokens.append(run.tokens)


def report(variants: list[Variant]) -> str:
    """Latency, tokens/s and CPU time per token, each with its ratio to the fastest transformers implementation."""
    wall = {v.name: float(np.median(v.wall)) for v in variants}
    cpu = {v.name: float(np.median(v.cpu)) for v in variants}
    peers = [v.name for v in variants if v.name.startswith("transformers")]
    best_wall, best_cpu = min(wall[name] for name in peers), min(cpu[name] for name in peers)
    lines = [f"{'variant':<30} {'ms/token':>9} {'p95 ms':>8} {'spread':>7} {'tokens/s':>9} {'vs best hf':>10} "
             f"{'cpu ms/token':>12} {'cpu vs best hf':>14} {'experts/token':>13}"]
    for v in variants:
        steps_ms = np.asarray(v.wall) * 1e3
        spread = (np.percentile(steps_ms, 75) - np.percentile(steps_ms, 25)) / np.median(steps_ms)
        lines.append(f"{v.name:<30} {wall[v.name] * 1e3:>9.3f} {np.percentile(steps_ms, 95):>8.3f} {spread:>7.1%} "
                     f"{1 / wall[v.name]:>9.1f} {best_wall / wall[v.name]:>9.2f}x {cpu[v.name] * 1e3:>12.3f} "
                     f"{best_cpu / cpu[v.name]:>13.2f}x {np.mean(v.experts):>13.2f}")
    static = next(v for v in variants if v.name == "dynamoe static top-2")
    reference = next(v for v in variants if v.name == min(peers, key=wall.__getitem__))
    same = sum(a == b for a, b in zip(static.tokens, reference.tokens))
    lines.append(f"dynamoe static decoded the same greedy tokens as {reference.name} in {same}/{len(reference.tokens)} rounds")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, fixed for every variant (default: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--tokens", type=int, default=64, help="timed decode steps per round (default: 64)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.2, 0.3],
                        help="routing thresholds of the dynamic variants (default: 0.2 0.3, below 2 experts/token on "
                             "these random weights); none: static only")
    parser.add_argument("--compile", action="store_true", help="also dynamoe through torch.compile (Transformer.compile_decode)")
    args = parser.parse_args()
    if min(args.threads, args.repeats, args.tokens) < 1:
        parser.error("--threads, --repeats and --tokens must be positive")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        MixtralForCausalLM(mixtral_config()).save_pretrained(tmp)
        variants = build_variants(Path(tmp), args.thresholds, args.compile)
        parameters = sum(p.numel() for p in MixtralForCausalLM.from_pretrained(tmp).parameters())
    measure(variants, args.repeats, args.tokens)
    print(f"batch-1 greedy decode, Mixtral architecture ({parameters / 1e6:.1f}M parameters, fp32), random weights; "
          f"{args.repeats} interleaved rounds x {args.tokens} steps after a {PROMPT_TOKENS}-token prompt; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(report(variants))


if __name__ == "__main__":
    main()
