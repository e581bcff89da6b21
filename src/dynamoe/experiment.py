"""The headline experiment: dense, static top-k (cold, and warmed up like the adaptive routers) and adaptive
routers trained on the same data, token budget and architecture, over several seeds, measured side by side by
`dynamoe bench`, and a report that answers the project's claim — latency at quality parity — honestly,
whatever it shows: per claim, the paired difference on every seed and whether every seed agrees.

Every model trains into its own run folder (out/seed-S/KEY) and is reused once finished or resumed after a
kill, so an interrupted experiment continues where it stopped. The bench of a seed is reused while it is
newer than all of that seed's models.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dynamoe import runs
from dynamoe.allocation import allocation_markdown, allocation_report
from dynamoe.analyze import analyze_checkpoint
from dynamoe.bench import BenchReport, BenchSettings, VariantResult, environment, run_bench
from dynamoe.config import ModelConfig, dense_warmup_half, preset, with_dense_warmup
from dynamoe.data import build_corpus
from dynamoe.errors import DynamoeError
from dynamoe.train import TrainConfig, model_config_for_data, resolve_device

RESULTS_JSON, SUMMARY_MD = "results.json", "summary.md"
EXPERTS_PNG, LATENCY_PNG, DOMAINS_PNG = "perplexity_vs_experts.png", "perplexity_vs_latency.png", "perplexity_per_domain.png"
PARITY_TOLERANCE = 0.01  # "reaches top-8's perplexity": within 1%
MOE_PAYS = 0.03  # the regime where a MoE pays: static top-8 at least 3% below the dense model of top-2's active size
TARGET_LATENCY_REDUCTION = 0.40  # ... with at least 40% lower batch-1 decode latency
REFERENCE = "top8"  # the model whose perplexity is the bar and whose latency the ratios divide by
ANALYSED = "dynamic-3"  # the model whose routing the report analyses
ADAPTIVE_ROUTERS = ("dynamic", "topp", "relu", "dtopp", "need", "null")  # routers whose k varies per token


@dataclass(frozen=True)
class HeadlineProfile:
    """Corpus, model size, token budget and measurement size of one experiment."""

    name: str
    preset: str
    tokens: int  # training tokens per model (rounded down to whole steps)
    bytes_per_domain: int | None  # corpus size of prose and code (None: all of them)
    vocab_size: int
    batch_size: int
    seq_len: int
    lr: float
    eval_tokens: int  # held-out tokens per domain for perplexity
    decode_tokens: int  # timed batch-1 decode steps per bench round
    repeats: int  # interleaved bench rounds
    batch_sizes: tuple[int, ...]  # batched decode throughput sizes
    dial: tuple[float, ...]  # routing thresholds at which every topp/dynamic model is measured
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields over the preset
    seeds: tuple[int, ...] = (0,)  # what --seeds defaults to
    math_docs: int | None = None  # generated math documents (None: as many bytes as bytes_per_domain)
    # On a GPU, train every model of a seed at once, each in its own process: small models leave most of it idle.
    gpu_parallel: bool = False
    # Warm-up from dense routing over this fraction of the steps: every adaptive router's controller aims at
    # k_max for the first half of it, then its target falls linearly to the model's own over the second half
    # (docs/experiment.md, "Ablations": the lever that closed the gap).
    dense_warmup: float = 0.6
    # Keys of the models to train when --models is not given (None: DEFAULT_KEYS).
    models: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.dense_warmup <= 1.0:  # written so that NaN fails too
            raise DynamoeError(f"--dense-warmup {self.dense_warmup} must be a fraction of the steps in [0, 1] (0: none)")

    @property
    def dense_warmup_steps(self) -> int:
        """Steps of each half of the warm-up: the hold at k_max, then the fall to the target."""
        return dense_warmup_half(self.steps, self.dense_warmup)

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))

    @property
    def warmup_steps(self) -> int:
        return max(1, self.steps // 10)

    @property
    def tokens_per_model(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps": self.steps, "warmup_steps": self.warmup_steps,
                "tokens_per_model": self.tokens_per_model, "dense_warmup_hold_steps": self.dense_warmup_steps,
                "dense_warmup_decay_steps": self.dense_warmup_steps}


# The quick profile leaves out three routers the other profiles train (dynamic-4, top-p, ReLU) to stay under 30
# minutes with three seeds: the static curves both ways, dense, dynamic at 2 and 3, DTop-p and need remain.
QUICK_KEYS = ("top8", "top4", "top2", "top1", "top4-warm", "top2-warm", "top1-warm", "dense", "dynamic-2", "dynamic-3",
              "dtopp-3", "need-2")
# Sized for 2 CPU cores: measured 85 min end to end with two one-thread trainings at a time (docs/experiment.md).
DEFAULT = HeadlineProfile("default", preset="small", tokens=1_000_000, bytes_per_domain=1_500_000, vocab_size=8192,
                          batch_size=8, seq_len=256, lr=3e-3, eval_tokens=8192, decode_tokens=64, repeats=5,
                          batch_sizes=(8,), dial=(0.3, 0.4, 0.5, 0.6, 0.7))
# A narrower small model (dim 128, 2 layers, same experts) on a smaller corpus, three seeds: under 30 minutes.
QUICK = HeadlineProfile("quick", preset="small", tokens=262_144, bytes_per_domain=400_000, vocab_size=2048,
                        batch_size=8, seq_len=128, lr=3e-3, eval_tokens=4096, decode_tokens=32, repeats=3,
                        batch_sizes=(8,), dial=(0.3, 0.5, 0.7), model_overrides={"dim": 128, "n_layers": 2},
                        seeds=(0, 1, 2), models=QUICK_KEYS)
# Where a MoE should pay: small models (small at dim 128, so a dense model of top-2's active size is short of
# capacity) on 32 times the default's tokens, from the whole prose and code corpus and 24 MB of math (about
# 20M training tokens: under two passes). Sized for one H200, every model at once (docs/experiment.md).
GPU = HeadlineProfile("gpu", preset="small", tokens=32 * 2 ** 20, bytes_per_domain=None, vocab_size=8192,
                      batch_size=64, seq_len=256, lr=3e-3, eval_tokens=32_768, decode_tokens=32, repeats=3,
                      batch_sizes=(8,), dial=(0.3, 0.5, 0.7), model_overrides={"dim": 128}, math_docs=28_800,
                      gpu_parallel=True)
PROFILES = {profile.name: profile for profile in (DEFAULT, QUICK, GPU)}


@dataclass(frozen=True)
class HeadlineModel:
    """One model of the experiment: its key (run folder and bench name), title, router settings, and whether it
    warms up from dense routing (the profile's dense_warmup)."""

    key: str
    title: str
    overrides: dict[str, Any]
    warm: bool = False


MODELS = (  # the reference first: bench ratios are relative to the first checkpoint
    HeadlineModel("top8", "static top-8", {"router": "topk", "top_k": 8}),
    HeadlineModel("top4", "static top-4", {"router": "topk", "top_k": 4}),
    HeadlineModel("top2", "static top-2", {"router": "topk", "top_k": 2}),
    HeadlineModel("top1", "static top-1", {"router": "topk", "top_k": 1}),
    # The same schedule as the adaptive routers (k_max, then down to their own k): the fair static baseline.
    HeadlineModel("top4-warm", "static top-4, warmed up", {"router": "topk", "top_k": 4}, warm=True),
    HeadlineModel("top2-warm", "static top-2, warmed up", {"router": "topk", "top_k": 2}, warm=True),
    HeadlineModel("top1-warm", "static top-1, warmed up", {"router": "topk", "top_k": 1}, warm=True),
    HeadlineModel("dense", "dense (active size of top-2)", {"ffn": "dense", "router": "topk", "top_k": 2}),
    HeadlineModel("dynamic-2", "dynamic, target k=2", {"router": "dynamic", "target_k": 2.0}, warm=True),
    HeadlineModel("dynamic-3", "dynamic, target k=3", {"router": "dynamic", "target_k": 3.0}, warm=True),
    HeadlineModel("dynamic-4", "dynamic, target k=4", {"router": "dynamic", "target_k": 4.0}, warm=True),
    HeadlineModel("topp-3", "top-p, target k=3", {"router": "topp", "target_k": 3.0}, warm=True),
    HeadlineModel("relu-3", "ReLU (ReMoE), target k=3", {"router": "relu", "target_k": 3.0}, warm=True),
    HeadlineModel("dtopp-3", "DTop-p, target k=3", {"router": "dtopp", "target_k": 3.0}, warm=True),
    HeadlineModel("need-2", "by need (benefit-supervised k head), target k=2", {"router": "need", "target_k": 2.0}, warm=True),
    HeadlineModel("null-2", "null experts (AdaMoE), target k=2", {"router": "null", "target_k": 2.0}, warm=True),
)
MODEL_KEYS = tuple(model.key for model in MODELS)
# Trained unless --models says otherwise: all but the null-expert router, the allocation design that measured
# worst (docs/need.md).
DEFAULT_KEYS = tuple(key for key in MODEL_KEYS if key != "null-2")


def headline_profile(name: str = "default", preset_name: str | None = None, tokens: int | None = None,
                     dense_warmup: float | None = None) -> HeadlineProfile:
    """A profile by name, with another preset (dropping the profile's narrowing), budget or warm-up."""
    if name not in PROFILES:
        raise DynamoeError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}")
    profile = PROFILES[name]
    if dense_warmup is not None:
        profile = dataclasses.replace(profile, dense_warmup=dense_warmup)
    if preset_name is not None and preset_name != profile.preset:
        profile = dataclasses.replace(profile, preset=preset_name, model_overrides={})
    if tokens is not None:
        if tokens < profile.batch_size * profile.seq_len:
            raise DynamoeError(f"--tokens {tokens} is less than one step of {profile.batch_size}x{profile.seq_len} "
                               f"tokens; give at least {profile.batch_size * profile.seq_len}")
        profile = dataclasses.replace(profile, tokens=tokens)
    return profile


