"""The headline experiment: the whole pipeline on the tiny preset, reuse and resume after a kill, the verdict's
arithmetic and the claims seed by seed on hand-made rows, the profiles and models, and clear errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dynamoe.train
from dynamoe import experiment
from dynamoe.checkpoint import load_model
from dynamoe.cli import main
from dynamoe.config import tiny
from dynamoe.errors import DynamoeError
from dynamoe.experiment import (DEFAULT, DEFAULT_KEYS, DOMAINS_PNG, EXPERTS_PNG, GPU, LATENCY_PNG, MODEL_KEYS, MODELS, QUICK,
                                RESULTS_JSON, SUMMARY_MD, Claim, HeadlineProfile, Row, claim_lines, default_models, headline_profile,
                                model_config, report_lines, run_headline, seed_claims, static_perplexity_at,
                                training_compute, training_cost, verdict, verdict_lines)
from dynamoe.runs import default_workers

SMOKE = HeadlineProfile("smoke", preset="tiny", tokens=4 * 2 * 32, bytes_per_domain=40_000, vocab_size=512, batch_size=2,
                        seq_len=32, lr=3e-3, eval_tokens=48, decode_tokens=3, repeats=1, batch_sizes=(2,), dial=(0.4, 0.6))


def test_pipeline_runs_end_to_end_then_reuses_everything(tmp_path: Path, tiny_corpus: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "headline"
    kwargs = dict(profile=SMOKE, models=["top8", "top1", "dynamic-3"], out=out, corpus=tiny_corpus, device="cpu",
                  progress=False, command="dynamoe experiment headline ...")
    results = run_headline(**kwargs)
    assert [row["name"] for row in results["rows"]] == ["top8", "top1", "dynamic-3 @0.4", "dynamic-3 @0.6"]
    assert all(summary["step"] == SMOKE.steps == 4 for model in results["models"].values()
               for summary in model["training"].values())
    assert results["models"]["dynamic-3"]["config"]["target_k"] == 3.0 and results["seeds"] == [0]
    assert results["environment"]["torch"] == torch.__version__ and results["wall_time_s"] > 0
    assert results["profile"]["tokens_per_model"] == 256 and results["verdict"]["reference"] == "top8"
    assert results["analysis"]["checkpoint"].endswith("dynamic-3")

    saved = json.loads((out / RESULTS_JSON).read_text())
    assert saved["rows"] == results["rows"] and saved["command"] == "dynamoe experiment headline ..."
    summary = (out / SUMMARY_MD).read_text()
    assert "| top1 | topk |" in summary and "Headline target" in summary and "## Routing analysis" in summary
    for png in (EXPERTS_PNG, LATENCY_PNG, DOMAINS_PNG, "analysis/k_histograms.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "analysis" / "sample.html").is_file()
    capsys.readouterr()

    again = run_headline(**kwargs)
    printed = capsys.readouterr().out
    assert printed.count("[headline] reusing") == 4  # three models and the bench
    assert again["rows"] == results["rows"]


def test_a_killed_experiment_resumes_its_model_exactly(tmp_path: Path, tiny_corpus: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real_step = dynamoe.train.train_step

    def dies_at_step_3(*args: object, **kwargs: object) -> object:
        if args[4] == 3:  # the step: checkpoints of steps 1 and 2 (save_every = steps // 4) are on disk
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    kwargs = dict(profile=dataclasses.replace(SMOKE, dial=()), models=["top2"], corpus=tiny_corpus, device="cpu",
                  progress=False)
    monkeypatch.setattr(dynamoe.train, "train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_headline(out=tmp_path / "killed", **kwargs)
    monkeypatch.setattr(dynamoe.train, "train_step", real_step)
    run_headline(out=tmp_path / "killed", **kwargs)
    assert "[headline] resuming static top-2 (seed 0)" in capsys.readouterr().out
    run_headline(out=tmp_path / "straight", **kwargs)
    resumed, _ = load_model(tmp_path / "killed" / "seed-0" / "top2")
    straight, _ = load_model(tmp_path / "straight" / "seed-0" / "top2")
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), name


def row(name: str, router: str, mean_k: float | None, perplexity: float, latency_ratio: float,
        threshold: float | None = None, as_trained: bool = True) -> Row:
    return Row(name=name, model=name.split(" ")[0], title=name, router=router, threshold=threshold, as_trained=as_trained,
               mean_k=mean_k, perplexity=perplexity, perplexity_std=0.0, perplexity_per_domain={"prose": perplexity},
               latency_ms=4.0 * latency_ratio, latency_ratio=latency_ratio, ideal_ratio=latency_ratio, seeds=1)


STATIC = [row("top8", "topk", 8.0, 29.7, 1.0), row("top4", "topk", 4.0, 30.0, 0.7), row("top2", "topk", 2.0, 32.0, 0.5),
          row("top1", "topk", 1.0, 40.0, 0.4), row("dense", "dense", None, 33.0, 0.5)]


def test_static_curve_is_interpolated_in_log_k_and_log_perplexity() -> None:
    # Between top-2 (32) and top-4 (30), a quarter of the way in log2 k at k = 2 * 2**0.25.
    assert static_perplexity_at(STATIC, 2 * 2 ** 0.25) == pytest.approx(32 * (30 / 32) ** 0.25)
    assert static_perplexity_at(STATIC, 4.0) == pytest.approx(30.0)
    assert static_perplexity_at(STATIC, 9.0) is None and static_perplexity_at(STATIC, 0.5) is None
    assert static_perplexity_at(STATIC[:1], 8.0) is None  # one static model is no curve


def test_plots_label_their_axes_and_draw_both_static_curves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures, original_figure = [], experiment._figure
    monkeypatch.setattr(experiment, "_figure", lambda *size: figures.append(original_figure(*size)) or figures[-1])
    rows = [*STATIC, *WARM, row("dynamic-2 @0.5", "dynamic", 2.0, 31.0, 0.5, 0.5)]
    for attribute, label in (("mean_k", "mean experts per token"), ("latency_ms", "batch-1 decode latency")):
        experiment.plot_perplexity_against(rows, attribute, label, tmp_path / "plot.png")
        [axes] = figures[-1].axes
        assert axes.get_xlabel() == label  # once overwritten by a curve's legend entry
        legend = [text.get_text() for text in axes.get_legend().get_texts()]
        assert {"static top-k", "static top-k, warmed up", "dynamic-2 @0.5"} <= set(legend)


def test_verdict_met_when_a_dynamic_variant_is_at_parity_fast_and_below_the_static_curve() -> None:
    rows = [*STATIC, row("dynamic-3 @0.5", "dynamic", 2.5, 29.9, 0.55, 0.5),
            row("dynamic-3 @0.3", "dynamic", 1.8, 31.0, 0.45, 0.3, as_trained=False)]
    result = verdict(rows)
    assert result.fastest_at_parity == "dynamic-3 @0.5"  # @0.3 is faster but 4.4% worse than top-8
    assert result.latency_reduction_at_parity == pytest.approx(0.45)
    margins = {c.name: c.margin for c in result.equal_compute}
    assert margins["dynamic-3 @0.5"] == pytest.approx(29.9 / (32 * (30 / 32) ** math.log2(2.5 / 2)) - 1)
    assert margins["dynamic-3 @0.3"] == pytest.approx(31.0 / (40 * (32 / 40) ** math.log2(1.8)) - 1)
    assert result.parity_met and result.latency_met and result.equal_compute_met and result.target_met
    assert verdict_lines(result)[-1] == "Headline target MET on one seed."
    assert not result.equal_compute_warm and "static top-k (no warm-up) curve" in verdict_lines(result)[1]


def test_verdict_states_the_shortfall() -> None:
    result = verdict([*STATIC, row("dynamic-3 @0.5", "dynamic", 3.0, 30.2, 0.65, 0.5)])
    assert not result.parity_met and not result.target_met and result.closest == "dynamic-3 @0.5"
    assert result.closest_gap == pytest.approx(30.2 / 29.7 - 1)
    assert result.closest_latency_reduction == pytest.approx(0.35)
    lines = verdict_lines(result)
    assert "+1.7% from top8's 29.70" in lines[0] and lines[-1] == "Headline target NOT met on one seed."
    assert verdict(STATIC[1:]).reference is None  # no top-8: no verdict
    assert verdict_lines(verdict(STATIC[1:]))[0].startswith("No verdict")


def test_profiles_budget_and_models(tiny_corpus: Path) -> None:
    assert DEFAULT.steps == 1_000_000 // (8 * 256) == 488 and DEFAULT.tokens_per_model == 488 * 2048
    assert DEFAULT.warmup_steps == 48 and DEFAULT.preset == "small" and QUICK.model_overrides
    assert headline_profile("quick") == QUICK and QUICK.seeds == (0, 1, 2) and DEFAULT.seeds == (0,)
    assert headline_profile("quick", preset_name="tiny").model_overrides == {}  # another preset: no narrowing
    assert headline_profile(tokens=4096).steps == 2
    with pytest.raises(DynamoeError, match="less than one step"):
        headline_profile(tokens=100)
    with pytest.raises(DynamoeError, match="unknown profile 'fast'; choose one of: default, quick, gpu"):
        headline_profile("fast")
    assert len(MODEL_KEYS) == len(set(MODEL_KEYS)) == 16 and MODEL_KEYS[0] == "top8"
    assert DEFAULT_KEYS == tuple(key for key in MODEL_KEYS if key != "null-2")
    configs = {m.key: model_config(m, QUICK, tiny_corpus) for m in MODELS}
    shapes = {(c.dim, c.n_layers, c.n_experts, c.expert_dim, c.vocab_size, c.max_seq_len) for c in configs.values()}
    assert shapes == {(128, 2, 16, 512, 512, 128)}  # one architecture; the corpus's vocabulary
    assert configs["dense"].ffn == "dense" and configs["dense"].dense_hidden == 2 * configs["top2"].expert_dim
    assert [configs[f"dynamic-{k}"].target_k for k in (2, 3, 4)] == [2.0, 3.0, 4.0]
    assert [configs[key].router for key in ("topp-3", "relu-3", "dtopp-3")] == ["topp", "relu", "dtopp"]
    # Every adaptive router, and the -warm static ones, warm up from dense routing: k_max for 30% of the steps,
    # then falling to their own k over the next 30%; the other static models and dense do not.
    assert QUICK.dense_warmup_steps == int(0.3 * QUICK.steps) == 76
    warm = ("top4-warm", "top2-warm", "top1-warm", "dynamic-2", "dynamic-3", "dynamic-4", "topp-3", "relu-3", "dtopp-3",
            "need-2", "null-2")
    assert {key: (c.target_k_hold_steps, c.target_k_decay_steps) for key, c in configs.items()
            if c.target_k_hold_steps or c.target_k_decay_steps} == {key: (76, 76) for key in warm}
    assert all(configs[f"top{k}-warm"] == dataclasses.replace(configs[f"top{k}"], target_k_hold_steps=76,
                                                             target_k_decay_steps=76) for k in (1, 2, 4))
    cold = dataclasses.replace(QUICK, dense_warmup=0.0)
    unwarmed = model_config(MODELS[-1], cold, tiny_corpus)
    assert (unwarmed.target_k_hold_steps, unwarmed.target_k_decay_steps) == (0, 0)
    assert default_models(DEFAULT) == list(DEFAULT_KEYS) and "top2-warm" not in default_models(cold)
    assert set(default_models(QUICK)) == set(DEFAULT_KEYS) - {"dynamic-4", "topp-3", "relu-3"}


@pytest.mark.parametrize("args, message", [
    (["--models", "top3"], "give distinct models among top8"),
    (["--seeds", "1", "1"], "give one or more distinct seeds"),
    (["--tokens", "10"], "less than one step"),
    (["--threads", "0"], "--threads=0 must be at least 1"),
    (["--jobs", "0"], "--jobs=0 must be at least 1"),
    (["--dense-warmup", "1.5"], "--dense-warmup 1.5 must be a fraction of the steps in [0, 1]"),
    (["--quick", "--profile", "gpu"], "--quick is --profile quick; it cannot go with --profile gpu"),
    (["--dense-warmup", "0", "--models", "top8", "top2-warm"], "--dense-warmup 0 leaves nothing to warm up: top2-warm"),
])
def test_cli_refuses_bad_choices(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "headline", "--out", str(tmp_path), "--data-root", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "headline-default").exists()  # refused before building anything


def test_cli_runs_the_experiment_and_records_its_command(tmp_path: Path, tiny_corpus: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = ["experiment", "headline", "--preset", "tiny", "--tokens", "2048", "--models", "top1", "relu-3",
            "--dense-warmup", "0", "--corpus", str(tiny_corpus), "--out", str(tmp_path / "h"), "--no-progress",
            "--device", "cpu"]
    assert main(args) == 0
    results = json.loads((tmp_path / "h" / RESULTS_JSON).read_text())
    assert results["command"] == (f"dynamoe experiment headline --preset tiny --tokens 2048 --dense-warmup 0.0 --seeds 0 "
                                  f"--models top1 relu-3 --out {tmp_path / 'h'}")
    assert results["profile"]["steps"] == 1 and results["profile"]["model_overrides"] == {}
    assert results["profile"]["dense_warmup"] == 0.0 and results["models"]["relu-3"]["config"]["target_k_hold_steps"] == 0
    assert [row["name"] for row in results["rows"]] == ["top1", "relu-3"] and results["bench"]["0"]["settings"]["dial"] == []
    assert "No verdict" in capsys.readouterr().out


def test_verdict_without_a_comparable_trained_dynamic_model() -> None:
    rows = [*STATIC, row("dynamic-2 @0.5", "dynamic", 0.8, 45.0, 0.3, 0.5),  # below top-1's k: off the static curve
            row("dynamic-2 @0.7", "dynamic", 1.5, 35.0, 0.35, 0.7, as_trained=False)]
    result = verdict(rows)
    assert result.equal_compute_met is None and not result.target_met
    assert [c.static_perplexity is None for c in result.equal_compute] == [True, False]
    assert "the dynamic models at their trained threshold have a mean k outside the static range" in verdict_lines(result)[1]


def test_report_names_other_models_at_parity_and_adaptive_models_off_target() -> None:
    rows = [*STATIC[:4], row("dense", "dense", None, 29.9, 0.34), row("dynamic-2 @0.5", "dynamic", 2.2, 29.8, 0.5, 0.5),
            row("relu-3", "relu", 1.16, 29.0, 0.33), row("topp-3 @0.5", "topp", 3.3, 30.5, 0.6, 0.5),
            row("topp-3 @0.3", "topp", 1.2, 31.0, 0.4, 0.3, as_trained=False)]
    models = {"dynamic-2": 2.0, "relu-3": 3.0, "topp-3": 3.0, "top8": 3.0, "dense": 3.0}  # ModelConfig's default is 3
    results = {"models": {key: {"config": {"target_k": k}} for key, k in models.items()}, "seeds": [0]}
    lines = report_lines(results, rows, verdict(rows))
    assert lines[:3] == verdict_lines(verdict(rows))
    # The dynamic variant is the verdict's; the other models within 1% of top-8 are named with their speed-up.
    assert lines[3] == ("Also within 1% of top8's perplexity: dense (29.90, 66.0% lower latency), "
                        "relu-3 (29.00, 67.0% lower latency).")
    # relu-3 is 61% below its target; dynamic-2 (+10%) and topp-3 (+10%) are within 25%; static models and a
    # dial setting are never flagged.
    assert lines[4:] == ["Off target: relu-3 runs 1.16 experts/token on the held-out text against its target of 3."]


def test_trainings_in_parallel_processes_give_the_same_models_as_one_by_one(tmp_path: Path, tiny_corpus: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    kwargs = dict(profile=SMOKE, models=["top2", "dynamic-3"], corpus=tiny_corpus, device="cpu", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: matmul results may depend on it
    try:
        serial = run_headline(out=tmp_path / "serial", **kwargs)
    finally:
        torch.set_num_threads(threads)
    parallel = run_headline(out=tmp_path / "parallel", workers=2, threads=1, **kwargs)
    for key in ("top2", "dynamic-3"):
        one, two = (r["models"][key]["training"]["0"] for r in (serial, parallel))
        assert two["val_loss"] == one["val_loss"] and two["mean_k"] == one["mean_k"]
    assert [row["perplexity"] for row in parallel["rows"]] == [row["perplexity"] for row in serial["rows"]]
    assert parallel["training_workers"] == 2 and "training dynamic, target k=3 (seed 0)" in capsys.readouterr().out


def test_costliest_trainings_go_first_and_workers_share_the_cores(tiny_corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    costs = {model.key: training_cost(model_config(model, DEFAULT, tiny_corpus), DEFAULT) for model in MODELS}
    assert costs["top8"] == 8 and costs["dense"] == costs["top2"] == 2 and costs["top1"] == 1
    # The warm-up holds k_max for 30% of the steps and falls over the next 30%: 0.3 * 8 + 0.3 * 5.5 + 0.4 * 3.
    assert costs["dynamic-3"] == pytest.approx(0.3 * 8 + 0.3 * 5.5 + 0.4 * 3, rel=0.01)
    assert costs["top2-warm"] == costs["dynamic-2"] and costs["dtopp-3"] == costs["dynamic-3"]
    assert costs["top8"] > costs["dynamic-4"] > costs["dynamic-3"] > costs["dynamic-2"] > costs["top4"] > costs["top2"]
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert default_workers("cpu") == (4, 2) and default_workers("cpu", jobs=8) == (8, 1) and default_workers("cuda") == (1, 8)


WARM = [row("top4-warm", "topk", 4.0, 29.4, 0.7), row("top2-warm", "topk", 2.0, 30.0, 0.5),
        row("top1-warm", "topk", 1.0, 33.0, 0.4)]
for warm_row in WARM:
    warm_row.warm = True


def test_equal_compute_is_judged_against_the_warmed_up_static_curve_when_there_is_one() -> None:
    dynamic = row("dynamic-2 @0.5", "dynamic", 2.0, 31.0, 0.5, 0.5)
    cold_only = verdict([*STATIC, dynamic])
    assert cold_only.equal_compute_met and not cold_only.equal_compute_warm  # 31.0 beats cold top-2's 32.0 ...
    both = verdict([*STATIC, *WARM, dynamic])
    assert both.equal_compute_warm and both.equal_compute_met is False  # ... but not warm top-2's 30.0
    [comparison] = both.equal_compute
    assert comparison.margin == pytest.approx(31 / 32 - 1) and comparison.warm_margin == pytest.approx(31 / 30 - 1)
    # The warm curve runs through top-8 (29.7 at k = 8), which a warm-up from k_max = 8 would not change.
    assert static_perplexity_at([*STATIC, *WARM], 6.0, warm=True) == pytest.approx(29.4 * (29.7 / 29.4) ** math.log2(1.5))
    assert "warmed-up static top-k curve" in verdict_lines(both)[1]


def test_a_claim_is_established_only_when_every_seed_agrees() -> None:
    everywhere = Claim("a", {0: -0.02, 1: -0.001, 2: -0.05}, bound=0.0)
    one_seed_off = Claim("b", {0: -0.053, 1: 0.026, 2: 0.015}, bound=0.0)
    parity = Claim("c", {0: 0.01, 1: 0.004, 2: None}, bound=0.01, inclusive=True)  # seed 2 could not measure it
    assert (everywhere.seeds_agreeing, everywhere.established) == (3, True)
    assert (one_seed_off.seeds_agreeing, one_seed_off.established) == (1, False)
    assert (parity.seeds_agreeing, parity.established) == (2, False) and parity.holds_on(0)  # at the bound: inclusive
    mean, sd = one_seed_off.mean_sd
    assert mean == pytest.approx(-0.004) and sd == pytest.approx(float(np.std([-0.053, 0.026, 0.015], ddof=1)))
    assert parity.mean_sd[0] == pytest.approx(0.007)
    table = claim_lines([everywhere, one_seed_off]).splitlines()
    assert table[0] == "| claim | seed 0 | seed 1 | seed 2 | mean ± sd | seeds agreeing | status |"
    assert table[2] == "| a | -2.0% | -0.1% | -5.0% | -2.4% ± 2.5 | 3 of 3 | established |"
    assert table[3].endswith("| 1 of 3 | not established |")


def test_claims_are_tested_on_each_seed_with_its_own_rows() -> None:
    # The numbers: top-8, warm top-2 and dynamic-2 (at k 2.08, 2.01, 1.96) on three seeds.
    seeds = {0: (31.65, 32.22, 30.52, 2.08), 1: (30.62, 30.96, 31.77, 2.01), 2: (30.00, 30.35, 30.81, 1.96)}
    rows_by_seed = {}
    for seed, (top8, top2_warm, dynamic, k) in seeds.items():
        warm = [row("top2-warm", "topk", 2.0, top2_warm, 0.5), row("top1-warm", "topk", 1.0, 40.0, 0.4)]
        for warm_row in warm:
            warm_row.warm = True
        rows_by_seed[seed] = [row("top8", "topk", 8.0, top8, 1.0), *warm, row("dense", "dense", None, top8 / (0.96, 0.965, 0.98)[seed], 0.3),
                              row("dynamic-2", "dynamic", k, dynamic, 0.55, 0.5),
                              row("dtopp-2", "dtopp", 2.0, dynamic * 1.01 if seed else dynamic * 0.99, 0.5)]
    means = [row("top8", "topk", 8.0, 30.76, 1.0), *WARM[1:], row("dynamic-2", "dynamic", 2.02, 31.03, 0.55, 0.5)]
    claims = seed_claims(rows_by_seed, verdict(means), {"dynamic-2": 2.0, "dtopp-2": 2.0})
    regime, parity, equal, versus = claims
    # Top-8 4%, 3.5% and 2% below dense: at least 3% below it on seeds 0 and 1 only.
    assert regime.statement == "top8 at least 3% below dense (a MoE pays)" and regime.seeds_agreeing == 2
    assert regime.margins[0] == pytest.approx(-0.04)
    assert parity.statement == "dynamic-2 within 1% of top8"
    assert [round(100 * parity.margins[s], 1) for s in seeds] == [-3.6, 3.8, 2.7] and parity.seeds_agreeing == 1
    # Against warm top-2 at dynamic-2's own k of that seed (interpolated toward top-1 below k = 2, toward top-8 above).
    assert equal.margins[2] == pytest.approx(30.81 / (30.35 * (40.0 / 30.35) ** -math.log2(1.96 / 2)) - 1)
    assert equal.margins[1] == pytest.approx(31.77 / (30.96 * (30.62 / 30.96) ** (math.log2(2.01 / 2) / 2)) - 1)
    assert equal.seeds_agreeing == 1 and not equal.established
    assert versus.statement == "dynamic-2 better than dtopp-2 (the same target k)"
    assert versus.margins[0] == pytest.approx(1 / 0.99 - 1) and versus.seeds_agreeing == 2 and not versus.established


def test_training_compute_counts_the_logged_experts(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 10, "mean_k": 8.0}, {"step": 20, "mean_k": 4.0, "skipped": False},
               {"step": 25, "mean_k": None, "skipped": True}, {"step": 30, "mean_k": 3.0}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    moe = tiny(router="dynamic")
    compute = training_compute(run, moe, tokens=1000)
    assert compute["mean_k"] == pytest.approx(5.0)
    assert compute["ffn_flops"] == pytest.approx(6 * 1000 * moe.n_layers * 5.0 * 3 * moe.dim * moe.expert_dim)
    dense = tiny(ffn="dense", top_k=2)  # no routing to log: its hidden size, in experts
    assert training_compute(tmp_path / "nothing", dense, tokens=1000)["mean_k"] == 2.0


def test_gpu_profile_machinery_at_tiny_size(tmp_path: Path, tiny_corpus: Path) -> None:
    assert GPU.gpu_parallel and GPU.bytes_per_domain is None and GPU.math_docs and GPU.seeds == (0,)
    assert GPU.steps == 2048 and GPU.tokens_per_model == 2048 * 64 * 256
    tiny_gpu = dataclasses.replace(headline_profile("gpu", preset_name="tiny"), tokens=4 * 2 * 32, batch_size=2,
                                   seq_len=32, eval_tokens=48, decode_tokens=3, repeats=1, batch_sizes=(2,), dial=())
    results = run_headline(tiny_gpu, models=["top8", "top2-warm", "dynamic-3", "dtopp-3"], out=tmp_path / "gpu",
                           corpus=tiny_corpus, device="cpu", progress=False)
    assert results["profile"]["name"] == "gpu" and results["seeds"] == [0]
    assert [row["name"] for row in results["rows"]] == ["top8", "top2-warm", "dynamic-3", "dtopp-3"]
    assert results["rows"][1]["warm"] and results["rows"][3]["threshold"] is None  # DTop-p has no dial
    compute = results["models"]["top2-warm"]["compute"]["0"]
    assert 2.0 < compute["mean_k"] < 8.0  # it stepped down from k_max during its four steps
    summary = (tmp_path / "gpu" / SUMMARY_MD).read_text()
    assert "| claim | seed 0 |" in summary and "FFN TFLOPs" in summary and results["verdict"]["equal_compute_warm"]
    assert [claim["statement"] for claim in results["claims"]][1:] == [  # no dense model: no regime claim
        "dynamic-3 below the warmed-up static top-k curve at its own experts/token",
        "dynamic-3 better than dtopp-3 (the same target k)"]


@pytest.mark.parametrize("args, out, seeds, models", [
    ([], "runs/headline", [0], 15), (["--quick"], "runs/headline-quick", [0, 1, 2], 12),
    (["--profile", "gpu"], "runs/headline-gpu", [0], 15), (["--profile", "quick", "--dense-warmup", "0"],
                                                           "runs/headline-quick", [0, 1, 2], 9)])
def test_each_profile_has_its_own_report_folder_seeds_and_models(args: list[str], out: str, seeds: list[int], models: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    asked: dict = {}
    monkeypatch.setattr("dynamoe.experiment.run_headline", lambda profile, **kwargs: asked.update(kwargs, profile=profile))
    assert main(["experiment", "headline", "--device", "cpu", *args]) == 0
    assert str(asked["out"]) == out and asked["seeds"] == seeds and len(asked["models"]) == models
    assert asked["command"].endswith(f"--out {out}")


WATCHED_JOB = '''
import os, signal, sys, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from dynamoe.runs import start_worker


def task(folder: str) -> None:
    def stop(*_: object) -> None:  # what a training does on SIGTERM: save, then end
        (Path(folder) / "stopped").write_text("1")
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    (Path(folder) / "ready").write_text(str(os.getpid()))
    time.sleep(60)


if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=start_worker, initargs=(1,)) as pool:
        pool.submit(task, sys.argv[1]).result()
'''


def test_a_training_worker_stops_when_its_job_is_killed(tmp_path: Path) -> None:
    """`kill -9` of a headline or demo job: its spawned workers get SIGTERM (save and stop), not training on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "job.py"
    script.write_text(WATCHED_JOB)
    job = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "ready").exists(), "the worker never started"
        job.kill()
        job.wait()
        deadline = time.monotonic() + 10
        while not (tmp_path / "stopped").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "stopped").exists()  # within a poll of the job's death
    finally:
        job.kill()
        if (tmp_path / "ready").exists() and not (tmp_path / "stopped").exists():
            os.kill(int((tmp_path / "ready").read_text()), signal.SIGKILL)
