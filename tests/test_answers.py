"""Cost per useful output: the answer prompts, exact-match checking, the accounting of time and cost per correct
answer, the outputs and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import dynamoe.answers as answers_module
from dynamoe.answers import ANSWERS_JSON, ANSWERS_MD, AnswerReport, LevelScore, run_answers
from dynamoe.checkpoint import save_checkpoint
from dynamoe.cli import main
from dynamoe.config import tiny
from dynamoe.data.mathgen import answer_prompt, format_problem, solve_problem
from dynamoe.data.tokenizer import load_tokenizer
from dynamoe.generate import Generation
from dynamoe.model import Transformer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> list[Path]:
    """A tiny random dynamic model and a dense one, saved with the corpus's tokenizer."""
    root = tmp_path_factory.mktemp("answers")
    paths = []
    for name, cfg in (("dynamic", tiny(router="dynamic")), ("dense", tiny(ffn="dense"))):
        torch.manual_seed(0)
        save_checkpoint(root / name, 1, Transformer(cfg), {"step": 1, "optimizer": {}}, {}, tiny_corpus / "tokenizer.json")
        paths.append(root / name)
    return paths


def test_answer_prompt_is_the_problem_line_up_to_the_answer() -> None:
    line = format_problem("What is 2 + 3?", "5")
    assert line.startswith(answer_prompt("What is 2 + 3?")) and line[len(answer_prompt("What is 2 + 3?")):] == " 5"


def test_cost_per_correct_answer_is_price_times_time_over_correct_answers() -> None:
    report = AnswerReport("m", "ckpt", "dynamic", [LevelScore(1, 10, 4, 2.0, 30, 60.0), LevelScore(2, 10, 0, 3.0, 40, 100.0)],
                          price_per_hour=3.6)
    assert report.cost_per_correct(report.levels[0]) == pytest.approx(3.6 / 3600 * 2.0 / 4)
    assert report.cost_per_correct(report.levels[1]) is None  # nothing correct: no cost per correct answer
    total = report.total
    assert (total.problems, total.correct, total.seconds, total.accuracy) == (20, 4, 5.0, 0.2)
    assert report.cost_per_correct(total) == pytest.approx(3.6 / 3600 * 5.0 / 4)
    summary = report.to_dict()["summary"]
    assert summary["total"]["mean_k"] == pytest.approx(160 / 70) and summary["2"]["accuracy"] == 0.0


def test_a_model_that_solves_every_problem_scores_all_of_them(checkpoints: list[Path], tiny_corpus: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With generation replaced by a solver reading the prompt, every answer is checked correct: the prompt holds
    the question and the answer's text is compared whitespace aside."""
    tokenizer = load_tokenizer(tiny_corpus)
    prompts = []

    def solver(model: Transformer, prompt_ids: list[int], *args: Any, **kwargs: Any) -> list[Generation]:
        text = tokenizer.decode(prompt_ids[1:])
        prompts.append(text)
        question = text.removeprefix("Q: ").removesuffix(" A:")
        return [Generation([1, 2, 3], f" {solve_problem(question)}", [2.0, 2.0, 2.0], "stop")]

    monkeypatch.setattr(answers_module, "generate", solver)
    reports = run_answers(checkpoints[:1], tmp_path, problems=3, levels=[2, 5], progress=False)
    assert all(p.startswith("Q: ") and p.endswith(" A:") for p in prompts)
    total = reports[0].total
    assert (total.problems, total.correct, total.generated_tokens) == (6, 6, 18)
    assert reports[0].cost_per_correct(total) == pytest.approx(0.10 / 3600 * total.seconds / 6)


def test_answers_of_real_models_and_their_outputs(checkpoints: list[Path], tmp_path: Path) -> None:
    reports = run_answers(checkpoints, tmp_path, problems=2, levels=[1, 3], progress=False)
    assert [r.router for r in reports] == ["dynamic", "dense"] and [r.name for r in reports] == ["dynamic", "dense"]
    for report in reports:
        assert [s.level for s in report.levels] == [1, 3] and report.total.problems == 4
        assert report.total.seconds > 0 and 4 <= report.total.generated_tokens <= 4 * answers_module.MAX_ANSWER_TOKENS
    assert reports[0].mean_k(reports[0].total) is not None and reports[1].mean_k(reports[1].total) is None
    saved = json.loads((tmp_path / ANSWERS_JSON).read_text())
    assert saved["problems_per_level"] == 2 and saved["reports"][0]["summary"]["1"]["accuracy"] == reports[0].levels[0].accuracy
    table = (tmp_path / ANSWERS_MD).read_text()
    assert table.count("\n") == 4 and "$ per 1k correct" in table


def test_answers_cli(checkpoints: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["answers", str(checkpoints[0]), "--problems", "1", "--levels", "1", "--out", str(tmp_path), "--no-progress",
            "--device", "cpu", "--threads", "1"]
    assert main(args) == 0
    assert "acc. level 1" in capsys.readouterr().out
    assert main([*args[:-4], "--levels", "6"]) == 2
    assert "math difficulty must be an integer from 1 to 5, got 6" in capsys.readouterr().err
    assert main([*args[:2], "--problems", "0"]) == 2
    assert "--problems >= 1" in capsys.readouterr().err
