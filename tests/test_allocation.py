"""The headline report's allocation-by-need section: interpolation on the confidence router's dial curve, the
summary over seeds against hand-computed figures, the acceptance sentences, and the section end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dynamoe.allocation import NEED_PNG, SeedMeasure, acceptance_lines, interpolate, summarise
from dynamoe.analyze import NeedAnalysis
from dynamoe.experiment import RESULTS_JSON, SUMMARY_MD, HeadlineProfile, run_headline

# As test_experiment's, with a context that holds the hardest problems' prompts and answers.
SMOKE = HeadlineProfile("smoke", preset="tiny", tokens=4 * 2 * 64, bytes_per_domain=40_000, vocab_size=512, batch_size=2,
                        seq_len=64, lr=3e-3, eval_tokens=48, decode_tokens=3, repeats=1, batch_sizes=(2,), dial=(0.4, 0.6))


def need(spearman_a: float | None, spearman_b: float | None, level_k: list[float]) -> NeedAnalysis:
    return NeedAnalysis(
        mean_benefit_per_domain={"a": 0.1, "b": 0.2}, spearman_k_benefit=0.5,
        spearman_k_benefit_per_domain={"a": spearman_a, "b": spearman_b}, spearman_k_benefit_per_layer=[0.5],
        spearman_benefit_loss=0.1, mean_k_by_benefit_decile=[1.0] * 10, mean_benefit_by_decile=[0.0] * 10,
        top_benefit_budget_share=0.3, top_benefit_budget_share_per_domain={"a": 0.3, "b": 0.3}, levels=[1, 2, 3],
        tokens_per_level=[10, 10, 10], mean_k_per_level=level_k, loss_per_level=[1.0] * 3, mean_benefit_per_level=[0.0] * 3,
        k_rises_with_level=all(b > a for a, b in zip(level_k, level_k[1:])),
        spearman_benefit_expectation_per_domain={"a": 0.2, "b": 0.1 if spearman_b is None else spearman_b + 0.1})


def test_interpolation_on_a_dial_curve() -> None:
    curve = [(4.0, 40.0), (1.0, 10.0), (2.0, 20.0)]
    assert interpolate(curve, 1.5, log=False) == pytest.approx(15.0)
    assert interpolate(curve, 2 ** 0.5, log=True) == pytest.approx(10 * 2 ** 0.5)  # halfway in log k: geometric mean
    assert interpolate(curve, 0.5, log=False) is None and interpolate(curve, 4.5, log=True) is None


def test_summary_over_seeds_by_hand() -> None:
    measures = [SeedMeasure(need(0.4, 0.2, [1.0, 1.5, 2.0]), 50.0, 2.0, 1.1, 2.0, 52.0, 1.0, {"a": -0.1, "b": 0.3}),
                SeedMeasure(need(0.6, 0.3, [1.0, 2.0, 1.8]), 54.0, 2.2, 1.0, 2.1, 53.0, 1.0, {"a": 0.1, "b": 0.1})]
    s = summarise(measures)
    assert (s["seeds"], s["perplexity"], s["confidence_perplexity_at_k"]) == (2, 52.0, 52.5)
    assert s["seeds_no_worse_than_confidence"] == 1  # 50 <= 52, 54 > 53
    assert s["spearman_k_benefit_per_domain"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.25)}
    assert s["spearman_k_benefit_lowest_domain"] == pytest.approx(0.25) and s["spearman_k_benefit_lowest_seed_and_domain"] == 0.2
    assert s["mean_k_per_level"] == [1.0, 1.75, 1.9] and s["k_rises_with_level"] is True and s["seeds_k_rising"] == 1
    assert s["decode_time_vs_confidence"] == pytest.approx(1.05)
    assert s["spearman_k_loss_per_domain"] == {"a": pytest.approx(0.0), "b": pytest.approx(0.2)}
    assert s["spearman_benefit_expectation_per_domain"] == {"a": pytest.approx(0.2), "b": pytest.approx(0.35)}
    lines = acceptance_lines({"dynamic-2": s, "need-2": s})
    assert len(lines) == 1 and lines[0].startswith("need-2: Spearman(k, benefit) within every domain >= 0.3: does not hold")
    assert "for reference, Spearman(benefit, its expectation under the k_max prediction): a 0.200, b 0.350" in lines[0]
    assert "lowest domain 0.250" in lines[0] and "-1.0% (1/2 seeds no worse)" in lines[0] and "+5.0%" in lines[0]
    undefined = summarise([dataclasses.replace(measures[0], need=need(None, 0.5, [1.0, 1.0, 1.0]))])
    assert undefined["spearman_k_benefit_lowest_domain"] is None and undefined["k_rises_with_level"] is False


def test_headline_report_compares_allocation_by_need_with_the_confidence_router(tmp_path: Path, tiny_corpus: Path) -> None:
    out = tmp_path / "headline"
    results = run_headline(profile=SMOKE, models=["top2", "dynamic-2", "need-2"], out=out, corpus=tiny_corpus,
                           device="cpu", progress=False)
    section = results["allocation"]
    assert list(section["summary"]) == ["dynamic-2", "need-2"] and list(section["answers"]) == ["top2", "dynamic-2", "need-2"]
    measure = section["measures"]["need-2"][0]
    assert measure["confidence_perplexity"] is None or measure["confidence_perplexity"] > 0
    assert measure["need"]["levels"] == [1, 2, 3, 4, 5]
    assert section["answers"]["need-2"]["total"]["accuracy"] >= 0
    for model in ("dynamic-2", "need-2"):
        assert json.loads((out / "allocation" / "seed-0" / model / "analysis.json").read_text())["need"] is not None
    assert (out / NEED_PNG).read_bytes()[:4] == b"\x89PNG" and (out / "seed-0" / "answers" / "answers.md").is_file()
    summary = (out / SUMMARY_MD).read_text()
    assert "## Allocation by need" in summary and "need-2: Spearman(k, benefit) within every domain" in summary
    assert json.loads((out / RESULTS_JSON).read_text())["allocation"]["seeds"] == [0]
