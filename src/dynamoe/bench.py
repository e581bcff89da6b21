"""Side-by-side measurement of checkpoints and compute-dial settings: quality, latency, throughput, memory, cost.

A variant is a checkpoint, or a topp/dynamic checkpoint at one routing threshold. All variants are
measured in one process in interleaved rounds (A B C, A B C, ...), so that the machine's drifts
(clock, caches, neighbours) fall on every variant alike and cancel in the ratios. Decode steps are
fed the corpus's next tokens (teacher forcing): every variant decodes the same text, so a difference
in experts/token comes from the variant, not from what it happened to generate.

Batch-1 decode reads every weight a token needs once, so its latency should follow the bytes of
weights read (`bytes_per_token`); the report puts that ideal ratio beside the measured one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import dynamoe
from dynamoe.checkpoint import check_same_tokenizer, load_model
from dynamoe.errors import DynamoeError
from dynamoe.evaluate import EvalReport, evaluate_tokens, split_tokens_by_domain
from dynamoe.generate import GREEDY, decode_one_token, prefill
from dynamoe.model import Dial, MoE, Routing, Transformer
from dynamoe.model.router import check_threshold
from dynamoe.resources import REPORT_BYTES, check_writable, writing
from dynamoe.train import resolve_device

MIB = 2 ** 20
WARMUP_STEPS = 4  # untimed decode steps before each timed run: first calls allocate and warm caches
BATCH_PROMPT_TOKENS = 32  # prompt of each row of a batched decode run (its prefill is not timed)
RESULTS_JSON, RESULTS_MD, PLOT_PNG = "results.json", "results.md", "latency_vs_perplexity.png"


@dataclass(frozen=True)
class BenchSettings:
    """How much to measure, and the price that turns time into cost."""

    decode_tokens: int = 64  # timed decode steps per run (batch 1 and batched)
    repeats: int = 5  # interleaved rounds over all variants
    eval_tokens: int = 8192  # held-out tokens per domain for perplexity
    prompt_tokens: int = 128  # batch-1 prompt, whose prefill is timed (shortened to fit the context)
    batch_sizes: tuple[int, ...] = (8, 32)  # batched decode throughput at each
    price_per_hour: float = 0.10  # machine price, USD per hour

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise DynamoeError naming the first invalid field."""
        for name in ("decode_tokens", "repeats", "eval_tokens", "prompt_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DynamoeError(f"{name} must be a positive integer, got {value!r}")
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise DynamoeError(f"batch_sizes must be positive integers, got {list(self.batch_sizes)!r}")
        if not (isinstance(self.price_per_hour, (int, float)) and 0 <= self.price_per_hour < math.inf):
            raise DynamoeError(f"price_per_hour must be a finite number >= 0, got {self.price_per_hour!r}")


@dataclass
class VariantResult:
    """Everything measured for one variant; ratios are relative to the first variant."""

    name: str
    checkpoint: str
    router: str  # "dense" for a dense feed-forward
    threshold: float | None  # routing threshold in effect; None for routers without one, or one per layer
    perplexity: float  # held-out, all domains
    perplexity_per_domain: dict[str, float]
    eval_mean_k: float | None  # experts/token over the held-out text; None when dense
    decode_median_ms: float  # batch-1 decode latency per token
    decode_p95_ms: float
    decode_steps: int  # timed steps behind the two latencies
    decode_mean_k: float | None
    decode_mean_k_per_layer: list[float]
    router_share: float | None  # share of batch-1 decode time spent in the routers (measured under hooks)
    prefill_tokens_per_s: float
    batch_tokens_per_s: dict[str, float]  # batch size -> decode throughput
    cost_per_million_batch1: float  # USD per million output tokens at batch 1
    cost_per_million_batched: float  # ... at the largest batch size
    weights_mb: float
    cuda_peak_mb: float | None  # torch.cuda.max_memory_allocated over this variant's rounds; None on CPU
    rss_peak_mb: float  # the process's peak resident memory so far: crude, it only grows and holds every model
    bytes_per_token: int  # weights one decoded token reads, at the decode mean k per layer
    ideal_latency_ratio: float = 1.0  # bytes_per_token / the first variant's
    measured_latency_ratio: float = 1.0  # decode_median_ms / the first variant's
    kernels: str = ""  # Transformer.kernel_summary: dtype, device, native, packed or plain matmuls

    @property
    def decode_tokens_per_s(self) -> float:
        """Batch-1 decode speed: tokens per second at the median latency."""
        return 1000 / self.decode_median_ms


@dataclass
class BenchReport:
    """The measured variants plus what is needed to compare them with another run."""

    variants: list[VariantResult]
    settings: dict[str, Any]
    environment: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Variant:
    """One thing to measure: a loaded model at one routing threshold (models are shared between dial settings)."""

    name: str
    checkpoint: str
    model: Transformer
    threshold: float | None  # the dial; None: as trained

    @property
    def routing_threshold(self) -> float | None:
        """The threshold this variant routes with; None for routers without one or with one per layer."""
        if self.threshold is not None:
            return self.threshold
        trained = set(self.model.trained_thresholds())
        return trained.pop() if len(trained) == 1 else None


@dataclass
class Samples:
    """Raw measurements of one variant, accumulated over the interleaved rounds."""

    step_seconds: list[float] = field(default_factory=list)
    prefill_tokens_per_s: list[float] = field(default_factory=list)
    batch_tokens_per_s: dict[int, list[float]] = field(default_factory=dict)
    router_seconds: float = 0.0  # time in the routers during the probed runs ...
    probed_seconds: float = 0.0  # ... out of this much decode time
    k_sum_per_layer: np.ndarray | None = None
    routed_tokens: int = 0
    cuda_peak_bytes: int = 0
    rss_peak_bytes: int = 0


@dataclass(frozen=True)
class DecodeRun:
    """Timings of one prefill and of the timed decode steps after it."""

    prefill_seconds: float
    step_seconds: list[float]


@dataclass(frozen=True)
class Workload:
    """The same held-out token windows for every variant: one batch-1 window per round, one batch per size."""

    single_rows: torch.Tensor  # (repeats, prompt_tokens + WARMUP_STEPS + decode_tokens)
    batches: dict[int, torch.Tensor]  # batch size -> (B, batch_prompt_tokens + WARMUP_STEPS + decode_tokens)
    prompt_tokens: int
    batch_prompt_tokens: int


def bytes_per_token(model: Transformer, mean_k_per_layer: Sequence[float]) -> int:
    """Bytes of weights one decoded token reads: an embedding row, all non-expert weights, mean k experts per MoE layer."""
    moe_layers = [block.ffn for block in model.layers if isinstance(block.ffn, MoE)]
    if len(mean_k_per_layer) != len(moe_layers):
        raise ValueError(f"need one mean k per MoE layer ({len(moe_layers)}), got {len(mean_k_per_layer)}")
    expert_weights = {id(p) for moe in moe_layers for p in moe.experts.parameters()}
    embedding = model.tok_embeddings.weight
    # With tied embeddings the head reads the whole table that the embedding reads one row of.
    total = float(embedding[0].nbytes + (embedding.nbytes if model.output is None else 0))
    for name, param in model.named_parameters():
        if name != "tok_embeddings.weight" and id(param) not in expert_weights:
            total += param.nbytes
    for moe, mean_k in zip(moe_layers, mean_k_per_layer):
        total += mean_k * sum(stacked[0].nbytes for stacked in moe.experts.parameters())  # one expert's slices
    return round(total)


def cost_per_million(price_per_hour: float, seconds_per_token: float) -> float:
    """USD per million output tokens at a machine price and a time per token."""
    return price_per_hour / 3600 * seconds_per_token * 1e6


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a host clock measures it; nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RouterProbe:
    """Forward hooks on every router that, while `active`, time the routing and count experts per layer."""

    def __init__(self, model: Transformer) -> None:
        routers = model.routers()
        self.device = model.tok_embeddings.weight.device
        self.active = False
        self.seconds = 0.0
        self.tokens = 0  # tokens routed per layer
        self.k_sum_L = torch.zeros(len(routers), dtype=torch.long, device=self.device)  # on device: no sync per step
        self._started = 0.0
        self._handles = [hook for layer, router in enumerate(routers) for hook in (
            router.register_forward_pre_hook(self._before), router.register_forward_hook(partial(self._after, layer)))]

    def _before(self, module: torch.nn.Module, args: tuple) -> None:
        if self.active:
            synchronize(self.device)  # charge the attention's queued GPU work to the attention, not the router
            self._started = time.perf_counter()

    def _after(self, layer: int, module: torch.nn.Module, args: tuple, routing: Routing) -> None:
        if self.active:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self._started
            self.k_sum_L[layer] += routing.k_T.sum()
            self.tokens += routing.k_T.numel() if layer == 0 else 0

    def __enter__(self) -> "RouterProbe":
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


def timed_decode(model: Transformer, prompt_BT: torch.Tensor, inputs_BN: torch.Tensor, warmup: int = WARMUP_STEPS,
                 probe: RouterProbe | None = None, dial: Dial = None) -> DecodeRun:
    """Prefill the prompts (timed), then feed one column of inputs_BN per decode step, timing all but the first `warmup`;
    every row routes at `dial` (None: as trained)."""
    B, P = prompt_BT.shape
    device = prompt_BT.device
    thresholds_BL = model.routing_thresholds([dial] * B)
    model.setup_caches(B, P + inputs_BN.shape[1])
    try:
        synchronize(device)
        started = time.perf_counter()
        prefill(model, prompt_BT, torch.full((B,), P, device=device), thresholds_BL)
        synchronize(device)
        prefill_seconds = time.perf_counter() - started
        steps = []
        for i in range(inputs_BN.shape[1]):
            if probe is not None:
                probe.active = i >= warmup
            started = time.perf_counter()
            decode_one_token(model, inputs_BN[:, i:i + 1], torch.full((B, 1), P + i, device=device), GREEDY,
                             thresholds_BL=thresholds_BL)
            synchronize(device)
            if i >= warmup:
                steps.append(time.perf_counter() - started)
    finally:
        if probe is not None:
            probe.active = False
        model.clear_caches()
    return DecodeRun(prefill_seconds, steps)


def token_windows(tokens_by_domain: dict[str, np.ndarray], count: int, length: int, device: torch.device) -> torch.Tensor:
    """(count, length) windows of held-out text, taken from the domains in turn."""
    domains = list(tokens_by_domain.values())
    rows = []
    for i in range(count):
        start = (i // len(domains)) * length
        rows.append(np.resize(np.asarray(domains[i % len(domains)]), start + length)[start:])  # resize repeats short text
    return torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)


def build_workload(tokens_by_domain: dict[str, np.ndarray], settings: BenchSettings, context: int,
                   device: torch.device) -> Workload:
    """Prompts and teacher-forced decode inputs that fit the smallest context among the models."""
    room = context - WARMUP_STEPS - settings.decode_tokens
    if room < 1:
        raise DynamoeError(f"decode_tokens={settings.decode_tokens} plus {WARMUP_STEPS} warm-up steps leave no room for a "
                           f"prompt in a context of {context} tokens; lower --decode-tokens")
    prompt, batch_prompt = min(settings.prompt_tokens, room), min(BATCH_PROMPT_TOKENS, room)
    steps = WARMUP_STEPS + settings.decode_tokens
    return Workload(token_windows(tokens_by_domain, settings.repeats, prompt + steps, device),
                    {b: token_windows(tokens_by_domain, b, batch_prompt + steps, device) for b in settings.batch_sizes},
                    prompt, batch_prompt)


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kibibytes


def measure_round(variant: Variant, workload: Workload, round_index: int, samples: Samples) -> None:
    """One interleaved round of one variant: batch-1 prefill and decode under the router probe, then batched decode."""
    model, device, dial = variant.model, variant.model.tok_embeddings.weight.device, variant.threshold
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = workload.single_rows[round_index:round_index + 1]
    P = workload.prompt_tokens
    run = timed_decode(model, row[:, :P], row[:, P:], dial=dial)
    samples.step_seconds += run.step_seconds
    samples.prefill_tokens_per_s.append(P / run.prefill_seconds)
    # The router share and k come from a second, identical run under the probe: its hooks cost time on
    # every layer, which would inflate every variant's latency alike and pull the ratios towards 1. It
    # runs eagerly and unfused: module hooks fire neither inside a compiled graph nor in the native
    # kernel's fused step (which Transformer skips while a router has hooks).
    compiled, model.compiled_decode = model.compiled_decode, None
    try:
        with RouterProbe(model) as probe:
            probed = timed_decode(model, row[:, :P], row[:, P:], probe=probe, dial=dial)
    finally:
        model.compiled_decode = compiled
    samples.router_seconds += probe.seconds
    samples.probed_seconds += sum(probed.step_seconds)
    k_sum = probe.k_sum_L.cpu().numpy().astype(np.float64)
    samples.k_sum_per_layer = k_sum if samples.k_sum_per_layer is None else samples.k_sum_per_layer + k_sum
    samples.routed_tokens += probe.tokens
    Pb = workload.batch_prompt_tokens
    for batch_size, rows in workload.batches.items():
        steps = timed_decode(model, rows[:, :Pb], rows[:, Pb:], dial=dial).step_seconds
        samples.batch_tokens_per_s.setdefault(batch_size, []).append(batch_size * len(steps) / sum(steps))
    if device.type == "cuda":
        samples.cuda_peak_bytes = max(samples.cuda_peak_bytes, torch.cuda.max_memory_allocated(device))
    samples.rss_peak_bytes = peak_rss_bytes()


def summarize(variant: Variant, samples: Samples, report: EvalReport, settings: BenchSettings) -> VariantResult:
    """A variant's result from its raw samples and evaluation (ratios still 1; see `with_ratios`)."""
    model = variant.model
    routers = model.routers()
    mean_k_per_layer = (samples.k_sum_per_layer / max(samples.routed_tokens, 1)).tolist() if routers else []
    steps = np.asarray(samples.step_seconds)
    median_s = float(np.median(steps))
    batched_s = {b: float(np.median(v)) for b, v in samples.batch_tokens_per_s.items()}
    largest = max(batched_s)
    return VariantResult(
        name=variant.name, checkpoint=variant.checkpoint,
        router=model.config.router if routers else "dense",
        threshold=variant.routing_threshold,
        perplexity=report.total.perplexity,
        perplexity_per_domain={d.domain: d.perplexity for d in report.domains},
        eval_mean_k=report.total.mean_k,
        decode_median_ms=median_s * 1e3, decode_p95_ms=float(np.percentile(steps, 95)) * 1e3, decode_steps=len(steps),
        decode_mean_k=float(np.mean(mean_k_per_layer)) if routers else None, decode_mean_k_per_layer=mean_k_per_layer,
        router_share=samples.router_seconds / samples.probed_seconds if routers else None,
        prefill_tokens_per_s=float(np.median(samples.prefill_tokens_per_s)),
        batch_tokens_per_s={str(b): v for b, v in batched_s.items()},
        cost_per_million_batch1=cost_per_million(settings.price_per_hour, median_s),
        cost_per_million_batched=cost_per_million(settings.price_per_hour, 1 / batched_s[largest]),
        weights_mb=sum(p.nbytes for p in model.parameters()) / MIB,
        cuda_peak_mb=samples.cuda_peak_bytes / MIB if samples.cuda_peak_bytes else None,
        rss_peak_mb=samples.rss_peak_bytes / MIB,
        bytes_per_token=bytes_per_token(model, mean_k_per_layer),
        kernels=model.kernel_summary(),
    )


def with_ratios(results: list[VariantResult]) -> list[VariantResult]:
    """Ideal (bytes read) and measured (median latency) ratios of each variant to the first."""
    first = results[0]
    return [replace(r, ideal_latency_ratio=r.bytes_per_token / first.bytes_per_token,
                    measured_latency_ratio=r.decode_median_ms / first.decode_median_ms) for r in results]


def short_names(paths: Sequence[Path]) -> list[str]:
    """Each path's shortest trailing part that tells it apart from the others (runs/a/ckpt-1 vs runs/b/ckpt-1)."""
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = [Path(*p.parts[-depth:]).as_posix() for p in paths]
        if len(set(names)) == len(names):
            return names
    return [p.as_posix() for p in paths]


def make_variants(checkpoints: Sequence[Path], models: Sequence[Transformer], dial: Sequence[float]) -> list[Variant]:
    """One variant per checkpoint, or per dial setting for a checkpoint with a threshold router."""
    if dial and not any(model.dialable for model in models):
        raise DynamoeError("--dial sets the routing threshold of topp and dynamic routers, but none of the checkpoints has "
                           "one; drop --dial or add a topp/dynamic checkpoint")
    variants = []
    for name, checkpoint, model in zip(short_names([Path(c) for c in checkpoints]), checkpoints, models):
        settings: Sequence[float | None] = dial if dial and model.dialable else [None]
        variants += [Variant(name if t is None else f"{name} @{t:g}", str(checkpoint), model, t) for t in settings]
    return variants


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, machine and threads: what a result must be read with."""
    return {
        "dynamoe": dynamoe.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def run_bench(checkpoints: Sequence[Path], corpus: Path, out: Path, dial: Sequence[float] = (),
              settings: BenchSettings = BenchSettings(), device: str | torch.device = "auto",
              progress: bool = True, compile_decode: bool = False, pack: bool = True,
              dtype: torch.dtype | None = None, int8: bool = False) -> BenchReport:
    """Measure every variant in interleaved rounds; write results.json, results.md and the plot to `out`."""
    if not checkpoints:
        raise DynamoeError("bench needs at least one checkpoint")
    for value in dial:
        check_threshold(value)
    check_writable(Path(out), REPORT_BYTES, "the bench report")  # before the measurements, not after
    torch_device = resolve_device(device) if isinstance(device, str) else device
    for checkpoint in checkpoints:
        check_same_tokenizer(checkpoint, corpus, "pass the corpus it was trained on with --corpus")
    models = [load_model(checkpoint, device=torch_device, pack=pack, dtype=dtype, int8=int8)[0] for checkpoint in checkpoints]
    if compile_decode:  # compiled during the warm-up round, whose samples are dropped
        for model in models:
            model.compile_decode()
    variants = make_variants(checkpoints, models, dial)
    tokens = split_tokens_by_domain(corpus, "test")
    workload = build_workload(tokens, settings, min(m.config.max_seq_len for m in models), torch_device)

    samples = [Samples() for _ in variants]
    reports: list[EvalReport] = []
    with tqdm(total=len(variants) * (settings.repeats + 2), desc="bench", disable=not progress) as bar:
        for variant in variants:
            bar.set_postfix_str(f"eval {variant.name}")
            reports.append(evaluate_tokens(variant.model, tokens, max_tokens=settings.eval_tokens, progress=False,
                                           dial=variant.threshold))
            bar.update()
        # Round -1 is a warm-up whose samples are dropped; then every round visits every variant in turn.
        for round_index in range(-1, settings.repeats):
            label = f"round {round_index + 1}" if round_index >= 0 else "warm-up"
            for variant, sample in zip(variants, samples):
                bar.set_postfix_str(f"{label} {variant.name}")
                measure_round(variant, workload, max(round_index, 0), sample if round_index >= 0 else Samples())
                bar.update()

    results = with_ratios([summarize(v, s, r, settings) for v, s, r in zip(variants, samples, reports)])
    report = BenchReport(results, {**asdict(settings), "dial": list(dial), "corpus": str(corpus),
                                   "prompt_tokens": workload.prompt_tokens, "warmup_steps": WARMUP_STEPS,
                                   "compile_decode": compile_decode, "pack": pack or int8, "dtype": str(dtype or torch.float32),
                                   "int8_weights": int8},
                         environment(torch_device))
    write_outputs(report, Path(out))
    return report


def write_outputs(report: BenchReport, out: Path) -> None:
    """results.json, results.md and latency_vs_perplexity.png in `out`."""
    with writing(out, "the bench report"):
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULTS_JSON).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (out / RESULTS_MD).write_text(markdown_report(report))
        plot_latency_vs_perplexity(report.variants, out / PLOT_PNG)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table_columns(results: list[VariantResult]) -> list[tuple[str, Callable[[VariantResult], str]]]:
    """Header and cell function of each column of the results table."""
    domains = list(results[0].perplexity_per_domain)
    batches = list(results[0].batch_tokens_per_s)
    on_cuda = results[0].cuda_peak_mb is not None
    return [
        ("variant", lambda r: r.name),
        ("threshold", lambda r: _fmt(r.threshold, "g")),
        ("ppl", lambda r: _fmt(r.perplexity, ".2f")),
        *[(f"ppl {d}", lambda r, d=d: _fmt(r.perplexity_per_domain.get(d), ".2f")) for d in domains],
        ("k eval", lambda r: _fmt(r.eval_mean_k, ".2f")),
        ("k decode", lambda r: _fmt(r.decode_mean_k, ".2f")),
        ("ms/token p50", lambda r: _fmt(r.decode_median_ms, ".3f")),
        ("tok/s b1", lambda r: _fmt(r.decode_tokens_per_s, ".0f")),
        ("p95", lambda r: _fmt(r.decode_p95_ms, ".3f")),
        ("measured ratio", lambda r: _fmt(r.measured_latency_ratio, ".3f")),
        ("ideal ratio", lambda r: _fmt(r.ideal_latency_ratio, ".3f")),
        ("router share", lambda r: _fmt(r.router_share, ".1%")),
        ("prefill tok/s", lambda r: _fmt(r.prefill_tokens_per_s, ".0f")),
        *[(f"b{b} tok/s", lambda r, b=b: _fmt(r.batch_tokens_per_s.get(b), ".0f")) for b in batches],
        ("$/M tok b1", lambda r: _fmt(r.cost_per_million_batch1, ".4f")),
        (f"$/M tok b{max(batches, key=int)}", lambda r: _fmt(r.cost_per_million_batched, ".4f")),
        ("weights MB", lambda r: _fmt(r.weights_mb, ".1f")),
        ("CUDA peak MB" if on_cuda else "RSS peak MB", lambda r: _fmt(r.cuda_peak_mb if on_cuda else r.rss_peak_mb, ".0f")),
    ]


def markdown_table(results: list[VariantResult]) -> str:
    """One Markdown row per variant."""
    columns = table_columns(results)
    lines = ["| " + " | ".join(header for header, _ in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in results]
    return "\n".join(lines)


def kernels_line(results: list[VariantResult]) -> str:
    """One line naming the kernels each checkpoint decoded on (a latency means little without them)."""
    kernels = {r.checkpoint: r.kernels for r in results}
    return "kernels: " + "; ".join(f"{checkpoint}: {summary}" for checkpoint, summary in kernels.items())


def markdown_report(report: BenchReport) -> str:
    """The table with the conditions it was measured under and how to read the ratios."""
    env, settings = report.environment, report.settings
    return (f"# dynamoe bench\n\n{markdown_table(report.variants)}\n\n"
            f"Batch-1 decode over {settings['repeats']} interleaved rounds of {settings['decode_tokens']} teacher-forced "
            f"tokens after a {settings['prompt_tokens']}-token prompt; ratios are relative to the first row. "
            "The ideal ratio is that of the bytes of weights a decoded token reads (embedding row, attention, norms, "
            "router gates, the measured mean k experts per layer, output head). "
            "The router share is timed in a second run through the modules (forward hooks): the native kernel's "
            "fused step routes inside one call with the experts, so for it this is the share of the unfused step. "
            f"Cost at ${settings['price_per_hour']:g}/hour. RSS peak is process-wide (it holds every model).\n\n"
            f"torch {env['torch']}, {env['torch_threads']} threads, {env['device']}"
            f"{' (' + env['gpu'] + ')' if env['gpu'] else ''}, {env['processor']}, {env['platform']}\n\n"
            f"{kernels_line(report.variants)}\n")


def plot_latency_vs_perplexity(results: list[VariantResult], path: Path) -> None:
    """Perplexity against median decode latency: a labelled point per variant, a checkpoint's dial settings joined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5))
    FigureCanvasAgg(figure)  # Agg without pyplot: no global backend state, no display needed
    axes = figure.subplots()
    for checkpoint in dict.fromkeys(r.checkpoint for r in results):
        mine = sorted((r for r in results if r.checkpoint == checkpoint), key=lambda r: r.decode_median_ms)
        axes.plot([r.decode_median_ms for r in mine], [r.perplexity for r in mine], marker="o")
        for r in mine:
            axes.annotate(r.name, (r.decode_median_ms, r.perplexity), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("median batch-1 decode latency (ms/token)")
    axes.set_ylabel("held-out perplexity")
    axes.set_title("quality against latency")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
