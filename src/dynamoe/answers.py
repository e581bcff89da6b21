"""Cost per useful output: greedy answers to held-out math problems, their exact-match accuracy per difficulty
level, and what one correct answer costs at bench's price (machine price per hour x the time to answer).

Each problem is asked as a `Q: ... A:` prompt after an end-of-text token (where a document starts); the
answer is the greedy continuation up to the end of the line, checked against the generator's by solving
the question afresh. The checkpoints answer each problem in turn, one after another (interleaved, batch
1), so that the machine's drifts fall on all of them alike; the time of an answer is its prefill and decode.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from dynamoe.bench import short_names
from dynamoe.checkpoint import load_model, load_tokenizer_for
from dynamoe.data.mathgen import (MAX_DIFFICULTY, MIN_DIFFICULTY, answer_prompt, check_answer, difficulty_range,
                                  held_out_problems)
from dynamoe.data.tokenizer import eos_id
from dynamoe.errors import DynamoeError
from dynamoe.generate import GREEDY, generate
from dynamoe.model import Transformer
from dynamoe.train import resolve_device

MAX_ANSWER_TOKENS = 16  # the longest answer (level 5, `x = -500` or seven digits and a sign) and the newline fit
ANSWERS_JSON, ANSWERS_MD = "answers.json", "answers.md"


@dataclass
class LevelScore:
    """One checkpoint's answers to the problems of one difficulty level."""

    level: int
    problems: int
    correct: int
    seconds: float  # prefill and decode of every answer, batch 1
    generated_tokens: int
    experts: float  # experts run per generated token, summed over them (mean k x tokens); 0 for a dense model

    @property
    def accuracy(self) -> float:
        return self.correct / self.problems if self.problems else 0.0


@dataclass
class AnswerReport:
    """A checkpoint's accuracy and cost per correct answer, per level and over all levels."""

    name: str
    checkpoint: str
    router: str  # "dense" for a dense feed-forward
    levels: list[LevelScore]
    price_per_hour: float

    @property
    def total(self) -> LevelScore:
        """All levels as one."""
        return LevelScore(0, sum(s.problems for s in self.levels), sum(s.correct for s in self.levels),
                          sum(s.seconds for s in self.levels), sum(s.generated_tokens for s in self.levels),
                          sum(s.experts for s in self.levels))

    def cost_per_correct(self, score: LevelScore) -> float | None:
        """USD per correct answer at price_per_hour; None when no answer was correct."""
        return self.price_per_hour / 3600 * score.seconds / score.correct if score.correct else None

    def to_dict(self) -> dict[str, Any]:
        rows = {"total": self.total, **{str(score.level): score for score in self.levels}}
        return {**asdict(self), "summary": {
            key: {"accuracy": score.accuracy, "cost_per_correct": self.cost_per_correct(score),
                  "ms_per_answer": 1e3 * score.seconds / max(score.problems, 1), "mean_k": self.mean_k(score)}
            for key, score in rows.items()}}

    def mean_k(self, score: LevelScore) -> float | None:
        """Experts per generated token; None for a dense model."""
        return score.experts / score.generated_tokens if self.router != "dense" and score.generated_tokens else None


def answer_once(model: Transformer, tokenizer: Tokenizer, question: str) -> tuple[str, float, int, float]:
    """The greedy answer to one question, the seconds it took, its tokens, and the experts they ran (summed)."""
    eos = eos_id(tokenizer)
    prompt = [eos, *tokenizer.encode(answer_prompt(question), add_special_tokens=False).ids]
    room = min(MAX_ANSWER_TOKENS, model.config.max_seq_len - len(prompt))  # a long answer is cut at the context
    if room < 1:
        raise DynamoeError(f"the question {question!r} takes {len(prompt)} tokens, the model's whole context of "
                           f"{model.config.max_seq_len}: it cannot answer; ask easier levels")
    started = time.perf_counter()
    generation = generate(model, prompt, room, GREEDY, stop_ids={eos}, stop=("\n",), decode=tokenizer.decode)[0]
    seconds = time.perf_counter() - started
    return generation.text.strip(), seconds, len(generation.token_ids), sum(generation.experts)


