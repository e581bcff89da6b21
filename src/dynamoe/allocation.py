"""The headline report's section on allocation by need: the need-based routers beside today's confidence-based
dynamic router at the same target, over seeds. Does k follow the benefit of experts (per domain) and the
difficulty of math problems; at what perplexity and decode latency, against the confidence router at equal
experts/token (its dial curve, interpolated at the other model's k); and what a correct answer costs
(static top-k at the same k included)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dynamoe.analyze import NeedAnalysis, RoutingAnalysis, analyze_checkpoint, plot_need
from dynamoe.answers import AnswerReport, LevelScore, run_answers
from dynamoe.bench import BenchReport, VariantResult
from dynamoe.checkpoint import load_config
from dynamoe.train import resolve_device

CONFIDENCE = "dynamic-2"  # today's router: a sharper softmax means fewer experts
COMPARED = (CONFIDENCE, "need-2", "null-2")  # the adaptive models of the section, all aimed at 2 experts/token
STATIC = "top2"  # static top-k at the same experts/token, for the cost per correct answer
SPEARMAN_BAR = 0.3  # asked of Spearman(k, benefit) within every domain
LATENCY_BAR = 0.05  # the allocator may add at most this to batch-1 decode time at equal experts/token
# Held-out math problems per difficulty level, sized like the perplexity evaluation: a problem is about 20 tokens;
# half as many are answered (each answer is a generation).
TOKENS_PER_PROBLEM = 20
NEED_PNG = "k_vs_need.png"


@dataclass
class SeedMeasure:
    """One adaptive model of one seed: its routing against need, and its bench figures as trained."""

    need: NeedAnalysis
    perplexity: float | None  # None: the bench did not measure the model as trained (a dial without its threshold)
    mean_k: float | None  # experts/token on the bench's held-out text
    decode_ms: float | None  # median batch-1 decode latency
    decode_k: float | None  # experts/token while decoding
    confidence_perplexity: float | None  # the confidence router's, on its dial curve at this mean_k (None: outside)
    confidence_ms: float | None  # ... and its decode latency at this decode_k
    spearman_k_loss_per_domain: dict[str, float | None]  # k against the token's own loss, within each domain


def interpolate(points: Sequence[tuple[float, float]], x: float, log: bool) -> float | None:
    """y at x on the curve through the points (in log-log space if `log`); None outside their x range."""
    xs, ys = zip(*sorted(points))
    if not xs[0] <= x <= xs[-1]:
        return None
    if not log:
        return float(np.interp(x, xs, ys))
    return float(np.exp(np.interp(np.log(x), np.log(xs), np.log(ys))))


def model_variants(report: BenchReport, run_dir: Path) -> list[VariantResult]:
    """A checkpoint's variants in a bench report (as trained and at each dial setting)."""
    return [variant for variant in report.variants if Path(variant.checkpoint) == run_dir]


def as_trained(variants: list[VariantResult], run_dir: Path) -> VariantResult | None:
    """The variant that routes as the checkpoint was trained (a dial model's at its trained threshold), if measured."""
    threshold = load_config(run_dir).threshold
    return next((v for v in variants if v.threshold is None or v.threshold == threshold), None)


def seed_measure(analysis: RoutingAnalysis, trained: VariantResult | None, confidence: list[VariantResult]) -> SeedMeasure:
    """A model's figures of one seed, with the confidence router's dial curve read at its experts/token."""
    assert analysis.need is not None
    rho_loss = analysis.spearman_k_loss_per_domain
    if trained is None or trained.eval_mean_k is None or trained.decode_mean_k is None:
        return SeedMeasure(analysis.need, None, None, None, None, None, None, rho_loss)
    quality = [(v.eval_mean_k, v.perplexity) for v in confidence if v.eval_mean_k]
    speed = [(v.decode_mean_k, v.decode_median_ms) for v in confidence if v.decode_mean_k]
    return SeedMeasure(analysis.need, trained.perplexity, trained.eval_mean_k, trained.decode_median_ms,
                       trained.decode_mean_k, interpolate(quality, trained.eval_mean_k, log=True) if quality else None,
                       interpolate(speed, trained.decode_mean_k, log=False) if speed else None, rho_loss)


