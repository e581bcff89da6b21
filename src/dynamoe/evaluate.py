"""Evaluation: perplexity per domain, experts/token per layer and per domain, and the histogram of k."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from dynamoe.data import TokenDataset, encode_documents, user_documents
from dynamoe.data.shards import check_token_ids
from dynamoe.errors import DynamoeError
from dynamoe.model import Dial, Transformer


@dataclass
class DomainReport:
    """What one domain's held-out tokens cost the model."""

    domain: str
    tokens: int
    loss: float  # mean next-token cross-entropy (nats)
    perplexity: float
    mean_k: float | None  # experts/token over all MoE layers; None for a dense model
    mean_k_per_layer: list[float] = field(default_factory=list)
    k_histogram: list[int] = field(default_factory=list)  # k_histogram[k]: tokens x layers that used k experts


@dataclass
class EvalReport:
    """Per-domain results plus the token-weighted total."""

    domains: list[DomainReport]
    total: DomainReport

    def to_dict(self) -> dict:
        return asdict(self)

    def k_shares(self) -> list[float]:
        """Fraction of (token, layer) decisions that used each k, over all domains."""
        counts = np.array(self.total.k_histogram, dtype=np.float64)
        return (counts / max(counts.sum(), 1.0)).tolist()


class _Accumulator:
    """Running sums for one domain."""

    def __init__(self, n_layers: int, k_slots: int) -> None:
        self.tokens = 0
        self.loss_sum = 0.0
        self.k_sum_per_layer = np.zeros(n_layers)
        self.k_histogram = np.zeros(k_slots + 1, dtype=np.int64)

    def add(self, token_losses: torch.Tensor, k_per_layer: list[torch.Tensor]) -> None:
        self.tokens += token_losses.numel()
        self.loss_sum += float(token_losses.double().sum())
        for layer, k_T in enumerate(k_per_layer):
            self.k_sum_per_layer[layer] += float(k_T.sum())
            self.k_histogram += np.bincount(k_T.cpu().numpy(), minlength=self.k_histogram.size)[: self.k_histogram.size]

    def merge(self, other: "_Accumulator") -> None:
        self.tokens += other.tokens
        self.loss_sum += other.loss_sum
        self.k_sum_per_layer += other.k_sum_per_layer
        self.k_histogram += other.k_histogram

    def report(self, domain: str, has_routing: bool) -> DomainReport:
        loss = self.loss_sum / max(self.tokens, 1)
        per_layer = (self.k_sum_per_layer / max(self.tokens, 1)).tolist() if has_routing else []
        return DomainReport(domain, self.tokens, loss, math.exp(min(loss, 50.0)),
                            float(np.mean(per_layer)) if has_routing else None, per_layer,
                            self.k_histogram.tolist() if has_routing else [])


def windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None, batch_size: int,
            domain: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, target) batches of non-overlapping windows covering at most max_tokens predictions of a domain.

    Full windows are batched; a shorter remainder gets a batch of its own, so short texts count too.
    """
    predictions = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    if predictions < 1:
        raise DynamoeError(f"domain {domain!r} has {len(tokens)} token(s), but evaluation needs at least 2: "
                           "give it more text")
    span = torch.from_numpy(np.asarray(tokens[: predictions + 1], dtype=np.int64))
    n_full = predictions // seq_len
    x_full = span[: n_full * seq_len].view(n_full, seq_len)
    y_full = span[1: n_full * seq_len + 1].view(n_full, seq_len)
    batches = [(x_full[i:i + batch_size], y_full[i:i + batch_size]) for i in range(0, n_full, batch_size)]
    if predictions % seq_len:
        batches.append((span[n_full * seq_len:-1][None], span[n_full * seq_len + 1:][None]))
    return batches


@torch.no_grad()
def evaluate_tokens(model: Transformer, tokens_by_domain: dict[str, np.ndarray], *, seq_len: int | None = None,
                    max_tokens: int | None = 50_000, batch_size: int = 8, progress: bool = True,
                    dial: Dial = None) -> EvalReport:
    """Perplexity and routing statistics of `model` on each domain's token stream, routed at `dial` (None: as trained)."""
    model.layer_thresholds(dial)  # a model without a dial refuses one before any work
    cfg = model.config
    seq_len = min(seq_len or cfg.max_seq_len, cfg.max_seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_moe_layers = len(model.routers())
    k_slots = cfg.k_max if cfg.router != "topk" else cfg.top_k
    total = _Accumulator(n_moe_layers, k_slots)
    reports = []
    for domain, tokens in tokens_by_domain.items():
        check_token_ids(tokens, cfg.vocab_size, f"the text of domain {domain!r}", "the model's vocabulary is smaller "
                        "than its tokenizer's; evaluate with the tokenizer (corpus) it was trained with")
        acc = _Accumulator(n_moe_layers, k_slots)
        batches = windows(tokens, seq_len, max_tokens, batch_size, domain)
        for x, y in tqdm(batches, desc=f"eval {domain}", disable=not progress, leave=False):
            x, y = x.to(device), y.to(device)
            out = model(x, thresholds_BL=model.routing_thresholds([dial] * x.shape[0]))
            token_losses = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), reduction="none")
            acc.add(token_losses, [r.k_T for r in out.routings])
        reports.append(acc.report(domain, n_moe_layers > 0))
        total.merge(acc)
    model.train(was_training)
    return EvalReport(reports, total.report("all", n_moe_layers > 0))


def split_tokens_by_domain(data_dir: Path, split: str = "test") -> dict[str, np.ndarray]:
    """Each domain's tokens from a built corpus split; domains with no documents in the split are left out."""
    dataset = TokenDataset(Path(data_dir), split)
    # A domain of fewer than 3 documents is all in train, with nothing held out to evaluate.
    tokens = {domain: dataset.domain_tokens(domain) for domain in dataset.domains}
    return {domain: domain_tokens for domain, domain_tokens in tokens.items() if len(domain_tokens)}


def user_tokens_by_domain(path: Path, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """Tokenize the user's files (txt, folders, JSONL) exactly as a corpus build would, grouped by domain."""
    texts: dict[str, list[str]] = {}
    for document in user_documents(Path(path)):
        texts.setdefault(document.domain, []).append(document.text)
    return {domain: np.fromiter(chain.from_iterable(encode_documents(tokenizer, domain_texts)), dtype=np.int64)
            for domain, domain_texts in texts.items()}


def format_report(report: EvalReport, title: str = "") -> str:
    """A readable table: one row per domain, then the k histogram."""
    has_k = report.total.mean_k is not None
    lines = [title] if title else []
    header = f"{'domain':<10} {'tokens':>8} {'loss':>7} {'ppl':>9}" + (f" {'mean k':>7}  k per layer" if has_k else "")
    lines += [header, "-" * len(header)]
    for row in [*report.domains, report.total]:
        line = f"{row.domain:<10} {row.tokens:>8} {row.loss:>7.4f} {row.perplexity:>9.2f}"
        if has_k:
            line += f" {row.mean_k:>7.2f}  " + " ".join(f"{k:.2f}" for k in row.mean_k_per_layer)
        lines.append(line)
    if has_k:
        shares = report.k_shares()
        lines.append("k histogram (share of token-layer decisions): " +
                     "  ".join(f"k={k}: {share:.1%}" for k, share in enumerate(shares) if share > 0))
    return "\n".join(lines)
