"""Peer benchmark: batch-1 greedy decode of dynamoe against llama.cpp (and transformers) on the same weights.

The peer model of benchmarks/peer_transformers.py (a random-weight Mixtral: hidden 512, 4 layers, 8 experts of
1024, top-2, vocabulary 8192, fp32: 63M parameters) gets a byte-level BPE tokenizer trained on this interpreter's
standard library, is imported into dynamoe, and exported with `dynamoe export --format gguf` as f32 and Q8_0
(and as static top-1, to show how llama.cpp itself scales with fewer experts). llama.cpp runs the files through
llama-cpp-python (`make peers` installs it; it builds from source). For each thread count, in one process,
interleaved rounds decode the same random prompts greedily with every variant in turn:

  - llama.cpp: f32 top-2 (the reference of the ratios), f32 top-1, Q8_0 top-2,
  - transformers `generate` (grouped_mm experts, its fastest on this model),
  - dynamoe static top-2 on its native kernel (fp32, and int8 weights), and on torch's kernels for reference,
  - dynamoe dynamic: the same gate and experts behind a top-p router at each --thresholds value (no retraining:
    on random weights this shows what skipping experts buys, not quality).

After each thread count's rounds, three more runs of dynamoe static top-2 split its decode step by part
(attention, router+experts, final norm+head: the native step's own clocks; the rest: Python and glue).

Each decode step is timestamped as it finishes, prefill excluded: llama.cpp's step is `Llama.eval([token])` plus the
argmax of its logits, dynamoe's `decode_one_token`. tokens/s = 1 / median step time. "vs llama.cpp" is llama.cpp f32
top-2's median time over the variant's (above 1: faster). Identical greedy tokens are checked where the arithmetic
is the same (fp32 against fp32); int8 and Q8_0 round differently, and on random weights (logits close together)
their greedy tokens may part.

    python benchmarks/peer_llamacpp.py [--threads 1 2] [--repeats 5] [--tokens 64] [--thresholds 0.2 0.3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from peer_transformers import (PROMPT_TOKENS, WARMUP_STEPS, Decoder, Run, Variant, dynamoe_decoder, measure, mixtral_config,
                               run_of, stamp, transformers_decoder, with_dynamic_routing)
from transformers import MixtralForCausalLM

from dynamoe.checkpoint import load_model
from dynamoe.data.documents import code_documents
from dynamoe.data.tokenizer import TOKENIZER_FILE, train_tokenizer
from dynamoe.generate import GREEDY, decode_one_token, prefill
from dynamoe.gguf_export import export_gguf
from dynamoe.hf import import_hf
from dynamoe.model import Transformer, native

REFERENCE = "llama.cpp f32 top-2"
TOKENIZER_BYTES = 3_000_000  # standard-library text the tokenizer trains on (enough merges for 8192 tokens)


def llama_decoder(path: Path, threads: int, context: int, experts: float) -> Decoder:
    """Greedy decode through llama-cpp-python, timed per step; the file is memory-mapped once per thread count.

    The KV cache is f32 (llama.cpp's default is f16), so that llama.cpp computes what the others compute.
    logits_all keeps each step's logits in `scores` (llama-cpp-python 0.3 keeps none otherwise); it costs
    only the prefill, which is not timed."""
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32, logits_all=True, verbose=False)

    def decode(prompt_1T: torch.Tensor, steps: int) -> Run:
        llm.reset()
        llm.eval(prompt_1T[0].tolist())
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens, stamps = [token], [stamp()]
        for _ in range(steps):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            stamps.append(stamp())
            tokens.append(token)
        return run_of(stamps, tokens, [experts] * steps)
    return decode


def build_peer(folder: Path) -> tuple[Path, Path]:
    """The random Mixtral with a trained tokenizer (transformers folder), imported into dynamoe; both folders."""
    hf, ours = folder / "hf", folder / "dynamoe"
    torch.manual_seed(0)
    MixtralForCausalLM(mixtral_config()).save_pretrained(hf)
    texts = [document.text for document in code_documents(TOKENIZER_BYTES)]
    train_tokenizer(texts, mixtral_config().vocab_size).save(str(hf / TOKENIZER_FILE))
    import_hf(hf, ours)
    return hf, ours


def export_files(checkpoint: Path, folder: Path) -> dict[str, Path]:
    """The GGUF files llama.cpp decodes: f32 top-2, f32 top-1, Q8_0 top-2."""
    files = {REFERENCE: folder / "f32.gguf", "llama.cpp f32 top-1": folder / "f32-top1.gguf",
             "llama.cpp Q8_0 top-2": folder / "q8_0.gguf"}
    export_gguf(checkpoint, files[REFERENCE])
    export_gguf(checkpoint, files["llama.cpp f32 top-1"], as_topk=1)
    export_gguf(checkpoint, files["llama.cpp Q8_0 top-2"], gguf_type="q8_0")
    return files


def dynamoe_models(checkpoint: Path, thresholds: list[float]) -> dict[str, Transformer]:
    """dynamoe's variants, each a model packed for decoding (the native kernel where it is available)."""
    def packed(model: Transformer, int8: bool = False) -> Transformer:
        model.pack_weights(int8=int8)
        return model

    static = load_model(checkpoint)[0]
    models = {"dynamoe static top-2": packed(load_model(checkpoint)[0]),
              "dynamoe static top-2 int8": packed(load_model(checkpoint)[0], int8=True)}
    for threshold in thresholds:
        models[f"dynamoe dynamic p={threshold}"] = packed(with_dynamic_routing(static, threshold))
        models[f"dynamoe dynamic p={threshold} int8"] = packed(with_dynamic_routing(static, threshold), int8=True)
    with native.refused():  # oneDNN-packed, as on a machine without the kernel
        models["dynamoe static top-2 torch kernels"] = packed(load_model(checkpoint)[0])
    return models


def variants_for(threads: int, files: dict[str, Path], hf: Path, models: dict[str, Transformer],
                 context: int) -> list[Variant]:
    """Every variant at one thread count (llama.cpp fixes its threads when a file is opened)."""
    experts = {REFERENCE: 2.0, "llama.cpp f32 top-1": 1.0, "llama.cpp Q8_0 top-2": 2.0}
    variants = [Variant(name, llama_decoder(path, threads, context, experts[name])) for name, path in files.items()]
    hf_model = MixtralForCausalLM.from_pretrained(hf, experts_implementation="grouped_mm", dtype=torch.float32).eval()
    variants.append(Variant("transformers generate", transformers_decoder(hf_model)))
    variants += [Variant(name, dynamoe_decoder(model)) for name, model in models.items()]
    return variants


def same_tokens(variants: list[Variant], name: str, reference: str) -> str:
    """'a/b': rounds in which two variants decoded identical greedy tokens."""
    by_name = {v.name: v for v in variants}
    pairs = list(zip(by_name[name].tokens, by_name[reference].tokens))
    return f"{sum(a == b for a, b in pairs)}/{len(pairs)}"


TOKEN_CHECKS = {  # variant -> the variant whose greedy tokens it should reproduce (the same arithmetic, fp32)
    "dynamoe static top-2": REFERENCE, "dynamoe static top-2 torch kernels": "transformers generate",
    "transformers generate": REFERENCE,
}


def table(results: dict[int, list[Variant]]) -> str:
    """One row per variant, per thread count: ms/token, tokens/s, speed against llama.cpp f32 top-2, tokens check."""
    names = [v.name for v in next(iter(results.values()))]
    header = f"{'variant':<36} {'experts':>7}"
    for threads in results:
        header += f" | {threads} thr: {'ms/tok':>6} {'tok/s':>6} {'vs llama':>8} {'cpu ms':>6} {'same':>5}"
    lines = [header]
    for name in names:
        row = ""
        for threads, variants in results.items():
            median = {v.name: float(np.median(v.wall)) for v in variants}
            v = next(v for v in variants if v.name == name)
            check = same_tokens(variants, name, TOKEN_CHECKS[name]) if name in TOKEN_CHECKS else "–"
            row += (f" | {'':>6} {median[name] * 1e3:>6.3f} {1 / median[name]:>6.0f} {median[REFERENCE] / median[name]:>7.2f}x "
                    f"{float(np.median(v.cpu)) * 1e3:>6.3f} {check:>5}")
        experts = float(np.mean(next(v for v in results[next(iter(results))] if v.name == name).experts))
        lines.append(f"{name:<36} {experts:>7.2f}{row}")
    return "\n".join(lines)


PARTS = ("attention", "router+experts", "final norm+head")  # the kernel Decoder's clocks, in its order


def step_profile(model: Transformer, steps: int, vocab_size: int) -> dict[str, float]:
    """Milliseconds per decode step (prefill excluded): in all, and in each part by the kernel Decoder's own clocks."""
    decoder = model.fused.native if model.fused is not None else None
    assert decoder is not None, "the profile needs the whole step in the native kernel"
    prompt_1T = torch.randint(0, vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    model.setup_caches(1, PROMPT_TOKENS + steps + 1)
    try:
        token_1 = prefill(model, prompt_1T, torch.tensor([PROMPT_TOKENS]))[0].argmax(-1)
        decoder.seconds()  # from here
        started = stamp()[0]
        for i in range(steps):
            token_1, _ = decode_one_token(model, token_1[:, None], torch.tensor([[PROMPT_TOKENS + i]]), GREEDY)
        total = (stamp()[0] - started) / steps * 1e3
    finally:
        model.clear_caches()
    return {"total": total} | {part: seconds / steps * 1e3 for part, seconds in zip(PARTS, decoder.seconds())}


def profile_line(threads: int, model: Transformer, steps: int, variants: list[Variant], repeats: int = 3) -> str:
    """One decode step of dynamoe static top-2 by part (medians over runs; the rest: Python, the embedding row and
    the kernel's glue), beside llama.cpp f32 top-2's median step."""
    runs = [step_profile(model, steps, mixtral_config().vocab_size) for _ in range(repeats)]
    median = {name: float(np.median([run[name] for run in runs])) for name in runs[0]}
    total = median.pop("total")
    llama = float(np.median(next(v for v in variants if v.name == REFERENCE).wall)) * 1e3
    parts = ", ".join(f"{name} {ms:.3f}" for name, ms in median.items())
    return (f"{threads} thread(s), one decode step of dynamoe static top-2 in ms: {parts}, the rest (Python, embedding, "
            f"glue) {total - sum(median.values()):.3f}, total {total:.3f}; llama.cpp f32 top-2 {llama:.3f} (median)")


def acceptance(results: dict[int, list[Variant]], thresholds: list[float]) -> list[str]:
    """The issue's targets, each with its measured ratio per thread count."""
    lines = []
    for threads, variants in results.items():
        median = {v.name: float(np.median(v.wall)) for v in variants}
        experts = {v.name: float(np.mean(v.experts)) for v in variants}
        speed = {name: median[REFERENCE] / median[name] for name in median}
        q8 = median["llama.cpp Q8_0 top-2"] / median["dynamoe static top-2 int8"]
        dynamic = min((f"dynamoe dynamic p={t}" for t in thresholds), key=lambda n: abs(experts[n] - 1.3), default=None)
        lines.append(f"{threads} thread(s): static top-2 fp32 {speed['dynamoe static top-2']:.2f}x llama.cpp f32 top-2 "
                     f"(target >= 1.00: {'holds' if speed['dynamoe static top-2'] >= 1 else 'does not hold'}); "
                     f"int8 {q8:.2f}x llama.cpp Q8_0 (target >= 1.00: {'holds' if q8 >= 1 else 'does not hold'})"
                     + ("" if dynamic is None else
                        f"; dynamic at {experts[dynamic]:.2f} experts/token ({dynamic}) {speed[dynamic]:.2f}x llama.cpp f32 "
                        f"top-2 (target >= 1.30: {'holds' if speed[dynamic] >= 1.3 else 'does not hold'})"))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, each its own rounds (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per thread count (default: 5)")
    parser.add_argument("--tokens", type=int, default=64, help="timed decode steps per round (default: 64)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.2, 0.3],
                        help="routing thresholds of the dynamic variants (default: 0.2 0.3: about 1.3 and 2 experts/token "
                             "on these random weights)")
    args = parser.parse_args()
    if min(*args.threads, args.repeats, args.tokens) < 1:
        parser.error("--threads, --repeats and --tokens must be positive")
    context = PROMPT_TOKENS + WARMUP_STEPS + args.tokens + 8
    results: dict[int, list[Variant]] = {}
    profiles: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        hf, checkpoint = build_peer(Path(tmp))
        files = export_files(checkpoint, Path(tmp))
        models = dynamoe_models(checkpoint, args.thresholds)
        for threads in args.threads:
            torch.set_num_threads(threads)
            results[threads] = variants_for(threads, files, hf, models, context)
            measure(results[threads], args.repeats, args.tokens)
            profiles.append(profile_line(threads, models["dynamoe static top-2"], args.tokens, results[threads]))
    import llama_cpp
    import transformers

    print(f"batch-1 greedy decode, Mixtral architecture (63M parameters), random weights; {args.repeats} interleaved rounds "
          f"x {args.tokens} steps after a {PROMPT_TOKENS}-token prompt per thread count; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, llama-cpp-python {llama_cpp.__version__}; "
          f"{models['dynamoe static top-2'].kernel_summary()}; load average {os.getloadavg()[0]:.1f}")
    print(table(results))
    print("\n".join(profiles))
    print("\n".join(acceptance(results, args.thresholds)))


if __name__ == "__main__":
    main()
