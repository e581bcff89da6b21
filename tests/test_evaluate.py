"""Evaluation: windows cover the text exactly once, and the report agrees with a direct computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynamoe.config import tiny
from dynamoe.data import build_corpus, load_tokenizer, user_documents
from dynamoe.data.shards import index_path, token_dtype, tokens_path, write_split
from dynamoe.errors import DynamoeError
from dynamoe.evaluate import evaluate_tokens, format_report, split_tokens_by_domain, user_tokens_by_domain, windows
from dynamoe.model import Transformer


@pytest.mark.parametrize("n_tokens, max_tokens", [(50, None), (33, None), (5, None), (200, 70)])
def test_windows_predict_every_token_once(n_tokens: int, max_tokens: int | None) -> None:
    tokens = np.arange(n_tokens)
    batches = windows(tokens, seq_len=16, max_tokens=max_tokens, batch_size=2, domain="text")
    inputs = torch.cat([x.flatten() for x, _ in batches])
    targets = torch.cat([y.flatten() for _, y in batches])
    expected = min(n_tokens - 1, max_tokens or n_tokens)
    assert torch.equal(inputs, torch.arange(expected))
    assert torch.equal(targets, torch.arange(1, expected + 1))


def test_windows_reject_a_domain_without_a_prediction() -> None:
    with pytest.raises(DynamoeError, match="domain 'poetry' has 1 token.*at least 2"):
        windows(np.arange(1), seq_len=16, max_tokens=None, batch_size=2, domain="poetry")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_split_tokens_leave_out_domains_without_held_out_documents(tmp_path: Path) -> None:
    records = [{"text": f"story {n}: once upon a time", "domain": "stories"} for n in range(6)]
    records += [{"text": f"rare note {n}", "domain": "rare"} for n in range(2)]  # too few to hold any out
    corpus = build_corpus(tmp_path / "corpus", data=_write_jsonl(tmp_path / "data.jsonl", records), vocab_size=300,
                          progress=False)
    assert list(split_tokens_by_domain(corpus, "test")) == ["stories"]
    assert list(split_tokens_by_domain(corpus, "train")) == ["stories", "rare"]


def test_user_tokens_are_the_tokens_a_build_stores(tiny_corpus: Path, tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": "To be, or not to be"}, {"text": "x = 1\n", "domain": "code"},
                                                  {"text": "quoting <|endoftext|> in the middle"}])
    tokenizer = load_tokenizer(tiny_corpus)
    domains = ["user", "code"]
    write_split(tmp_path, "test", user_documents(data), tokenizer, domains)
    stored = np.fromfile(tokens_path(tmp_path, "test"), dtype=token_dtype(tokenizer.get_vocab_size()))
    index = np.load(index_path(tmp_path, "test"))
    tokens = user_tokens_by_domain(data, tokenizer)
    assert list(tokens) == domains
    for number, domain in enumerate(domains):
        expected = np.concatenate([stored[start:start + length] for start, length, _ in index[index[:, 2] == number]])
        assert np.array_equal(tokens[domain], expected)


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


def test_token_ids_outside_the_vocabulary_are_one_line_errors(capsys, tiny_corpus: Path, tmp_path: Path) -> None:
    import shutil

    from dynamoe.checkpoint import save_model
    from dynamoe.cli import main

    ckpt = save_model(tmp_path / "ckpt", Transformer(tiny()), tiny_corpus / "tokenizer.json")
    corpus = Path(shutil.copytree(tiny_corpus, tmp_path / "corpus"))
    tokens = np.memmap(corpus / "test.bin", dtype=np.uint16, mode="r+")
    tokens[3] = 700  # past the 512-token vocabulary
    tokens.flush()
    assert main(["eval", str(ckpt), "--corpus", str(corpus), "--max-tokens", "64"]) == 2
    assert "test.bin (vocabulary of meta.json) holds token id 700, outside" in capsys.readouterr().err
    # A model whose vocabulary is smaller than its tokenizer's: the user's text reaches ids it has no row for.
    small = save_model(tmp_path / "small", Transformer(tiny(vocab_size=300)), tiny_corpus / "tokenizer.json")
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question. " * 20)
    assert main(["eval", str(small), "--data", str(tmp_path / "text.txt"), "--max-tokens", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynamoe: error: the text of domain 'user' holds token id") and "outside the vocabulary of 300" in err
    assert "\n" not in err
