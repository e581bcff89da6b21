"""Routing analysis of a checkpoint: how many experts tokens use (per layer, per domain), whether harder
tokens get more of them, whether k follows the benefit of experts to a token and the difficulty of held-out
math problems, how experts specialise by domain, and a text sample coloured by experts/token.

A token's k at position t is paired with the loss of the prediction made there (of token t + 1): the
experts at position t shape that prediction most directly (later positions see them only through attention). Shape legend: L MoE layers, N tokens, E experts,
D domains, K routing slots.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from dynamoe.checkpoint import check_same_tokenizer, load_model, load_tokenizer_for
from dynamoe.data.mathgen import MAX_DIFFICULTY, MIN_DIFFICULTY, PROBLEMS_PER_DOC, format_problem, held_out_problems
from dynamoe.data.tokenizer import encode_documents
from dynamoe.errors import DynamoeError
from dynamoe.evaluate import split_tokens_by_domain, windows
from dynamoe.model import Dial, Transformer
from dynamoe.model.need import benefit_and_expectation
from dynamoe.resources import REPORT_BYTES, check_writable, writing

ANALYSIS_JSON, SAMPLE_HTML = "analysis.json", "sample.html"
HISTOGRAM_PNG, K_LOSS_PNG, HEATMAP_PNG = "k_histograms.png", "k_vs_loss.png", "expert_domain_usage.png"
NEED_PNG = "k_vs_need.png"
LEVEL_PROBLEMS = 240  # held-out math problems per difficulty level (10 documents)
BENEFIT_BINS = 10  # the plot's benefit deciles
TOP_SHARE = 0.2  # the budget share reported is that of the fifth of tokens with the most benefit


# ----------------------------------------------------------------------------- statistics

def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of values, ties sharing the mean of the ranks they span."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.r_[0, np.flatnonzero(ordered[1:] != ordered[:-1]) + 1]
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)  # mean of the ranks starts+1 .. ends
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None when a side is constant or too short."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two 1-D arrays of one length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x) - (len(x) + 1) / 2, average_ranks(y) - (len(y) + 1) / 2
    norm = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / norm if norm > 0 else None


def entropy(p: np.ndarray) -> float:
    """Shannon entropy (nats) of a probability vector; zeros contribute nothing."""
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def normalized_mutual_information(counts: np.ndarray) -> float | None:
    """NMI of the two variables of a contingency table: I(A; B) / mean(H(A), H(B)), in [0, 1].

    The arithmetic-mean normalisation (as scikit-learn's default). None when either variable takes a
    single value (there is nothing to share information about).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or (counts < 0).any():
        raise ValueError("need a 2-D table of non-negative counts")
    total = counts.sum()
    if total <= 0:
        return None
    joint = counts / total
    p_a, p_b = joint.sum(axis=1), joint.sum(axis=0)
    h_a, h_b = entropy(p_a), entropy(p_b)
    if h_a == 0 or h_b == 0:
        return None
    nonzero = joint > 0
    mutual = float((joint[nonzero] * np.log(joint[nonzero] / np.outer(p_a, p_b)[nonzero])).sum())
    return max(0.0, mutual) / ((h_a + h_b) / 2)


# ----------------------------------------------------------------------------- collection

@dataclass
class TokenRouting:
    """Per-token routing of a stretch of text: one column per token, one row per MoE layer."""

    domain_N: np.ndarray  # int: index into the domain list
    loss_N: np.ndarray  # float: cross-entropy of the prediction made at this position
    k_LN: np.ndarray  # int: experts used per layer
    usage_LED: np.ndarray  # int: selected (token, expert) pairs per layer, expert and domain
    benefit_N: np.ndarray | None = None  # float: loss at k=1 minus loss at k_max (dynamoe.model.need); None: not measured
    expected_benefit_N: np.ndarray | None = None  # float: its expectation under the k_max prediction (with benefit_N)


@torch.no_grad()
def route_window(model: Transformer, x_BT: torch.Tensor, y_BT: torch.Tensor, dial: Dial = None
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """k per layer (L, B*T), per-token losses (B*T), and each layer's selected experts, routed at `dial`.

    The selected experts of a layer come as a flat tensor of expert ids, one per (token, expert) pair.
    """
    out = model(x_BT, thresholds_BL=model.routing_thresholds([dial] * x_BT.shape[0]))
    losses_N = F.cross_entropy(out.logits.flatten(0, 1).float(), y_BT.flatten(), reduction="none")
    k_LN = torch.stack([r.k_T for r in out.routings])
    chosen = [r.experts_TK[r.mask_TK] for r in out.routings]
    return k_LN, losses_N, chosen


def collect(model: Transformer, tokens_by_domain: dict[str, np.ndarray], max_tokens: int | None, batch_size: int = 8,
            dial: Dial = None, benefit: bool = False) -> TokenRouting:
    """Route up to max_tokens predictions of each domain at the dial and keep every token's k, loss and expert choices,
    and with `benefit` what its experts beyond the first buy it (two more forward passes, forced to 1 and k_max)."""
    routers = model.routers()
    if not routers:
        raise DynamoeError("analyze needs an MoE checkpoint, but this model has a dense feed-forward: it has no routing")
    device = next(model.parameters()).device
    n_experts, domains = model.config.n_experts, list(tokens_by_domain)
    usage_LED = np.zeros((len(routers), n_experts, len(domains)), dtype=np.int64)
    domain_parts, loss_parts, k_parts, benefit_parts, expected_parts = [], [], [], [], []
    was_training = model.training
    model.eval()
    for d, domain in enumerate(domains):
        for x_BT, y_BT in windows(tokens_by_domain[domain], model.config.max_seq_len, max_tokens, batch_size, domain):
            x_BT, y_BT = x_BT.to(device), y_BT.to(device)
            k_LN, losses_N, chosen = route_window(model, x_BT, y_BT, dial)
            k_parts.append(k_LN.cpu().numpy())
            loss_parts.append(losses_N.cpu().numpy())
            domain_parts.append(np.full(losses_N.numel(), d))
            for layer, experts in enumerate(chosen):
                usage_LED[layer, :, d] += np.bincount(experts.cpu().numpy(), minlength=n_experts)
            if benefit:
                benefit_N, expected_N = benefit_and_expectation(model, x_BT, y_BT)
                benefit_parts.append(benefit_N.cpu().numpy())
                expected_parts.append(expected_N.cpu().numpy())
    model.train(was_training)
    measured = [np.concatenate(parts).astype(np.float64) if benefit else None for parts in (benefit_parts, expected_parts)]
    return TokenRouting(np.concatenate(domain_parts), np.concatenate(loss_parts).astype(np.float64),
                        np.concatenate(k_parts, axis=1), usage_LED, *measured)


# ----------------------------------------------------------------------------- report

@dataclass
class RoutingAnalysis:
    """The numbers of an analysis (analysis.json)."""

    checkpoint: str
    router: str
    threshold: float | None  # routing threshold in effect; None for topk and relu
    domains: list[str]
    tokens_per_domain: dict[str, int]
    k_max: int
    mean_k_per_layer: list[float]
    mean_k_per_domain: dict[str, float]
    k_histogram_per_layer: list[list[int]]  # [layer][k]: tokens that used k experts in that layer
    k_histogram_per_domain: dict[str, list[int]]  # [domain][k]: (token, layer) decisions over all layers
    loss_per_domain: dict[str, float]
    spearman_k_loss: float | None  # token's mean k over layers against its loss, all domains pooled
    spearman_k_loss_per_domain: dict[str, float | None]  # within each domain: difficulty, not domain, drives it
    spearman_k_loss_per_layer: list[float | None]
    mean_loss_by_k: dict[str, float]  # token's mean k over layers, rounded -> mean loss of those tokens
    tokens_by_k: dict[str, int]  # ... and how many tokens that is
    expert_domain_usage: list[list[list[int]]]  # [layer][expert][domain]: selected (token, expert) pairs
    specialisation_nmi_per_layer: list[float | None]  # NMI(expert choice; domain) over the selected pairs
    specialisation_nmi: float | None  # mean over layers
    need: NeedAnalysis | None = None  # k against the benefit of experts and the difficulty of math problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def analyse(routing: TokenRouting, domains: list[str], checkpoint: str, model: Transformer, dial: Dial = None
            ) -> RoutingAnalysis:
    """All the numbers of a RoutingAnalysis from the per-token routing."""
    k_max = int(max(routing.k_LN.max(initial=0), model.config.k_max))
    mean_k_N = routing.k_LN.mean(axis=0)
    in_domain = {name: routing.domain_N == d for d, name in enumerate(domains)}
    bucket_N = np.floor(mean_k_N + 0.5).astype(np.int64)  # rounded half up, as the terminal colours of generate
    buckets = np.unique(bucket_N).tolist()
    nmi = [normalized_mutual_information(layer_ED) for layer_ED in routing.usage_LED]
    defined = [value for value in nmi if value is not None]
    thresholds = model.layer_thresholds(dial)  # reported as their mean
    return RoutingAnalysis(
        checkpoint=checkpoint, router=model.config.router, threshold=float(np.mean(thresholds)) if thresholds else None,
        domains=domains, tokens_per_domain={name: int(mask.sum()) for name, mask in in_domain.items()}, k_max=k_max,
        mean_k_per_layer=routing.k_LN.mean(axis=1).tolist(),
        mean_k_per_domain={name: float(routing.k_LN[:, mask].mean()) for name, mask in in_domain.items()},
        k_histogram_per_layer=[np.bincount(k_N, minlength=k_max + 1).tolist() for k_N in routing.k_LN],
        k_histogram_per_domain={name: np.bincount(routing.k_LN[:, mask].ravel(), minlength=k_max + 1).tolist()
                                for name, mask in in_domain.items()},
        loss_per_domain={name: float(routing.loss_N[mask].mean()) for name, mask in in_domain.items()},
        spearman_k_loss=spearman(mean_k_N, routing.loss_N),
        spearman_k_loss_per_domain={name: spearman(mean_k_N[mask], routing.loss_N[mask]) for name, mask in in_domain.items()},
        spearman_k_loss_per_layer=[spearman(k_N, routing.loss_N) for k_N in routing.k_LN],
        mean_loss_by_k={str(k): float(routing.loss_N[bucket_N == k].mean()) for k in buckets},
        tokens_by_k={str(k): int((bucket_N == k).sum()) for k in buckets},
        expert_domain_usage=routing.usage_LED.tolist(),
        specialisation_nmi_per_layer=nmi, specialisation_nmi=float(np.mean(defined)) if defined else None,
    )


def format_analysis(result: RoutingAnalysis) -> str:
    """The analysis as a few readable lines."""
    def number(value: float | None, spec: str = ".3f") -> str:
        return "undefined" if value is None else format(value, spec)

    lines = [f"routing analysis of {result.checkpoint} ({result.router} router"
             + (f", threshold {result.threshold:g})" if result.threshold is not None else ")"),
             "mean experts/token per layer: " + " ".join(f"{k:.2f}" for k in result.mean_k_per_layer)]
    for domain in result.domains:
        histogram = result.k_histogram_per_domain[domain]
        shares = "  ".join(f"k={k}: {n / max(sum(histogram), 1):.1%}" for k, n in enumerate(histogram) if n)
        lines.append(f"{domain:<8} {result.tokens_per_domain[domain]:>7} tokens  loss {result.loss_per_domain[domain]:.3f}  "
                     f"mean k {result.mean_k_per_domain[domain]:.2f}  Spearman(k, loss) "
                     f"{number(result.spearman_k_loss_per_domain[domain])}  [{shares}]")
    lines.append(f"Spearman(experts/token, own loss), all tokens: {number(result.spearman_k_loss)}; per layer: "
                 + " ".join(number(v) for v in result.spearman_k_loss_per_layer))
    lines.append("mean loss by experts/token: " + "  ".join(f"k={k}: {v:.3f}" for k, v in result.mean_loss_by_k.items()))
    lines.append(f"specialisation NMI(expert; domain): {number(result.specialisation_nmi)}; per layer: "
                 + " ".join(number(v) for v in result.specialisation_nmi_per_layer))
    if result.need is not None:
        lines += format_need(result.need)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- allocation by need

@dataclass
class NeedAnalysis:
    """Does k follow need? A token's k (mean over layers) against the benefit of experts to it, and the mean k
    of held-out math problems of each difficulty level."""

    mean_benefit_per_domain: dict[str, float]  # nats: loss at k=1 minus loss at k_max
    spearman_k_benefit: float | None  # all domains pooled
    spearman_k_benefit_per_domain: dict[str, float | None]  # within each domain: need, not domain, drives it
    spearman_k_benefit_per_layer: list[float | None]
    spearman_benefit_loss: float | None  # how far the benefit is just the loss by another name
    mean_k_by_benefit_decile: list[float | None]  # tokens in ten equal groups by benefit, least benefit first
    mean_benefit_by_decile: list[float | None]
    top_benefit_budget_share: float | None  # share of all experts run spent on the TOP_SHARE of tokens with most benefit
    top_benefit_budget_share_per_domain: dict[str, float | None]
    levels: list[int]  # math difficulty levels measured (empty: none)
    tokens_per_level: list[int]
    mean_k_per_level: list[float]
    loss_per_level: list[float]
    mean_benefit_per_level: list[float]
    k_rises_with_level: bool | None  # mean k strictly increasing from each level to the next
    # Spearman(benefit, its expectation under the k_max prediction) within each domain: how far the benefit can be
    # told before the next token is known, from both forced passes' outputs (dynamoe.model.need.benefit_and_expectation).
    # A reference for Spearman(k, benefit), not a bound: a head trained on the benefit can beat a miscalibrated p_kmax.
    spearman_benefit_expectation_per_domain: dict[str, float | None] = field(default_factory=dict)


def mean_by_rank_bins(rank_by: np.ndarray, values: np.ndarray, bins: int) -> list[float | None]:
    """Mean of values over `bins` equal groups of tokens ranked by rank_by, lowest first (None: an empty group)."""
    groups = np.array_split(np.argsort(rank_by, kind="stable"), bins)
    return [float(values[group].mean()) if group.size else None for group in groups]


def top_budget_share(rank_by: np.ndarray, k_N: np.ndarray, fraction: float = TOP_SHARE) -> float | None:
    """Share of the experts run (sum of k) that the `fraction` of tokens ranked highest by rank_by use."""
    if not k_N.size or k_N.sum() <= 0:
        return None
    top = np.argsort(rank_by, kind="stable")[len(k_N) - max(1, round(fraction * len(k_N))):]
    return float(k_N[top].sum() / k_N.sum())


def level_tokens(tokenizer: Tokenizer, problems_per_level: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per difficulty level, the token stream of held-out math documents, encoded as a corpus build encodes them."""
    streams = {}
    for level in range(MIN_DIFFICULTY, MAX_DIFFICULTY + 1):
        lines = [format_problem(*problem) for problem in held_out_problems(level, problems_per_level, seed)]
        documents = ["\n".join(lines[i:i + PROBLEMS_PER_DOC]) for i in range(0, len(lines), PROBLEMS_PER_DOC)]
        streams[str(level)] = np.fromiter(chain.from_iterable(encode_documents(tokenizer, documents)), dtype=np.int64)
    return streams


def analyse_need(routing: TokenRouting, domains: list[str], by_level: TokenRouting | None) -> NeedAnalysis:
    """The NeedAnalysis of per-token routing measured with its benefit, and of the held-out levels' routing."""
    if routing.benefit_N is None:
        raise ValueError("the routing was collected without the benefit: collect(..., benefit=True)")
    k_N, benefit_N = routing.k_LN.mean(axis=0), routing.benefit_N
    in_domain = {name: routing.domain_N == d for d, name in enumerate(domains)}
    levels, level_counts, level_k, level_loss, level_benefit = [], [], [], [], []
    if by_level is not None and by_level.benefit_N is not None:
        for index in np.unique(by_level.domain_N):
            mine = by_level.domain_N == index
            levels.append(MIN_DIFFICULTY + int(index))
            level_counts.append(int(mine.sum()))
            level_k.append(float(by_level.k_LN[:, mine].mean()))
            level_loss.append(float(by_level.loss_N[mine].mean()))
            level_benefit.append(float(by_level.benefit_N[mine].mean()))
    return NeedAnalysis(
        mean_benefit_per_domain={name: float(benefit_N[mask].mean()) for name, mask in in_domain.items()},
        spearman_k_benefit=spearman(k_N, benefit_N),
        spearman_k_benefit_per_domain={name: spearman(k_N[mask], benefit_N[mask]) for name, mask in in_domain.items()},
        spearman_k_benefit_per_layer=[spearman(k_layer_N, benefit_N) for k_layer_N in routing.k_LN],
        spearman_benefit_loss=spearman(benefit_N, routing.loss_N),
        mean_k_by_benefit_decile=mean_by_rank_bins(benefit_N, k_N, BENEFIT_BINS),
        mean_benefit_by_decile=mean_by_rank_bins(benefit_N, benefit_N, BENEFIT_BINS),
        top_benefit_budget_share=top_budget_share(benefit_N, k_N),
        top_benefit_budget_share_per_domain={name: top_budget_share(benefit_N[mask], k_N[mask])
                                             for name, mask in in_domain.items()},
        levels=levels, tokens_per_level=level_counts, mean_k_per_level=level_k, loss_per_level=level_loss,
        mean_benefit_per_level=level_benefit,
        k_rises_with_level=all(b > a for a, b in zip(level_k, level_k[1:])) if len(level_k) > 1 else None,
        spearman_benefit_expectation_per_domain={} if routing.expected_benefit_N is None else {
            name: spearman(routing.expected_benefit_N[mask], benefit_N[mask]) for name, mask in in_domain.items()},
    )


def format_need(need: NeedAnalysis) -> list[str]:
    """The need analysis as a few readable lines."""
    def number(value: float | None, spec: str = ".3f") -> str:
        return "undefined" if value is None else format(value, spec)

    per_domain = ", ".join(f"{d} {number(v)}" for d, v in need.spearman_k_benefit_per_domain.items())
    lines = ["benefit of experts per token (loss at k=1 minus at k_max), mean: "
             + ", ".join(f"{d} {v:.3f}" for d, v in need.mean_benefit_per_domain.items())
             + f"; Spearman(benefit, own loss) {number(need.spearman_benefit_loss)}",
             f"Spearman(experts/token, benefit), all tokens: {number(need.spearman_k_benefit)}; per domain: {per_domain}; "
             "per layer: " + " ".join(number(v) for v in need.spearman_k_benefit_per_layer),
             "Spearman(benefit, its expectation under the k_max prediction) per domain: " + ", ".join(
                 f"{d} {number(v)}" for d, v in need.spearman_benefit_expectation_per_domain.items()),
             f"experts spent on the {TOP_SHARE:.0%} of tokens with most benefit: {number(need.top_benefit_budget_share, '.1%')} "
             "of the budget; mean k by benefit decile: " + " ".join(number(v, ".2f") for v in need.mean_k_by_benefit_decile)]
    if need.levels:
        rises = {True: "rises with every level", False: "does not rise with every level", None: "–"}[need.k_rises_with_level]
        lines.append(f"held-out math, difficulty {need.levels[0]}-{need.levels[-1]}: mean k "
                     + " ".join(f"{k:.2f}" for k in need.mean_k_per_level) + f" ({rises}); loss "
                     + " ".join(f"{v:.3f}" for v in need.loss_per_level) + "; benefit "
                     + " ".join(f"{v:.3f}" for v in need.mean_benefit_per_level))
    return lines


def measure_need(model: Transformer, routing: TokenRouting, domains: list[str], tokenizer: Tokenizer,
                 level_problems: int, seed: int = 0, dial: Dial = None) -> NeedAnalysis:
    """The need analysis of routing collected with its benefit, with `level_problems` held-out problems per level
    routed at the same dial."""
    by_level = (collect(model, level_tokens(tokenizer, level_problems, seed), None, dial=dial, benefit=True)
                if level_problems else None)
    return analyse_need(routing, domains, by_level)


def plot_need(analyses: dict[str, NeedAnalysis], path: Path) -> None:
    """Mean experts/token against benefit decile and against math difficulty level, one line per model."""
    figure = _figure(11, 4)
    by_benefit, by_level = figure.subplots(1, 2, sharey=True)
    for label, need in analyses.items():
        deciles = [(i + 1, k) for i, k in enumerate(need.mean_k_by_benefit_decile) if k is not None]
        by_benefit.plot(*zip(*deciles), marker="o", label=label)
        if need.levels:
            by_level.plot(need.levels, need.mean_k_per_level, marker="o", label=label)
    by_benefit.set_xlabel("benefit of experts (decile, least first)")
    by_benefit.set_ylabel("mean experts/token")
    by_benefit.set_xticks(range(1, BENEFIT_BINS + 1))
    by_level.set_xlabel("held-out math problems: difficulty level")
    by_level.set_xticks(range(MIN_DIFFICULTY, MAX_DIFFICULTY + 1))
    for axes in (by_benefit, by_level):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- the coloured sample

def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, so that the pieces join into the decoded text.

    A character split over several byte-level tokens appears with the token that completes it.
    """
    pieces, shown = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(list(ids[:end]))
        if end < len(ids):
            text = text.rstrip("\ufffd")  # bytes of a character still incomplete
        if not text.startswith(shown):  # decoding changed text already shown (not seen with byte-level BPE): keep it
            text = shown + text[len(shown):]
        pieces.append(text[len(shown):])
        shown = text
    return pieces


def k_colour(k: float, k_max: int) -> str:
    """A CSS background from blue (few experts) through grey to red (k_max)."""
    from matplotlib import colormaps

    red, green, blue, _ = colormaps["coolwarm"](min(max(k / max(k_max, 1), 0.0), 1.0))
    return f"rgb({round(255 * red)},{round(255 * green)},{round(255 * blue)})"


def sample_html(samples: dict[str, tuple[list[str], np.ndarray, np.ndarray]], k_max: int, title: str) -> str:
    """An HTML page: per domain, the text with each token's background coloured by its mean experts/token.

    samples: domain -> (token pieces, k per layer (L, N), loss of the prediction at each position (N)).
    """
    legend = " ".join(f'<span class="t" style="background:{k_colour(k, k_max)}">{k}</span>' for k in range(k_max + 1))
    sections = []
    for domain, (pieces, k_LN, loss_N) in samples.items():
        spans = []
        for piece, k_L, loss in zip(pieces, k_LN.T, loss_N):
            tip = f"experts per layer: {' '.join(map(str, k_L.tolist()))}; loss of the next-token prediction: {loss:.2f}"
            spans.append(f'<span class="t" style="background:{k_colour(float(k_L.mean()), k_max)}" '
                         f'title="{html.escape(tip)}">{html.escape(piece)}</span>')
        sections.append(f"<h2>{html.escape(domain)}</h2>\n<pre>{''.join(spans)}</pre>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>\n"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
            "pre{white-space:pre-wrap;font-size:14px;line-height:1.6}.t{border-radius:2px}</style></head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p>Each token's background shows the experts it used, averaged over the "
            f"MoE layers: {legend}. Hover a token for its experts per layer and its loss.</p>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def text_samples(model: Transformer, tokenizer: Tokenizer, tokens_by_domain: dict[str, np.ndarray], n_tokens: int,
                 dial: Dial = None) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """The first n_tokens of each domain (at most one context), with their pieces, k per layer and losses."""
    device = next(model.parameters()).device
    samples = {}
    for domain, tokens in tokens_by_domain.items():
        length = min(n_tokens, model.config.max_seq_len, len(tokens) - 1)
        if length < 1:
            continue
        span = torch.from_numpy(np.asarray(tokens[:length + 1], dtype=np.int64))
        k_LN, loss_N, _ = route_window(model, span[None, :-1].to(device), span[None, 1:].to(device), dial)
        samples[domain] = (token_pieces(tokenizer, span[:-1].tolist()), k_LN.cpu().numpy(), loss_N.cpu().numpy())
    return samples


# ----------------------------------------------------------------------------- plots

def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)  # Agg without pyplot: no global backend state, no display needed
    return figure


def plot_histograms(result: RoutingAnalysis, path: Path) -> None:
    """Share of tokens by experts used: one line per layer, one per domain."""
    figure = _figure(11, 4)
    by_layer, by_domain = figure.subplots(1, 2, sharey=True)
    ks = np.arange(result.k_max + 1)
    for axes, rows, what in ((by_layer, {f"layer {i}": h for i, h in enumerate(result.k_histogram_per_layer)}, "layer"),
                             (by_domain, result.k_histogram_per_domain, "domain")):
        for label, histogram in rows.items():
            counts = np.asarray(histogram, dtype=np.float64)
            axes.plot(ks, counts / max(counts.sum(), 1.0), marker="o", label=label)
        axes.set_xlabel("experts per token (k)")
        axes.set_title(f"k per {what}")
        axes.set_xticks(ks)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    by_layer.set_ylabel("share of tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_k_vs_loss(result: RoutingAnalysis, path: Path) -> None:
    """Mean loss of the tokens at each (rounded) mean experts/token."""
    figure = _figure(6, 4)
    axes = figure.subplots()
    ks = [int(k) for k in result.mean_loss_by_k]
    bars = axes.bar(ks, list(result.mean_loss_by_k.values()), color="tab:blue")
    axes.bar_label(bars, [f"n={n}" for n in result.tokens_by_k.values()], fontsize=8)
    rho = "undefined" if result.spearman_k_loss is None else f"{result.spearman_k_loss:.3f}"
    axes.set_title(f"harder tokens, more experts? Spearman = {rho}")
    axes.set_xlabel("token's experts/token (mean over layers, rounded)")
    axes.set_ylabel("mean loss of its prediction (nats)")
    axes.set_xticks(ks)
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_usage_heatmap(result: RoutingAnalysis, path: Path) -> None:
    """Per layer, the share of each domain's expert slots that each expert takes, with the layer's NMI."""
    usage_LED = np.asarray(result.expert_domain_usage, dtype=np.float64)
    n_layers = len(usage_LED)
    figure = _figure(2.2 + 1.6 * n_layers, 0.25 * usage_LED.shape[1] + 2)
    axes_row = np.atleast_1d(figure.subplots(1, n_layers, sharey=True))
    for layer, (axes, usage_ED) in enumerate(zip(axes_row, usage_LED)):
        share_ED = usage_ED / np.maximum(usage_ED.sum(axis=0, keepdims=True), 1.0)
        image = axes.imshow(share_ED, aspect="auto", cmap="viridis", vmin=0)
        nmi = result.specialisation_nmi_per_layer[layer]
        axes.set_title(f"layer {layer}\nNMI {'–' if nmi is None else f'{nmi:.3f}'}", fontsize=9)
        axes.set_xticks(range(len(result.domains)), result.domains, rotation=45, fontsize=8)
        figure.colorbar(image, ax=axes, fraction=0.08)
    axes_row[0].set_ylabel("expert")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- entry point

def analyze_checkpoint(checkpoint: Path, corpus: Path, out: Path, max_tokens: int = 16_384, sample_tokens: int = 200,
                       threshold: float | None = None, device: str | torch.device = "cpu",
                       level_problems: int = LEVEL_PROBLEMS) -> RoutingAnalysis:
    """Analyse a checkpoint's routing on a corpus's test split, and on `level_problems` held-out math problems
    per difficulty level; write analysis.json, the plots and sample.html."""
    if max_tokens < 1 or sample_tokens < 1 or level_problems < 0:
        raise DynamoeError(f"--max-tokens ({max_tokens}) and --sample-tokens ({sample_tokens}) must be at least 1, "
                           f"--level-problems ({level_problems}) at least 0")
    check_same_tokenizer(checkpoint, corpus, "pass the corpus it was trained on with --corpus")
    check_writable(Path(out), REPORT_BYTES, "the analysis")
    model, _ = load_model(checkpoint, device=device)
    model.layer_thresholds(threshold)  # a model without a dial refuses one before any work
    tokens = split_tokens_by_domain(corpus, "test")
    domains = list(tokens)
    routing = collect(model, tokens, max_tokens, dial=threshold, benefit=True)
    tokenizer = load_tokenizer_for(checkpoint)
    result = analyse(routing, domains, str(checkpoint), model, threshold)
    result.need = measure_need(model, routing, domains, tokenizer, level_problems, dial=threshold)
    samples = text_samples(model, tokenizer, tokens, sample_tokens, threshold)
    out = Path(out)
    with writing(out, "the analysis"):
        out.mkdir(parents=True, exist_ok=True)
        (out / ANALYSIS_JSON).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        plot_histograms(result, out / HISTOGRAM_PNG)
        plot_k_vs_loss(result, out / K_LOSS_PNG)
        plot_usage_heatmap(result, out / HEATMAP_PNG)
        plot_need({Path(checkpoint).name: result.need}, out / NEED_PNG)
        html_page = sample_html(samples, result.k_max, f"experts per token: {checkpoint}")
        (out / SAMPLE_HTML).write_text(html_page, encoding="utf-8")
    return result
