"""Routing analysis: Spearman and NMI against hand-computed values, parity of the collected routing with
`evaluate`, the coloured sample, outputs and errors."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dynamoe.analyze import (ANALYSIS_JSON, HEATMAP_PNG, HISTOGRAM_PNG, K_LOSS_PNG, SAMPLE_HTML, analyze_checkpoint,
                             average_ranks, normalized_mutual_information, spearman, token_pieces)
from dynamoe.checkpoint import load_model, load_tokenizer_for, save_checkpoint
from dynamoe.cli import main
from dynamoe.config import tiny
from dynamoe.errors import DynamoeError
from dynamoe.evaluate import evaluate_tokens, split_tokens_by_domain
from dynamoe.model import Transformer


def test_average_ranks_share_ties() -> None:
    assert average_ranks(np.array([3, 1, 3, 2, 3])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]  # the 3s span ranks 3, 4, 5
    assert average_ranks(np.array([0.5, -1.0])).tolist() == [2.0, 1.0]


def test_spearman_matches_hand_computed_values() -> None:
    # No ties: d = rank differences (1, -1, 1, -1, 0), rho = 1 - 6 * 4 / (5 * 24) = 0.8.
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # Ties: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4); Pearson of them = 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearman([1, 2, 3], [1, 8, 27]) == pytest.approx(1.0)  # any increasing relation
    assert spearman([1, 2, 3], [5, 0, -7]) == pytest.approx(-1.0)


def test_spearman_agrees_with_the_textbook_formula_without_ties() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.permutation(50).astype(float), rng.normal(size=50)
    d = average_ranks(x) - average_ranks(y)
    assert spearman(x, y) == pytest.approx(1 - 6 * (d @ d) / (50 * (50 ** 2 - 1)))


def test_spearman_is_undefined_for_constant_or_short_input() -> None:
    assert spearman([3, 3, 3], [1, 2, 3]) is None  # a static top-k router: every token has the same k
    assert spearman([1.0], [2.0]) is None
    with pytest.raises(ValueError, match="1-D arrays of one length"):
        spearman([1, 2], [1, 2, 3])


def test_nmi_matches_a_hand_computed_table() -> None:
    # p = [[1/2, 0], [1/4, 1/4]]: rows (1/2, 1/2), columns (3/4, 1/4).
    mutual = 0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.25))
    h_rows, h_cols = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mutual / ((h_rows + h_cols) / 2)
    assert expected == pytest.approx(0.343711, abs=1e-6)
    assert normalized_mutual_information([[2, 0], [1, 1]]) == pytest.approx(expected)
    assert normalized_mutual_information([[2, 1], [0, 1]]) == pytest.approx(expected)  # symmetric in its variables


def test_nmi_bounds_and_degenerate_tables() -> None:
    assert normalized_mutual_information([[1, 2], [2, 4], [3, 6]]) == pytest.approx(0.0, abs=1e-12)  # independent
    assert normalized_mutual_information([[0, 5, 0], [7, 0, 0], [0, 0, 3]]) == pytest.approx(1.0)  # one expert per domain
    assert normalized_mutual_information([[3], [4]]) is None  # one domain: nothing to specialise on
    assert normalized_mutual_information([[0, 0], [0, 0]]) is None
    with pytest.raises(ValueError, match="non-negative"):
        normalized_mutual_information([[1, -1], [0, 2]])


def test_token_pieces_join_into_the_decoded_text(tiny_corpus: Path) -> None:
    from dynamoe.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_corpus / "tokenizer.json")
    text = "Où est 42? naïve café ☕ done"
    ids = tokenizer.encode(text).ids
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tokenizer.decode(ids)
    assert "\ufffd" not in "".join(pieces)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> dict[str, Path]:
    """Tiny random models saved with the corpus's tokenizer: dynamic, static top-2 and dense."""
    root = tmp_path_factory.mktemp("analyze")
    configs = {"dynamic": tiny(router="dynamic"), "topk": tiny(router="topk", top_k=2), "dense": tiny(ffn="dense")}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = Transformer(cfg)
        with torch.no_grad():  # sharper gates than the init's, so that k varies from token to token
            for router in model.routers():
                router.gate.weight.normal_(std=0.1)
        save_checkpoint(root / name, 1, model, {"step": 1, "optimizer": {}}, {}, tiny_corpus / "tokenizer.json")
    return {name: root / name for name in configs}


