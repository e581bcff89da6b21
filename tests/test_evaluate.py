"""Evaluation: windows cover the text exactly once, and the report agrees with a direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynamoe.config import tiny
from dynamoe.errors import DynamoeError
from dynamoe.evaluate import evaluate_tokens, format_report, windows
from dynamoe.model import Transformer


@pytest.mark.parametrize("n_tokens, max_tokens", [(50, None), (33, None), (5, None), (200, 70)])
def test_windows_predict_every_token_once(n_tokens: int, max_tokens: int | None) -> None:
    tokens = np.arange(n_tokens)
    batches = windows(tokens, seq_len=16, max_tokens=max_tokens, batch_size=2)
    inputs = torch.cat([x.flatten() for x, _ in batches])
    targets = torch.cat([y.flatten() for _, y in batches])
    expected = min(n_tokens - 1, max_tokens or n_tokens)
    assert torch.equal(inputs, torch.arange(expected))
    assert torch.equal(targets, torch.arange(1, expected + 1))


def test_windows_reject_a_domain_without_a_prediction() -> None:
    with pytest.raises(DynamoeError, match="at least 2"):
        windows(np.arange(1), seq_len=16, max_tokens=None, batch_size=2)


def test_report_matches_direct_loss_and_routing() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny(router="dynamic")).eval()
    tokens = np.random.default_rng(0).integers(0, 512, size=100)
    report = evaluate_tokens(model, {"text": tokens}, seq_len=32, max_tokens=None, progress=False)
    idx = torch.from_numpy(tokens).long()
    losses, ks = [], []
    with torch.no_grad():
        for start in range(0, 99, 32):
            x, y = idx[start:start + 32][None], idx[start + 1:start + 33][None]
            x = x[:, : y.shape[1]]
            out = model(x)
            losses.append(F.cross_entropy(out.logits[0], y[0], reduction="sum"))
            ks.append(torch.stack([r.k_T.float() for r in out.routings]))  # (layers, T)
    k_LT = torch.cat(ks, dim=1)
    row = report.domains[0]
    assert row.tokens == 99 == report.total.tokens
    assert row.loss == pytest.approx(float(sum(losses)) / 99, rel=1e-5)
    assert row.perplexity == pytest.approx(math.exp(row.loss))
    assert row.mean_k_per_layer == pytest.approx(k_LT.mean(1).tolist())
    assert sum(row.k_histogram) == 99 * 2
    assert row.k_histogram[3] == int((k_LT == 3).sum())
    assert "text" in format_report(report) and "k histogram" in format_report(report)


def test_dense_model_report_has_no_routing() -> None:
    model = Transformer(tiny(ffn="dense"))
    report = evaluate_tokens(model, {"a": np.arange(40) % 512, "b": np.arange(40) % 7}, seq_len=16, progress=False)
    assert [d.domain for d in report.domains] == ["a", "b"]
    assert report.total.mean_k is None and report.total.tokens == 78
    assert "mean k" not in format_report(report)