def allocation_report(out: Path, seeds: Sequence[int], keys: Sequence[str], data_dir: Path,
                      reports: dict[int, BenchReport], eval_tokens: int, device: str) -> dict[str, Any] | None:
    """Measure every compared model of every seed (need analysis, answers) and summarise; None if none was trained."""
    adaptive = [key for key in COMPARED if key in keys]
    if not adaptive:
        return None
    torch_device = resolve_device(device)
    level_problems = max(1, eval_tokens // TOKENS_PER_PROBLEM)
    measures: dict[str, list[SeedMeasure]] = {key: [] for key in adaptive}
    answers: dict[str, list[AnswerReport]] = {}
    for seed in seeds:
        runs = out / f"seed-{seed}"
        confidence = model_variants(reports[seed], runs / CONFIDENCE) if CONFIDENCE in keys else []
        for key in adaptive:
            analysis = analyze_checkpoint(runs / key, data_dir, out / "allocation" / f"seed-{seed}" / key,
                                          max_tokens=eval_tokens, device=torch_device, level_problems=level_problems)
            trained = as_trained(model_variants(reports[seed], runs / key), runs / key)
            measures[key].append(seed_measure(analysis, trained, confidence))
        answered = [key for key in (STATIC, *adaptive) if key in keys]
        for key, report in zip(answered, run_answers([runs / key for key in answered], runs / "answers",
                                                     problems=max(1, level_problems // 2), device=torch_device,
                                                     progress=False)):
            answers.setdefault(key, []).append(report)
    plot_need({key: mean_curves([m.need for m in seed_measures]) for key, seed_measures in measures.items()},
              out / NEED_PNG)
    return {"seeds": list(seeds), "measures": {key: [asdict(m) for m in ms] for key, ms in measures.items()},
            "summary": {key: summarise(ms) for key, ms in measures.items()},
            "answers": {key: answer_summary(reports_) for key, reports_ in answers.items()}}


def mean_of(values: Sequence[float | None]) -> float | None:
    """The mean of the values, None if any is None (a figure undefined on one seed is undefined over them)."""
    return None if any(v is None for v in values) else float(np.mean([v for v in values if v is not None]))


def mean_curves(analyses: Sequence[NeedAnalysis]) -> NeedAnalysis:
    """The first seed's analysis with the plotted curves (k by benefit decile, k per level) averaged over seeds."""
    deciles = [mean_of(c) for c in zip(*(a.mean_k_by_benefit_decile for a in analyses))]
    levels = [float(np.mean(c)) for c in zip(*(a.mean_k_per_level for a in analyses))]
    return dataclasses.replace(analyses[0], mean_k_by_benefit_decile=deciles, mean_k_per_level=levels)


def lowest(values: Sequence[float | None]) -> float | None:
    """The smallest value, None if any is None (a router of constant k has no correlation to rank)."""
    return None if any(v is None for v in values) or not values else min(v for v in values if v is not None)


def summarise(measures: Sequence[SeedMeasure]) -> dict[str, Any]:
    """One model's figures over the seeds: means, and how many seeds meet each bar."""
    needs = [m.need for m in measures]
    domains = list(needs[0].spearman_k_benefit_per_domain)
    per_domain = {d: mean_of([n.spearman_k_benefit_per_domain[d] for n in needs]) for d in domains}
    within = [v for n in needs for v in n.spearman_k_benefit_per_domain.values()]  # every seed and domain
    level_k = mean_curves(needs).mean_k_per_level
    equal_k = [(m.perplexity, m.confidence_perplexity) for m in measures
               if m.perplexity is not None and m.confidence_perplexity is not None]
    speed = [m.decode_ms / m.confidence_ms for m in measures if m.decode_ms is not None and m.confidence_ms]
    return {
        "seeds": len(measures), "mean_k": mean_of([m.mean_k for m in measures]),
        "perplexity": mean_of([m.perplexity for m in measures]),
        "confidence_perplexity_at_k": mean_of([c for _, c in equal_k]) if len(equal_k) == len(measures) else None,
        "seeds_no_worse_than_confidence": sum(p <= c for p, c in equal_k),
        "spearman_k_benefit": mean_of([n.spearman_k_benefit for n in needs]),
        "spearman_k_benefit_per_domain": per_domain,
        "spearman_k_loss_per_domain": {d: mean_of([m.spearman_k_loss_per_domain[d] for m in measures]) for d in domains},
        "spearman_k_benefit_lowest_domain": lowest(list(per_domain.values())),
        "spearman_k_benefit_lowest_seed_and_domain": lowest(within),
        "spearman_benefit_expectation_per_domain": {d: mean_of([n.spearman_benefit_expectation_per_domain.get(d) for n in needs])
                                                for d in domains},
        "top_benefit_budget_share": mean_of([n.top_benefit_budget_share for n in needs]),
        "mean_k_per_level": level_k,
        "k_rises_with_level": all(b > a for a, b in zip(level_k, level_k[1:])) if len(level_k) > 1 else None,
        "seeds_k_rising": sum(bool(n.k_rises_with_level) for n in needs),
        "decode_ms": mean_of([m.decode_ms for m in measures]),
        "decode_time_vs_confidence": float(np.mean(speed)) if len(speed) == len(measures) else None,
    }


def answer_summary(reports: Sequence[AnswerReport]) -> dict[str, Any]:
    """One model's answers pooled over the seeds: accuracy per level and overall, time and cost per correct answer."""
    pooled = [LevelScore(level.level, *(sum(getattr(r.levels[i], f) for r in reports)
                                        for f in ("problems", "correct", "seconds", "generated_tokens", "experts")))
              for i, level in enumerate(reports[0].levels)]
    report = dataclasses.replace(reports[0], levels=pooled)
    return report.to_dict()["summary"]


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def allocation_markdown(section: dict[str, Any]) -> str:
    """The section of summary.md: a table per question, then the acceptance bars in sentences."""
    summary, answers = section["summary"], section["answers"]
    domains = list(next(iter(summary.values()))["spearman_k_benefit_per_domain"])
    lines = [f"## Allocation by need (means over {len(section['seeds'])} seed(s))\n",
             "Benefit of experts to a token: its loss with one expert per layer minus its loss with k_max, the same "
             "model and expert ranking (forced routing). Math difficulty: held-out generated problems per level. "
             f"Per seed and model: allocation/seed-S/MODEL/ (`dynamoe analyze`) and seed-S/answers/.\n",
             "| model | mean k | ppl | confidence router at that k | seeds no worse | Spearman(k, benefit) | "
             + " | ".join(f"within {d}" for d in domains) + " | top-20% benefit's share of experts | k per level 1-5 | "
             "rises (seeds) | decode vs confidence at equal k |",
             "|---|" + "---:|" * (9 + len(domains))]
    for key, s in summary.items():
        versus = ["–"] * 3 if key == CONFIDENCE else [
            _fmt(s["confidence_perplexity_at_k"], ".2f"), f"{s['seeds_no_worse_than_confidence']}/{s['seeds']}",
            _fmt(None if s["decode_time_vs_confidence"] is None else s["decode_time_vs_confidence"] - 1, "+.1%")]
        lines.append(f"| {key} | {_fmt(s['mean_k'], '.2f')} | {_fmt(s['perplexity'], '.2f')} | {versus[0]} | {versus[1]} | "
                     f"{_fmt(s['spearman_k_benefit'], '.3f')} | "
                     + " | ".join(_fmt(s["spearman_k_benefit_per_domain"][d], ".3f") for d in domains)
                     + f" | {_fmt(s['top_benefit_budget_share'], '.1%')} | "
                     + " ".join(f"{k:.2f}" for k in s["mean_k_per_level"])
                     + f" | {'yes' if s['k_rises_with_level'] else 'no'} ({s['seeds_k_rising']}/{s['seeds']}) | {versus[2]} |")
    lines += ["", "Spearman(k, the token's own loss) within each domain, for comparison: " + "; ".join(
        f"{key} " + ", ".join(f"{d} {_fmt(v, '.3f')}" for d, v in s["spearman_k_loss_per_domain"].items())
        for key, s in summary.items()) + "."]
    if answers:
        levels = [key for key in next(iter(answers.values())) if key != "total"]
        lines += ["", "Cost per useful output: greedy answers to held-out math problems (exact match), pooled over seeds; "
                  "cost = price per hour x time to answer (batch 1).\n",
                  "| model | " + " | ".join(f"accuracy, level {lv}" for lv in levels) + " | accuracy | ms/answer | "
                  "$ per 1k correct |", "|---|" + "---:|" * (len(levels) + 3)]
        for key, rows in answers.items():
            cost = rows["total"]["cost_per_correct"]
            lines.append(f"| {key} | " + " | ".join(f"{rows[lv]['accuracy']:.1%}" for lv in levels)
                         + f" | {rows['total']['accuracy']:.1%} | {rows['total']['ms_per_answer']:.1f} | "
                         f"{_fmt(None if cost is None else 1e3 * cost, '.5f')} |")
    lines += ["", f"![mean experts/token by benefit decile and by math difficulty]({NEED_PNG})", ""]
    return "\n".join(lines + [f"- {line}" for line in acceptance_lines(summary)]) + "\n"


def acceptance_lines(summary: dict[str, Any]) -> list[str]:
    """Each need-based model against the bars: Spearman >= 0.3 in every domain, k rising with difficulty, perplexity
    no worse than the confidence router's at equal k, decode time at most 5% above it."""
    lines = []
    for key, s in summary.items():
        if key == CONFIDENCE:
            continue
        worst, ratio = s["spearman_k_benefit_lowest_domain"], s["decode_time_vs_confidence"]
        lines.append(
            f"{key}: Spearman(k, benefit) within every domain >= {SPEARMAN_BAR}: "
            f"{'holds' if worst is not None and worst >= SPEARMAN_BAR else 'does not hold'} on the mean over seeds "
            f"(lowest domain {_fmt(worst, '.3f')}; lowest single seed and domain "
            f"{_fmt(s['spearman_k_benefit_lowest_seed_and_domain'], '.3f')}; for reference, Spearman(benefit, its "
            "expectation under the k_max prediction): " + ", ".join(
                f"{d} {_fmt(v, '.3f')}" for d, v in s["spearman_benefit_expectation_per_domain"].items()) + "). "
            f"k rises with difficulty 1-5: {'holds' if s['k_rises_with_level'] else 'does not hold'} on the mean "
            f"({s['seeds_k_rising']}/{s['seeds']} seeds). Perplexity {_fmt(s['perplexity'], '.2f')} against the confidence "
            f"router's {_fmt(s['confidence_perplexity_at_k'], '.2f')} at equal experts/token: "
            + ("–" if s["confidence_perplexity_at_k"] is None else
               f"{s['perplexity'] / s['confidence_perplexity_at_k'] - 1:+.1%} ({s['seeds_no_worse_than_confidence']}/"
               f"{s['seeds']} seeds no worse)")
            + f". Decode time at equal experts/token: {_fmt(None if ratio is None else ratio - 1, '+.1%')} "
            f"(at most +{LATENCY_BAR:.0%} asked: {'holds' if ratio is not None and ratio <= 1 + LATENCY_BAR else 'does not hold'}).")
    return lines
