"""The main job, end to end on the tiny preset: trains both models, compares them, then reuses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamoe.demo import DYNAMIC, FULL, STATIC, DemoProfile, demo_models, run_demo

TINY = DemoProfile("tiny", bytes_per_domain=40_000, vocab_size=512, steps=4, batch_size=2, seq_len=32, lr=3e-3,
                   warmup_steps=1, eval_tokens=64, preset="tiny")


def test_demo_runs_end_to_end_and_reuses_trained_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Both trainings at once in worker processes (their own output is not captured here), then reused in this one.
    results = run_demo(out_root=tmp_path / "runs", data_root=tmp_path / "data", profile=TINY, workers=2)
    out = capsys.readouterr().out
    assert results["training_workers"] == 2
    assert set(results["models"]) == {"static top-3", "dynamic (target k=3)"}
    static = results["models"]["static top-3"]["eval"]["total"]
    dynamic = results["models"]["dynamic (target k=3)"]["eval"]["total"]
    assert static["mean_k"] == 3.0 and 1.0 <= dynamic["mean_k"] <= 8.0
    assert {"ppl prose", "ppl code", "ppl math", "mean k all", "train tokens/s"} <= {line[:22].strip() for line in out.splitlines()}
    saved = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
    assert saved["models"]["static top-3"]["eval"]["total"]["perplexity"] == pytest.approx(static["perplexity"])

    again = run_demo(out_root=tmp_path / "runs", data_root=tmp_path / "data", profile=TINY, workers=1)
    assert capsys.readouterr().out.count("[demo] reusing") == 2
    assert again["models"]["dynamic (target k=3)"]["eval"] == results["models"]["dynamic (target k=3)"]["eval"]
    runs = tmp_path / "runs" / "tiny"
    assert sorted(path.name for path in runs.iterdir() if path.is_dir()) == ["dynamic", "static"]
    assert not list(runs.glob("*/*.tmp"))


def test_demo_retrains_a_finished_run_whose_summary_is_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_demo(out_root=tmp_path / "runs", data_root=tmp_path / "data", profile=TINY, workers=1)
    summary = tmp_path / "runs" / "tiny" / "static" / "summary.json"
    summary.write_text('{"step": 4, "model_con')  # cut short
    capsys.readouterr()
    run_demo(out_root=tmp_path / "runs", data_root=tmp_path / "data", profile=TINY, workers=1)
    out = capsys.readouterr().out
    assert out.count("[demo] reusing") == 1 and "training it again from scratch" in out
    assert json.loads(summary.read_text())["step"] == 4


def test_demo_dynamic_model_warms_up_from_dense_routing_as_the_experiment_does() -> None:
    models = demo_models(FULL)
    assert (models[DYNAMIC].config.target_k_hold_steps, models[DYNAMIC].config.target_k_decay_steps) == (90, 90)
    assert models[STATIC].config.target_k_hold_steps == 0 and models[STATIC].config.router == "topk"