def answer_problems(models: Sequence[Transformer], tokenizers: Sequence[Tokenizer], level: int,
                    problems: Sequence[tuple[str, str]], progress: bool = False) -> list[LevelScore]:
    """Each model's score on the problems of one level, the models taking every problem in turn."""
    scores = [LevelScore(level, 0, 0, 0.0, 0, 0.0) for _ in models]
    for question, _ in tqdm(problems, desc=f"answers, level {level}", disable=not progress, leave=False):
        for model, tokenizer, score in zip(models, tokenizers, scores):
            text, seconds, tokens, experts = answer_once(model, tokenizer, question)
            score.problems += 1
            score.correct += check_answer(question, text)
            score.seconds += seconds
            score.generated_tokens += tokens
            score.experts += experts
    return scores


def run_answers(checkpoints: Sequence[Path], out: Path, problems: int = 100,
                levels: Sequence[int] = tuple(range(MIN_DIFFICULTY, MAX_DIFFICULTY + 1)), seed: int = 0,
                price_per_hour: float = 0.10, device: str | torch.device = "auto", progress: bool = True) -> list[AnswerReport]:
    """Accuracy and cost per correct answer of each checkpoint on `problems` held-out problems per level;
    write answers.json and answers.md to `out`."""
    if not checkpoints or problems < 1 or not levels or not price_per_hour >= 0:
        raise DynamoeError(f"answers needs checkpoints, --problems >= 1 (got {problems}), levels and a price >= 0")
    for level in levels:
        difficulty_range(level)  # a one-line error for a level the generator does not have, before the slow load
    torch_device = resolve_device(device) if isinstance(device, str) else device
    models = [load_model(checkpoint, device=torch_device, pack=True)[0] for checkpoint in checkpoints]
    tokenizers = [load_tokenizer_for(checkpoint) for checkpoint in checkpoints]
    answer_problems(models, tokenizers, levels[0], held_out_problems(levels[0], 2, seed + 1))  # warm-up, not kept
    per_level = [answer_problems(models, tokenizers, level, held_out_problems(level, problems, seed), progress)
                 for level in levels]
    reports = [AnswerReport(name, str(checkpoint), model.config.router if model.routers() else "dense",
                            [scores[i] for scores in per_level], price_per_hour)
               for i, (name, checkpoint, model) in enumerate(zip(short_names([Path(c) for c in checkpoints]), checkpoints, models))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ANSWERS_JSON).write_text(json.dumps({"problems_per_level": problems, "seed": seed, "price_per_hour": price_per_hour,
                                                "reports": [r.to_dict() for r in reports]}, indent=2) + "\n")
    (out / ANSWERS_MD).write_text(answers_table(reports) + "\n")
    return reports


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def answers_table(reports: Sequence[AnswerReport]) -> str:
    """One Markdown row per checkpoint: accuracy per level and overall, time per answer, cost per correct answer."""
    levels = [score.level for score in reports[0].levels]
    header = ["checkpoint", *[f"acc. level {level}" for level in levels], "accuracy", "mean k", "ms/answer",
              "$ per 1k correct", *[f"$ per 1k correct, level {level}" for level in levels]]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for report in reports:
        total = report.total
        per_thousand = [None if (c := report.cost_per_correct(s)) is None else 1e3 * c for s in (total, *report.levels)]
        cells = [report.name, *[f"{s.accuracy:.1%}" for s in report.levels], f"{total.accuracy:.1%}",
                 _fmt(report.mean_k(total), ".2f"),
                 f"{1e3 * total.seconds / max(total.problems, 1):.1f}", *[_fmt(c, ".5f") for c in per_thousand]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