def model_config(model: HeadlineModel, profile: HeadlineProfile, data_dir: Path) -> ModelConfig:
    """The model's config: the profile's preset and overrides, its router settings, the corpus's vocabulary."""
    cfg = preset(profile.preset, **{**profile.model_overrides, "max_seq_len": profile.seq_len, **model.overrides})
    if model.warm:
        cfg = with_dense_warmup(cfg, profile.steps, profile.dense_warmup)
    return model_config_for_data(cfg, data_dir)


def train_config(profile: HeadlineProfile, data_dir: Path, run_dir: Path, seed: int, device: str,
                 progress: bool) -> TrainConfig:
    """How every model of the experiment trains: the same steps, batches, schedule and seed."""
    # Every step logged, so that the training compute counts each step's experts (training_compute).
    return TrainConfig(data_dir=data_dir, out_dir=run_dir, steps=profile.steps, batch_size=profile.batch_size,
                       lr=profile.lr, warmup_steps=profile.warmup_steps, save_every=max(profile.steps // 4, 1),
                       keep_checkpoints=1, eval_every=profile.steps, log_every=1, seed=seed, device=device,
                       progress=progress)


# ----------------------------------------------------------------------------- aggregation and verdict

@dataclass
class Row:
    """One measured variant (a model, or a topp/dynamic model at one dial setting), averaged over seeds."""

    name: str
    model: str  # the model's key
    title: str
    router: str  # "dense" for the dense model
    threshold: float | None
    as_trained: bool  # measured at the routing it was trained with
    mean_k: float | None  # experts/token on the held-out text; None when dense
    perplexity: float
    perplexity_std: float  # over seeds (0 with one seed)
    perplexity_per_domain: dict[str, float]
    latency_ms: float  # median batch-1 decode latency
    latency_ratio: float  # measured, to the reference within each seed's interleaved bench
    ideal_ratio: float  # bytes of weights read per token, to the reference
    seeds: int
    warm: bool = False  # trained with the warm-up from dense routing


def aggregate(reports: dict[int, BenchReport], models: dict[str, ModelConfig]) -> list[Row]:
    """One Row per variant name, in bench order, each number the mean over the seeds of `reports`."""
    by_name: dict[str, list[VariantResult]] = {}
    for report in reports.values():
        for variant in report.variants:
            by_name.setdefault(variant.name, []).append(variant)
    titles = {model.key: model.title for model in MODELS}
    rows = []
    for name, results in by_name.items():
        key = Path(results[0].checkpoint).name
        cfg = models[key]
        perplexities = np.array([r.perplexity for r in results])
        domains = results[0].perplexity_per_domain
        threshold = results[0].threshold
        trained_threshold = cfg.threshold if cfg.router in ("dynamic", "topp") else None
        rows.append(Row(
            name=name, model=key, title=titles.get(key, key), router=results[0].router, threshold=threshold,
            as_trained=threshold is None or threshold == trained_threshold,
            mean_k=None if results[0].eval_mean_k is None else float(np.mean([r.eval_mean_k for r in results])),
            perplexity=float(perplexities.mean()), perplexity_std=float(perplexities.std(ddof=1)) if len(results) > 1 else 0.0,
            perplexity_per_domain={d: float(np.mean([r.perplexity_per_domain[d] for r in results])) for d in domains},
            latency_ms=float(np.mean([r.decode_median_ms for r in results])),
            latency_ratio=float(np.mean([r.measured_latency_ratio for r in results])),
            ideal_ratio=float(np.mean([r.ideal_latency_ratio for r in results])), seeds=len(results),
            warm=cfg.target_k_hold_steps + cfg.target_k_decay_steps > 0))
    return rows


def static_rows(rows: Sequence[Row], warm: bool) -> list[Row]:
    """The static models of one curve: the cold ones, or the warmed-up ones with top-8 (whose warm-up from
    k_max = 8 would change nothing)."""
    return [row for row in rows if row.router == "topk" and (row.warm == warm or row.model == REFERENCE)]


def static_curve(rows: Sequence[Row], warm: bool) -> list[tuple[float, float]]:
    """(mean k, perplexity) of one static curve's models, sorted by k."""
    return sorted((row.mean_k, row.perplexity) for row in static_rows(rows, warm) if row.mean_k)


def static_perplexity_at(rows: Sequence[Row], mean_k: float, warm: bool = False) -> float | None:
    """The static top-k curve's perplexity at a mean k: log-perplexity interpolated linearly in log2 k.

    None outside the measured static k range, or with fewer than two static models.
    """
    static = static_curve(rows, warm)
    if len(static) < 2 or not static[0][0] <= mean_k <= static[-1][0]:
        return None
    log_k = np.log2([k for k, _ in static])
    return float(np.exp(np.interp(math.log2(mean_k), log_k, np.log([p for _, p in static]))))


def margin_to(perplexity: float, reference: float | None) -> float | None:
    """perplexity / reference - 1 (negative: better than the reference); None without a reference."""
    return None if reference is None else perplexity / reference - 1


@dataclass
class EqualComputeComparison:
    """An adaptive variant against the static curves at its own mean experts/token."""

    name: str
    mean_k: float
    perplexity: float
    static_perplexity: float | None  # the cold static curve; None: its mean k lies outside the static k range
    margin: float | None  # perplexity / static - 1; negative means better than static top-k
    warm_static_perplexity: float | None  # the same against the static models warmed up like the adaptive ones
    warm_margin: float | None

    def judged_margin(self, warm: bool) -> float | None:
        """The margin to the warm or the cold static curve."""
        return self.warm_margin if warm else self.margin


@dataclass
class Verdict:
    """The claim tested: a dynamic variant within 1% of top-8's perplexity, at least 40% faster, and better
    than static top-k at equal mean experts/token (the warmed-up static curve when it was trained)."""

    reference: str | None  # None: static top-8 was not part of the experiment
    reference_perplexity: float | None
    fastest_at_parity: str | None  # fastest dynamic variant within PARITY_TOLERANCE of the reference
    latency_reduction_at_parity: float | None  # 1 - its latency ratio
    closest: str | None  # the dynamic variant of lowest perplexity
    closest_gap: float | None  # its perplexity / the reference's - 1
    closest_latency_reduction: float | None
    equal_compute: list[EqualComputeComparison]  # every adaptive variant
    equal_compute_warm: bool  # judged against the warmed-up static curve (False: the cold one, no warm models)
    parity_met: bool
    latency_met: bool
    equal_compute_met: bool | None  # every as-trained dynamic model below the judged curve; None: none comparable

    @property
    def target_met(self) -> bool:
        return self.parity_met and self.latency_met and bool(self.equal_compute_met)


def reference_row(rows: Sequence[Row]) -> Row | None:
    """Static top-8's row, the bar of quality and the unit of latency; None when it was left out."""
    return next((row for row in rows if row.model == REFERENCE and row.router == "topk"), None)


def equal_compute(rows: Sequence[Row]) -> list[EqualComputeComparison]:
    """Every adaptive variant against both static curves at its own mean k."""
    comparisons = []
    for row in rows:
        if row.router in ADAPTIVE_ROUTERS and row.mean_k is not None:
            cold, warm = (static_perplexity_at(rows, row.mean_k, warm) for warm in (False, True))
            comparisons.append(EqualComputeComparison(row.name, row.mean_k, row.perplexity, cold,
                                                      margin_to(row.perplexity, cold), warm, margin_to(row.perplexity, warm)))
    return comparisons


def verdict(rows: Sequence[Row]) -> Verdict:
    """Test the headline claim on the aggregated rows."""
    reference = reference_row(rows)
    dynamic = [row for row in rows if row.router == "dynamic"]
    equal = equal_compute(rows)
    warm = len(static_curve(rows, warm=True)) >= 2
    trained_dynamic = {row.name for row in dynamic if row.as_trained}
    judged = [c.judged_margin(warm) for c in equal if c.name in trained_dynamic and c.judged_margin(warm) is not None]
    equal_met = all(margin < 0 for margin in judged) if judged else None
    if reference is None or not dynamic:
        return Verdict(None, None, None, None, None, None, None, equal, warm, False, False, equal_met)
    # Ratios are measured against the first bench variant, which is the reference when it is present.
    at_parity = [row for row in dynamic if row.perplexity <= reference.perplexity * (1 + PARITY_TOLERANCE)]
    fastest = min(at_parity, key=lambda row: row.latency_ratio, default=None)
    closest = min(dynamic, key=lambda row: row.perplexity)
    reduction = None if fastest is None else 1 - fastest.latency_ratio
    return Verdict(
        reference=reference.name, reference_perplexity=reference.perplexity,
        fastest_at_parity=None if fastest is None else fastest.name, latency_reduction_at_parity=reduction,
        closest=closest.name, closest_gap=closest.perplexity / reference.perplexity - 1,
        closest_latency_reduction=1 - closest.latency_ratio, equal_compute=equal, equal_compute_warm=warm,
        parity_met=fastest is not None, latency_met=reduction is not None and reduction >= TARGET_LATENCY_REDUCTION,
        equal_compute_met=equal_met)


def curve_name(warm: bool) -> str:
    """How the report names the static curve a comparison is judged against."""
    return "warmed-up static top-k" if warm else "static top-k (no warm-up)"


def verdict_lines(result: Verdict, seeds: int = 1) -> list[str]:
    """The verdict in plain sentences, with the shortfall when the target is missed."""
    if result.reference is None:
        return ["No verdict: static top-8 and a dynamic model must both be part of the experiment."]
    lines = []
    if result.fastest_at_parity is not None:
        lines.append(f"Quality parity (within {PARITY_TOLERANCE:.0%} of {result.reference}'s perplexity "
                     f"{result.reference_perplexity:.2f}): reached by {result.fastest_at_parity}, with "
                     f"{result.latency_reduction_at_parity:.1%} lower batch-1 decode latency "
                     f"(target: at least {TARGET_LATENCY_REDUCTION:.0%}: {'met' if result.latency_met else 'missed'}).")
    else:
        lines.append(f"Quality parity not reached: the best dynamic variant, {result.closest}, has a perplexity "
                     f"{result.closest_gap:+.1%} from {result.reference}'s {result.reference_perplexity:.2f} "
                     f"(allowed: +{PARITY_TOLERANCE:.0%}), at {result.closest_latency_reduction:.1%} lower latency.")
    margins = [c.judged_margin(result.equal_compute_warm) for c in result.equal_compute]
    margins = [m for m in margins if m is not None]
    if margins:
        trained = {True: "all do so", False: "do not all do so",
                   None: "have a mean k outside the static range"}[result.equal_compute_met]
        lines.append(f"Equal compute: {sum(m < 0 for m in margins)} of {len(margins)} adaptive variants have a lower "
                     f"perplexity than the {curve_name(result.equal_compute_warm)} curve at their own mean "
                     f"experts/token; the dynamic models at their trained threshold {trained}.")
    on = f" on the means of {seeds} seeds (per seed: the claims below)" if seeds > 1 else " on one seed"
    lines.append(f"Headline target {'MET' if result.target_met else 'NOT met'}{on}.")
    return lines


OFF_TARGET_TOLERANCE = 0.25  # a trained adaptive model whose held-out mean k is this far from its target is flagged


def context_lines(rows: Sequence[Row], target_k: dict[str, float | None]) -> list[str]:
    """What the verdict leaves out: the other models at quality parity, and adaptive models far from their target k."""
    reference = reference_row(rows)
    lines = []
    if reference is not None:
        others = [row for row in rows if row.router != "dynamic" and row is not reference
                  and row.perplexity <= reference.perplexity * (1 + PARITY_TOLERANCE)]
        if others:
            lines.append(f"Also within {PARITY_TOLERANCE:.0%} of {reference.name}'s perplexity: " + ", ".join(
                f"{row.name} ({row.perplexity:.2f}, {1 - row.latency_ratio:.1%} lower latency)" for row in others) + ".")
    for row in rows:
        target = target_k.get(row.model)
        if row.router not in ADAPTIVE_ROUTERS or not row.as_trained or not target or row.mean_k is None:
            continue
        if abs(row.mean_k / target - 1) > OFF_TARGET_TOLERANCE:
            lines.append(f"Off target: {row.name} runs {row.mean_k:.2f} experts/token on the held-out text against "
                         f"its target of {target:g}.")
    return lines


def report_lines(results: dict[str, Any], rows: Sequence[Row], result: Verdict) -> list[str]:
    """The verdict's sentences, then its context: other models at parity, adaptive models off their target."""
    target_k = {key: model["config"].get("target_k") for key, model in results["models"].items()}
    return verdict_lines(result, len(results["seeds"])) + context_lines(rows, target_k)


# ----------------------------------------------------------------------------- claims, seed by seed

@dataclass
class Claim:
    """One claim of the report tested on every seed: the paired difference (margin) on each, and whether it holds."""

    statement: str
    margins: dict[int, float | None]  # seed -> margin; None where the seed cannot measure it
    bound: float  # the claim holds on a seed whose margin is below the bound (at most the bound when inclusive)
    inclusive: bool = False

    def holds_on(self, seed: int) -> bool:
        margin = self.margins[seed]
        return margin is not None and (margin <= self.bound if self.inclusive else margin < self.bound)

    @property
    def seeds_agreeing(self) -> int:
        return sum(self.holds_on(seed) for seed in self.margins)

    @property
    def established(self) -> bool:
        """True only when the claim holds on every seed."""
        return bool(self.margins) and self.seeds_agreeing == len(self.margins)

    @property
    def mean_sd(self) -> tuple[float | None, float | None]:
        """Mean and standard deviation of the margins over the seeds that measured one (sd 0 for one seed)."""
        known = [m for m in self.margins.values() if m is not None]
        if not known:
            return None, None
        return float(np.mean(known)), float(np.std(known, ddof=1)) if len(known) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        mean, sd = self.mean_sd
        return {**asdict(self), "margins": {str(seed): m for seed, m in self.margins.items()}, "mean": mean, "sd": sd,
                "seeds_agreeing": self.seeds_agreeing, "established": self.established}


def row_named(rows: Sequence[Row], name: str) -> Row | None:
    """The row of a variant name, if the seed measured it."""
    return next((row for row in rows if row.name == name), None)


def seed_claims(rows_by_seed: dict[int, list[Row]], result: Verdict, target_k: dict[str, float | None]) -> list[Claim]:
    """The report's claims tested seed by seed, on the variants the verdict (on the means) names.

    - regime: static top-8 at least 3% below the dense model (a MoE pays at this scale);
    - parity: the verdict's dynamic variant (the fastest at parity, else the closest) within 1% of top-8;
    - equal compute: each dynamic model at its trained threshold below the static curve the verdict judges by,
      drawn through that seed's own static models at the model's own mean k;
    - DTop-p: each dynamic model better than the DTop-p model aimed at the same target k.
    """
    claims = []
    seeds_rows = list(rows_by_seed.values())
    dense = next((row.name for row in seeds_rows[0] if row.router == "dense"), None) if seeds_rows else None
    if result.reference is not None and dense is not None:
        claims.append(Claim(f"{result.reference} at least {MOE_PAYS:.0%} below {dense} (a MoE pays)",
                            {seed: paired_margin(rows, result.reference, dense) for seed, rows in rows_by_seed.items()},
                            -MOE_PAYS, inclusive=True))
    subject = result.fastest_at_parity or result.closest
    if result.reference is not None and subject is not None:
        claims.append(Claim(f"{subject} within {PARITY_TOLERANCE:.0%} of {result.reference}",
                            {seed: paired_margin(rows, subject, result.reference) for seed, rows in rows_by_seed.items()},
                            PARITY_TOLERANCE, inclusive=True))
    trained = [row for row in seeds_rows[0] if row.as_trained] if seeds_rows else []
    curve = curve_name(result.equal_compute_warm)
    for row in (row for row in trained if row.router == "dynamic"):
        claims.append(Claim(f"{row.name} below the {curve} curve at its own experts/token",
                            {seed: curve_margin(rows, row.name, result.equal_compute_warm) for seed, rows in rows_by_seed.items()},
                            0.0))
    for dtopp in (row for row in trained if row.router == "dtopp"):
        for dynamic in (row for row in trained if row.router == "dynamic" and target_k.get(row.model) == target_k.get(dtopp.model)):
            claims.append(Claim(f"{dynamic.name} better than {dtopp.name} (the same target k)",
                                {seed: paired_margin(rows, dynamic.name, dtopp.name) for seed, rows in rows_by_seed.items()},
                                0.0))
    return claims


def paired_margin(rows: Sequence[Row], name: str, reference: str) -> float | None:
    """A variant's perplexity against another's within one seed; None if the seed lacks either."""
    row, other = row_named(rows, name), row_named(rows, reference)
    return None if row is None or other is None else row.perplexity / other.perplexity - 1


def curve_margin(rows: Sequence[Row], name: str, warm: bool) -> float | None:
    """A variant's perplexity against one seed's static curve at its mean k; None off the curve or without the variant."""
    row = row_named(rows, name)
    if row is None or row.mean_k is None:
        return None
    return margin_to(row.perplexity, static_perplexity_at(rows, row.mean_k, warm))


def claim_lines(claims: Sequence[Claim]) -> str:
    """The claims as a markdown table: margin per seed, mean ± sd, seeds agreeing, established or not."""
    if not claims:
        return "No claims to test: they need static top-8 and a dynamic model."
    seeds = list(claims[0].margins)
    lines = [f"| claim | {' | '.join(f'seed {seed}' for seed in seeds)} | mean ± sd | seeds agreeing | status |",
             "|---|" + "---:|" * (len(seeds) + 2) + "---|"]
    for claim in claims:
        mean, sd = claim.mean_sd
        cells = [_percent(claim.margins[seed]) for seed in seeds]
        spread = "–" if mean is None or sd is None else f"{100 * mean:+.1f}% ± {100 * sd:.1f}"
        status = "established" if claim.established else "not established"
        lines.append(f"| {claim.statement} | {' | '.join(cells)} | {spread} | {claim.seeds_agreeing} of {len(seeds)} | {status} |")
    return "\n".join(lines)


def _percent(margin: float | None) -> str:
    return "–" if margin is None else f"{100 * margin:+.1f}%"


# ----------------------------------------------------------------------------- the run

WARM_STATIC = tuple(model.key for model in MODELS if model.warm and model.overrides["router"] == "topk")


def default_models(profile: HeadlineProfile) -> list[str]:
    """The profile's models (DEFAULT_KEYS unless it names its own), less the warmed-up static ones when the profile
    has no warm-up (they would be the cold ones)."""
    keys = DEFAULT_KEYS if profile.models is None else profile.models
    return [key for key in keys if profile.dense_warmup > 0 or key not in WARM_STATIC]


def check_choices(seeds: Sequence[int], models: Sequence[str], profile: HeadlineProfile) -> None:
    """Raise DynamoeError for an empty, repeated or unknown seed or model, or a warmed-up model without a warm-up."""
    if not seeds or len(set(seeds)) != len(seeds) or any(not 0 <= s < 2 ** 32 for s in seeds):
        raise DynamoeError(f"--seeds {' '.join(map(str, seeds))}: give one or more distinct seeds in [0, 2**32)")
    unknown = [m for m in models if m not in MODEL_KEYS]
    if not models or unknown or len(set(models)) != len(models):
        raise DynamoeError(f"--models {' '.join(models)}: give distinct models among {', '.join(MODEL_KEYS)}")
    unwarmed = [m for m in models if m in WARM_STATIC and profile.dense_warmup == 0]
    if unwarmed:
        raise DynamoeError(f"--dense-warmup 0 leaves nothing to warm up: {', '.join(unwarmed)} would be the cold models; "
                           "leave them out of --models")


def bench_or_reuse(checkpoints: list[Path], data_dir: Path, out: Path, dial: Sequence[float], settings: BenchSettings,
                   device: str, progress: bool) -> BenchReport:
    """Run the bench of one seed's models, or reuse its results while they are newer than every model."""
    saved = runs.read_json(out / "results.json") or {}
    wanted = {**asdict(settings), "batch_sizes": list(settings.batch_sizes), "dial": list(dial), "corpus": str(data_dir)}
    del wanted["prompt_tokens"]  # the bench records the prompt it used, shortened to fit the context
    same_settings = {key: saved.get("settings", {}).get(key) for key in wanted} == wanted
    same_models = sorted({v["checkpoint"] for v in saved.get("variants", [])}) == sorted(map(str, checkpoints))
    summaries = [checkpoint / runs.SUMMARY_FILE for checkpoint in checkpoints]
    if same_settings and same_models and all(s.is_file() for s in summaries):
        if (out / "results.json").stat().st_mtime > max(s.stat().st_mtime for s in summaries):
            print(f"[headline] reusing the bench in {out}")
            return BenchReport([VariantResult(**v) for v in saved["variants"]], saved["settings"], saved["environment"])
    return run_bench(checkpoints, data_dir, out, dial=dial, settings=settings, device=device, progress=progress)


def training_cost(cfg: ModelConfig, profile: HeadlineProfile) -> float:
    """Experts per token averaged over the training steps, as planned: what orders the trainings by their length."""
    if cfg.ffn != "moe":
        return float(cfg.top_k)  # the dense baseline has the active size of top-k
    aimed = cfg.top_k if cfg.router == "topk" else cfg.target_k or cfg.k_max
    hold, fall = cfg.target_k_hold_steps, cfg.target_k_decay_steps  # at k_max, then falling linearly to the target
    rest = max(profile.steps - hold - fall, 0)
    return (hold * cfg.k_max + fall * (cfg.k_max + aimed) / 2 + rest * aimed) / max(profile.steps, 1)


def training_compute(run_dir: Path, cfg: ModelConfig, tokens: int) -> dict[str, float]:
    """What a training spent in its feed-forward layers: the mean experts/token over its logged steps (a dense
    model counts its hidden size in experts) and the FLOPs that implies, 6 per weight a token reads (forward and
    backward), over all layers."""
    weights_per_expert = 3 * cfg.dim * cfg.expert_dim  # SwiGLU: gate and up projections, then down
    if cfg.ffn != "moe":
        mean_k, layers = cfg.dense_hidden / cfg.expert_dim, cfg.n_layers
    else:
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]
        mean_k = float(np.mean([r["mean_k"] for r in records if r.get("mean_k") is not None and not r.get("skipped")]))
        layers = cfg.n_layers - len(cfg.dense_layers)
    return {"mean_k": mean_k, "ffn_flops": 6.0 * tokens * layers * mean_k * weights_per_expert}