def test_analysis_agrees_with_evaluate_and_writes_every_output(checkpoints: dict[str, Path], tiny_corpus: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "analysis"
    result = analyze_checkpoint(checkpoints["dynamic"], tiny_corpus, out, max_tokens=100, sample_tokens=40)
    model, cfg = load_model(checkpoints["dynamic"])
    reference = evaluate_tokens(model, split_tokens_by_domain(tiny_corpus, "test"), max_tokens=100, progress=False)
    for domain in reference.domains:  # the same windows, losses and k as evaluate's
        assert result.tokens_per_domain[domain.domain] == domain.tokens
        assert result.loss_per_domain[domain.domain] == pytest.approx(domain.loss, rel=1e-5)
        assert result.mean_k_per_domain[domain.domain] == pytest.approx(domain.mean_k)
        assert result.k_histogram_per_domain[domain.domain][:len(domain.k_histogram)] == domain.k_histogram
    assert result.mean_k_per_layer == pytest.approx(reference.total.mean_k_per_layer)
    usage = np.array(result.expert_domain_usage)  # (layers, experts, domains)
    assert usage.shape == (cfg.n_layers, cfg.n_experts, len(result.domains))
    tokens = sum(result.tokens_per_domain.values())
    for layer, histogram in enumerate(result.k_histogram_per_layer):  # each token's k experts, counted once each
        assert sum(histogram) == tokens
        assert usage[layer].sum() == sum(k * n for k, n in enumerate(histogram))
    assert sum(result.tokens_by_k.values()) == tokens
    pooled_loss = sum(result.loss_per_domain[d] * n for d, n in result.tokens_per_domain.items()) / tokens
    assert sum(result.mean_loss_by_k[k] * n for k, n in result.tokens_by_k.items()) / tokens == pytest.approx(pooled_loss)
    assert result.spearman_k_loss is not None and -1 <= result.spearman_k_loss <= 1
    assert all(v is not None and 0 <= v <= 1 for v in result.specialisation_nmi_per_layer)
    assert result.specialisation_nmi == pytest.approx(np.mean(result.specialisation_nmi_per_layer))

    assert json.loads((out / ANALYSIS_JSON).read_text())["k_histogram_per_layer"] == result.k_histogram_per_layer
    for png in (HISTOGRAM_PNG, K_LOSS_PNG, HEATMAP_PNG):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / SAMPLE_HTML).read_text(encoding="utf-8")
    spans = re.findall(r'<span class="t" style="background:rgb\(\d+,\d+,\d+\)" title="([^"]*)">([^<]*)</span>', page)
    tokenizer = load_tokenizer_for(checkpoints["dynamic"])
    test_tokens = split_tokens_by_domain(tiny_corpus, "test")
    assert len(spans) == 40 * len(test_tokens)
    first_domain = [html.unescape(text) for _, text in spans[:40]]
    assert "".join(first_domain) == tokenizer.decode(next(iter(test_tokens.values()))[:40].tolist())
    assert html.unescape(spans[0][0]).startswith("experts per layer: ")


def test_static_router_has_a_constant_k_and_no_correlation(checkpoints: dict[str, Path], tiny_corpus: Path,
                                                           tmp_path: Path) -> None:
    result = analyze_checkpoint(checkpoints["topk"], tiny_corpus, tmp_path, max_tokens=64, sample_tokens=8)
    assert result.spearman_k_loss is None and result.mean_loss_by_k.keys() == {"2"}
    assert all(histogram[2] == sum(histogram) for histogram in result.k_histogram_per_layer)


def test_analyze_cli_prints_numbers_and_refuses_bad_input(checkpoints: dict[str, Path], tiny_corpus: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["analyze", "--corpus", str(tiny_corpus), "--max-tokens", "32", "--sample-tokens", "8", "--device", "cpu"]
    assert main([*base[:1], str(checkpoints["dynamic"]), *base[1:], "--out", str(tmp_path / "a"), "--threshold", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "Spearman(experts/token, own loss)" in out and "specialisation NMI" in out and "threshold 0.3" in out
    assert main([*base[:1], str(checkpoints["dense"]), *base[1:], "--out", str(tmp_path / "b")]) == 2
    assert "analyze needs an MoE checkpoint" in capsys.readouterr().err
    assert main([*base[:1], str(checkpoints["dynamic"]), *base[1:], "--sample-tokens", "0"]) == 2
    assert "--sample-tokens (0) must be at least 1" in capsys.readouterr().err