def run_headline(profile: HeadlineProfile = DEFAULT, seeds: Sequence[int] | None = None, models: Sequence[str] | None = None,
                 out: Path = Path("runs/headline"), data_root: Path = Path("data"), corpus: Path | None = None,
                 device: str = "auto", progress: bool = True, command: str = "", workers: int = 1,
                 threads: int | None = None) -> dict[str, Any]:
    """Train (or reuse) every model for every seed, bench them, analyse one, and write the report folder `out`.

    seeds: None for the profile's; models: None for default_models. workers: trainings at once, each in its own
    process of `threads` CPU threads (see runs.train_jobs).
    """
    seeds = list(profile.seeds if seeds is None else seeds)
    models = default_models(profile) if models is None else models
    check_choices(seeds, models, profile)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    data_dir = corpus or build_corpus(data_root / f"headline-{profile.name}", vocab_size=profile.vocab_size,
                                      bytes_per_domain=profile.bytes_per_domain, math_docs=profile.math_docs, seed=0)
    chosen = [model for model in MODELS if model.key in models]
    configs = {model.key: model_config(model, profile, data_dir) for model in chosen}  # all valid before any training
    timings["corpus_s"] = time.perf_counter() - started

    mark = time.perf_counter()
    keys = [(seed, model) for seed in seeds for model in chosen]
    # Costliest first, so that with several workers no long training starts last while the others sit idle.
    keys.sort(key=lambda key: -training_cost(configs[key[1].key], profile))
    jobs = [runs.TrainingJob(f"{model.title} (seed {seed})", configs[model.key],
                             train_config(profile, data_dir, out / f"seed-{seed}" / model.key, seed, device, progress), "headline")
            for seed, model in keys]
    training: dict[int, dict[str, dict]] = {seed: {} for seed in seeds}
    for (seed, model), summary in zip(keys, runs.train_jobs(jobs, workers, threads)):
        training[seed][model.key] = summary
    timings["training_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    settings = BenchSettings(decode_tokens=profile.decode_tokens, repeats=profile.repeats, eval_tokens=profile.eval_tokens,
                             batch_sizes=profile.batch_sizes)
    has_dial = any(cfg.router in ("dynamic", "topp") and cfg.ffn == "moe" for cfg in configs.values())
    dial = profile.dial if has_dial else ()
    reports = {seed: bench_or_reuse([out / f"seed-{seed}" / m.key for m in chosen], data_dir, out / f"seed-{seed}" / "bench",
                                    dial, settings, device, progress) for seed in seeds}
    timings["bench_s"] = time.perf_counter() - mark

    rows = aggregate(reports, configs)
    result = verdict(rows)
    target_k = {key: cfg.target_k for key, cfg in configs.items()}
    claims = seed_claims({seed: aggregate({seed: report}, configs) for seed, report in reports.items()}, result, target_k)

    mark = time.perf_counter()
    analysed = next((key for key in (ANALYSED, *configs) if key in configs and configs[key].ffn == "moe"), None)
    analysis = None
    if analysed is not None:
        analysis = analyze_checkpoint(out / f"seed-{seeds[0]}" / analysed, data_dir, out / "analysis",
                                      max_tokens=profile.eval_tokens, device=resolve_device(device)).to_dict()
        analysis = {key: analysis[key] for key in ("checkpoint", "mean_k_per_domain", "spearman_k_loss",
                                                   "spearman_k_loss_per_domain", "specialisation_nmi")}
    timings["analysis_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    allocation = allocation_report(out, seeds, list(configs), data_dir, reports, profile.eval_tokens, device)
    timings["allocation_s"] = time.perf_counter() - mark
    wall = time.perf_counter() - started

    results = {
        "experiment": "headline", "command": command, "profile": profile.to_dict(), "seeds": list(seeds),
        "corpus": str(data_dir), "wall_time_s": wall, "timings": timings, "training_workers": workers, "threads": threads,
        "training_wall_time_s_total": sum(s["wall_time_s"] for per_seed in training.values() for s in per_seed.values()),
        "environment": environment(resolve_device(device)),
        "models": {m.key: {"title": m.title, "config": configs[m.key].to_dict(),
                           "training": {str(seed): training[seed][m.key] for seed in seeds},
                           "compute": {str(seed): training_compute(out / f"seed-{seed}" / m.key, configs[m.key],
                                                                   training[seed][m.key]["tokens_seen"]) for seed in seeds}}
                   for m in chosen},
        "rows": [asdict(row) for row in rows], "verdict": {**asdict(result), "target_met": result.target_met},
        "claims": [claim.to_dict() for claim in claims],
        "bench": {str(seed): report.to_dict() for seed, report in reports.items()}, "analysis": analysis,
        "allocation": allocation,
    }
    write_report(results, rows, result, claims, Path(out))
    print("\n" + markdown_rows(rows) + "\n\n" + "\n".join(report_lines(results, rows, result)) + "\n\n" + claim_lines(claims))
    print(f"headline experiment ({profile.name}) finished in {wall:.0f} s; report in {out}/{SUMMARY_MD}")
    return results


# ----------------------------------------------------------------------------- the report

def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_rows(rows: Sequence[Row]) -> str:
    """The headline table: one row per variant."""
    domains = list(rows[0].perplexity_per_domain) if rows else []
    seeds = max((row.seeds for row in rows), default=1)
    header = ["variant", "router", "threshold", "mean k", "ppl" + (" (± sd)" if seeds > 1 else ""),
              *[f"ppl {d}" for d in domains], "ms/token", "latency ratio", "ideal ratio (bytes)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for row in rows:
        ppl = f"{row.perplexity:.2f}" + (f" ± {row.perplexity_std:.2f}" if seeds > 1 else "")
        cells = [row.name + ("" if row.as_trained else " (dial)"), row.router, _fmt(row.threshold, "g"),
                 _fmt(row.mean_k, ".2f"), ppl, *[f"{row.perplexity_per_domain[d]:.2f}" for d in domains],
                 f"{row.latency_ms:.3f}", f"{row.latency_ratio:.3f}", f"{row.ideal_ratio:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_table(results: dict[str, Any]) -> str:
    """Per model and seed: steps, tokens, wall time, tokens/s, validation loss, final k, and the compute spent."""
    lines = ["| model | seed | steps | tokens | wall s | tokens/s | val loss | final k | mean k over training | FFN TFLOPs |",
             "|---|---:|" + "---:|" * 8]
    for key, model in results["models"].items():
        for seed, s in model["training"].items():
            compute = model["compute"][seed]
            lines.append(f"| {key} | {seed} | {s['step']} | {s['tokens_seen']:,} | {s['wall_time_s']:.0f} | "
                         f"{s['tokens_per_s']:.0f} | {_fmt(s['val_loss'], '.4f')} | {_fmt(s['mean_k'], '.2f')} | "
                         f"{compute['mean_k']:.2f} | {compute['ffn_flops'] / 1e12:,.1f} |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], rows: Sequence[Row], result: Verdict, claims: Sequence[Claim], out: Path) -> None:
    """results.json, summary.md and the three plots."""
    out.mkdir(parents=True, exist_ok=True)
    runs.write_json(out / RESULTS_JSON, results)
    plot_perplexity_against(rows, "mean_k", "mean experts per token (held-out text)", out / EXPERTS_PNG)
    plot_perplexity_against(rows, "latency_ms", "median batch-1 decode latency (ms/token)", out / LATENCY_PNG)
    plot_domains(rows, out / DOMAINS_PNG)
    (out / SUMMARY_MD).write_text(summary_markdown(results, rows, result, claims), encoding="utf-8")


def summary_markdown(results: dict[str, Any], rows: Sequence[Row], result: Verdict, claims: Sequence[Claim]) -> str:
    """The report: the table, the verdict, the claims seed by seed, the plots, training, the routing analysis, and
    the conditions."""
    profile, env = results["profile"], results["environment"]
    equal = [f"| {c.name} | {c.mean_k:.2f} | {c.perplexity:.2f} | {_fmt(c.warm_static_perplexity, '.2f')} | "
             f"{_percent(c.warm_margin)} | {_fmt(c.static_perplexity, '.2f')} | {_percent(c.margin)} |"
             for c in result.equal_compute]
    parts = [
        f"# Headline experiment ({profile['name']} profile)\n",
        f"Command: `{results['command'] or 'run_headline(...)'}`  \nWall time: {results['wall_time_s']:.0f} s "
        f"(training {results['timings']['training_s']:.0f} s, bench {results['timings']['bench_s']:.0f} s; the models' own "
        f"training time, reused runs included: {results['training_wall_time_s_total']:.0f} s)\n",
        f"Every model: preset `{profile['preset']}`{' with ' + str(profile['model_overrides']) if profile['model_overrides'] else ''}, "
        f"{profile['steps']} steps of {profile['batch_size']}x{profile['seq_len']} tokens = "
        f"{profile['tokens_per_model']:,} training tokens, seeds {', '.join(map(str, results['seeds']))}. Perplexity on "
        f"{profile['eval_tokens']:,} held-out tokens per domain; latency: batch-1 decode, {profile['repeats']} interleaved "
        f"rounds of {profile['decode_tokens']} tokens, ratios to the first row (static top-8 unless left out) within each seed's bench. "
        f"Rows marked (dial) are a dynamic or top-p model run at another routing threshold than it was trained with.\n",
        markdown_rows(rows) + "\n",
        "\n".join(f"- {line}" for line in report_lines(results, rows, result)) + "\n",
        "Claims seed by seed (the margin is the paired difference of perplexity within each seed; a claim is "
        "established only when it holds on every seed):\n",
        claim_lines(claims) + "\n",
        "Against the static curves at equal experts/token (log-perplexity interpolated in log k; negative margin = "
        "better). Warmed up: top-1/2/4 trained with the adaptive routers' warm-up, and top-8; the verdict judges by "
        f"the {curve_name(result.equal_compute_warm)} curve:\n",
        "| variant | mean k | ppl | warmed-up static at that k | margin | static (no warm-up) at that k | margin |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(equal) + "\n",
        f"![perplexity against experts per token]({EXPERTS_PNG})\n\n![perplexity against decode latency]({LATENCY_PNG})\n\n"
        f"![perplexity per domain]({DOMAINS_PNG})\n",
        "## Training\n\n" + training_table(results) + "\n",
    ]
    if results["analysis"]:
        a = results["analysis"]
        rho = ", ".join(f"{d} {_fmt(v, '.3f')}" for d, v in a["spearman_k_loss_per_domain"].items())
        parts.append(f"## Routing analysis ({a['checkpoint']})\n\nMean experts/token per domain: "
                     + ", ".join(f"{d} {k:.2f}" for d, k in a["mean_k_per_domain"].items())
                     + f". Spearman correlation of a token's experts/token with its own loss: "
                     f"{_fmt(a['spearman_k_loss'], '.3f')} over all tokens; within domains: {rho}. Specialisation, "
                     f"NMI(expert; domain): {_fmt(a['specialisation_nmi'], '.3f')}. Plots and a coloured text sample "
                     "in [analysis/](analysis/).\n")
    if results["allocation"]:
        parts.append(allocation_markdown(results["allocation"]))
    parts.append(f"## Conditions\n\ndynamoe {env['dynamoe']}, torch {env['torch']}, numpy {env['numpy']}, Python "
                 f"{env['python']}; {env['processor']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, "
                 f"device {env['device']}{' (' + env['gpu'] + ')' if env['gpu'] else ''}; {env['platform']}.\n")
    return "\n".join(parts)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)  # Agg without pyplot: no global backend state, no display needed
    return figure


def _x(row: Row, attribute: str) -> float:
    """A row's x: its attribute, with the dense model placed at its active size (top-2's) on the experts axis."""
    value = getattr(row, attribute)
    return 2.0 if value is None else float(value)


def plot_perplexity_against(rows: Sequence[Row], attribute: str, label: str, path: Path) -> None:
    """Perplexity against mean k or latency: both static curves, each adaptive model's dial sweep, dense as a star."""
    figure = _figure(7.5, 5)
    axes = figure.subplots()
    for warm, style, curve in ((False, "k-o", "static top-k"), (True, "k--s", "static top-k, warmed up")):
        static = sorted(static_rows(rows, warm), key=lambda row: _x(row, attribute))
        if static and (not warm or any(row.warm for row in static)):
            axes.plot([_x(r, attribute) for r in static], [r.perplexity for r in static], style, label=curve,
                      alpha=1.0 if warm else 0.5)
    for key in dict.fromkeys(row.model for row in rows if row.router not in ("topk", "dense")):
        mine = sorted((row for row in rows if row.model == key), key=lambda row: _x(row, attribute))
        axes.plot([_x(r, attribute) for r in mine], [r.perplexity for r in mine], marker="o", label=mine[0].title)
    for row in rows:
        if row.router == "dense":
            axes.plot([_x(row, attribute)], [row.perplexity], "r*", markersize=12, label=row.title)
        if row.as_trained or row.router == "topk":
            axes.annotate(row.name, (_x(row, attribute), row.perplexity), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
    reference = reference_row(rows)
    if reference is not None:
        axes.axhline(reference.perplexity * (1 + PARITY_TOLERANCE), color="grey", ls=":", lw=1,
                     label=f"top-8 perplexity + {PARITY_TOLERANCE:.0%}")
        if attribute == "latency_ms":
            axes.axvline(reference.latency_ms * (1 - TARGET_LATENCY_REDUCTION), color="grey", ls="--", lw=1,
                         label=f"top-8 latency - {TARGET_LATENCY_REDUCTION:.0%}")
    axes.set_xlabel(label)
    axes.set_ylabel("held-out perplexity")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_domains(rows: Sequence[Row], path: Path) -> None:
    """Grouped bars: per domain, each model's perplexity at the routing it was trained with (log scale)."""
    trained = [row for row in rows if row.as_trained]
    domains = list(trained[0].perplexity_per_domain) if trained else []
    figure = _figure(max(7.0, 2 + 0.25 * len(trained) * len(domains)), 4.5)
    axes = figure.subplots()
    width = 0.8 / max(len(trained), 1)
    for i, row in enumerate(trained):
        positions = np.arange(len(domains)) + (i - (len(trained) - 1) / 2) * width
        axes.bar(positions, [row.perplexity_per_domain[d] for d in domains], width, label=row.name)
    axes.set_xticks(np.arange(len(domains)), domains)
    axes.set_yscale("log")
    axes.set_ylabel("held-out perplexity (log scale)")
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def command_line(profile_name: str, preset_name: str | None, tokens: int | None, seeds: Sequence[int],
                 models: Sequence[str], out: Path, dense_warmup: float | None = None) -> str:
    """The `dynamoe experiment headline` command that reproduces a run (recorded in the report)."""
    words = ["dynamoe", "experiment", "headline", *(["--profile", profile_name] if profile_name != DEFAULT.name else [])]
    words += [*(["--preset", preset_name] if preset_name else []), *(["--tokens", str(tokens)] if tokens else [])]
    words += ["--dense-warmup", str(dense_warmup)] if dense_warmup is not None else []
    default = profile_name in PROFILES and tuple(models) == tuple(default_models(PROFILES[profile_name]))
    words += ["--seeds", *map(str, seeds), *([] if default else ["--models", *models]), "--out", str(out)]
    return shlex.join(words)

