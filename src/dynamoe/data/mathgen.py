"""Math problems whose answers a parser can verify: arithmetic, linear equations, next term of a sequence."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from dynamoe.data.documents import Document
from dynamoe.errors import DynamoeError

MATH_DOMAIN = "math"
MIN_DIFFICULTY = 1
MAX_DIFFICULTY = 5
PROBLEMS_PER_DOC = 24  # problems per generated document, one per line
SHOWN_TERMS = 5  # terms shown of a sequence: enough that second differences repeat three times
_QUESTION_PREFIX = "Q: "
_ANSWER_SEPARATOR = " A: "


@dataclass(frozen=True)
class _Level:
    """How large the numbers of one difficulty are."""

    add_digits: int  # digits of addition/subtraction operands (each has this many or one fewer)
    multiply_digits: tuple[int, int]  # digits of the two factors
    coefficient_max: int  # |a| in ax + b = c, |step| of arithmetic sequences
    value_max: int  # |x| and |b| in ax + b = c, |start| of sequences
    ratio_max: int  # |ratio| of geometric sequences
    negatives: bool  # whether operands, solutions and steps may be negative
    sequences: tuple[str, ...]  # the sequence kinds asked at this level


_LEVELS = {
    1: _Level(1, (1, 1), 3, 10, 2, False, ("arithmetic",)),
    2: _Level(2, (2, 1), 5, 20, 3, False, ("arithmetic", "geometric")),
    3: _Level(3, (2, 2), 9, 50, 3, True, ("arithmetic", "geometric", "quadratic")),
    4: _Level(4, (3, 2), 12, 100, 4, True, ("arithmetic", "geometric", "quadratic")),
    5: _Level(6, (4, 3), 20, 500, 5, True, ("arithmetic", "geometric", "quadratic")),
}

_ARITHMETIC_QUESTION = re.compile(r"What is (-?\d+) ([-+*]) (-?\d+)\?")
_LINEAR_QUESTION = re.compile(r"Solve (-?\d*)x(?: ([-+]) (\d+))? = (-?\d+) for x\.")
_SEQUENCE_QUESTION = re.compile(r"What is the next term of (-?\d+(?:, -?\d+){2,})\?")


def generate_problem(rng: random.Random, difficulty: int) -> tuple[str, str]:
    """One random (question, answer) pair of the given difficulty (1 easiest .. 5 hardest)."""
    level = _level(difficulty)
    kind = rng.choice(list(_GENERATORS))
    return _GENERATORS[kind](rng, level)


def math_documents(
    n_docs: int, seed: int, difficulty: int | tuple[int, int] = (1, 4), problems_per_doc: int = PROBLEMS_PER_DOC
) -> list[Document]:
    """n_docs documents of `Q: ... A: ...` lines, each problem's difficulty drawn from the given range."""
    low, high = difficulty_range(difficulty)
    if n_docs < 0 or problems_per_doc < 1:
        raise DynamoeError(f"need n_docs >= 0 and problems_per_doc >= 1, got {n_docs} and {problems_per_doc}")
    rng = random.Random(seed)
    return [_math_document(rng, low, high, problems_per_doc) for _ in range(n_docs)]


def held_out_problems(difficulty: int, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """count (question, answer) pairs of one difficulty, from a generator seeded apart from every corpus build.

    A build seeds its generator with an integer; this one with a string, so no build draws the same stream.
    Small levels still repeat training problems: level 1 has a few hundred distinct questions in all.
    """
    _level(difficulty)
    if count < 0:
        raise DynamoeError(f"need count >= 0 held-out problems, got {count}")
    rng = random.Random(f"dynamoe held-out math, seed {seed}, difficulty {difficulty}")
    return [generate_problem(rng, difficulty) for _ in range(count)]


def format_problem(question: str, answer: str) -> str:
    """The one-line form problems take in documents: `Q: question A: answer`."""
    return f"{_QUESTION_PREFIX}{question}{_ANSWER_SEPARATOR}{answer}"


def answer_prompt(question: str) -> str:
    """The prompt that asks a model for the answer: the problem's line up to `A:`, without the answer."""
    return f"{_QUESTION_PREFIX}{question}{_ANSWER_SEPARATOR.rstrip()}"


def split_problem(line: str) -> tuple[str, str]:
    """The (question, answer) of a `Q: ... A: ...` line."""
    question, separator, answer = line.strip().partition(_ANSWER_SEPARATOR)
    if not question.startswith(_QUESTION_PREFIX) or not separator:
        raise DynamoeError(f"not a `Q: ... A: ...` problem line: {line!r}")
    return question[len(_QUESTION_PREFIX) :], answer


def solve_problem(question: str) -> str:
    """The answer to a question this module writes, found by parsing and solving it afresh."""
    text = question.strip().removeprefix(_QUESTION_PREFIX.strip()).strip()
    for solve in (_solve_arithmetic, _solve_linear, _solve_sequence):
        answer = solve(text)
        if answer is not None:
            return answer
    raise DynamoeError(f"not a math problem this generator writes (or one without an integer answer): {question!r}")


def check_answer(question: str, answer: str) -> bool:
    """True when answer is the question's correct answer, whitespace aside."""
    return _without_spaces(answer) == _without_spaces(solve_problem(question))


def difficulty_range(difficulty: int | tuple[int, int]) -> tuple[int, int]:
    """(low, high) of one difficulty or a range of them, or a DynamoeError when out of range."""
    low, high = (difficulty, difficulty) if isinstance(difficulty, int) else difficulty
    _level(low)
    _level(high)
    if low > high:
        raise DynamoeError(f"math difficulty range ({low}, {high}) is reversed: give (low, high)")
    return low, high


def _level(difficulty: int) -> _Level:
    """The number sizes of a difficulty, or a DynamoeError when it is out of range."""
    if not isinstance(difficulty, int) or difficulty not in _LEVELS:
        raise DynamoeError(
            f"math difficulty must be an integer from {MIN_DIFFICULTY} to {MAX_DIFFICULTY}, got {difficulty!r}"
        )
    return _LEVELS[difficulty]


def _math_document(rng: random.Random, low: int, high: int, n_problems: int) -> Document:
    """One document of n_problems lines with difficulties drawn from [low, high]."""
    lines = [format_problem(*generate_problem(rng, rng.randint(low, high))) for _ in range(n_problems)]
    return Document("\n".join(lines), MATH_DOMAIN)


def _operand(rng: random.Random, digits: int) -> int:
    """A non-negative number with exactly that many digits (0-9 for one digit)."""
    low = 10 ** (digits - 1) if digits > 1 else 0
    return rng.randint(low, 10**digits - 1)


def _signed(rng: random.Random, magnitude_max: int, negatives: bool, magnitude_min: int = 0) -> int:
    """A number with magnitude in [magnitude_min, magnitude_max], negative half the time if allowed."""
    magnitude = rng.randint(magnitude_min, magnitude_max)
    return -magnitude if negatives and rng.random() < 0.5 else magnitude


def _add_operands(rng: random.Random, level: _Level) -> tuple[int, int]:
    """Two addition/subtraction operands of the level's size."""
    low_digits = max(1, level.add_digits - 1)
    first, second = (_operand(rng, rng.randint(low_digits, level.add_digits)) for _ in range(2))
    return first, second


def _addition(rng: random.Random, level: _Level) -> tuple[str, str]:
    """A sum of two operands."""
    a, b = _add_operands(rng, level)
    return f"What is {a} + {b}?", str(a + b)


def _subtraction(rng: random.Random, level: _Level) -> tuple[str, str]:
    """A difference, never negative at the levels without negative numbers."""
    a, b = _add_operands(rng, level)
    if not level.negatives:
        a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", str(a - b)


def _multiplication(rng: random.Random, level: _Level) -> tuple[str, str]:
    """A product of two factors."""
    a, b = (_operand(rng, digits) for digits in level.multiply_digits)
    return f"What is {a} * {b}?", str(a * b)


def _linear_equation(rng: random.Random, level: _Level) -> tuple[str, str]:
    """ax + b = c with an integer solution x."""
    a = _signed(rng, level.coefficient_max, level.negatives, magnitude_min=1)
    x = _signed(rng, level.value_max, level.negatives)
    b = _signed(rng, level.value_max, level.negatives)
    return f"Solve {_linear_left_side(a, b)} = {a * x + b} for x.", f"x = {x}"


def _linear_left_side(a: int, b: int) -> str:
    """ax + b written the way people write it: `x + 3`, `-x - 3`, `2x`."""
    coefficient = {1: "", -1: "-"}.get(a, str(a))
    constant = "" if b == 0 else f" {'+' if b > 0 else '-'} {abs(b)}"
    return f"{coefficient}x{constant}"


def _sequence(rng: random.Random, level: _Level) -> tuple[str, str]:
    """SHOWN_TERMS terms of an arithmetic, geometric or quadratic sequence; the answer is the next one."""
    terms = _SEQUENCE_TERMS[rng.choice(level.sequences)](rng, level)
    shown = ", ".join(str(term) for term in terms[:SHOWN_TERMS])
    return f"What is the next term of {shown}?", str(terms[SHOWN_TERMS])


def _arithmetic_terms(rng: random.Random, level: _Level) -> list[int]:
    """start, start + step, ... with a non-zero step."""
    start = _signed(rng, level.value_max, level.negatives)
    step = _signed(rng, level.coefficient_max, level.negatives, magnitude_min=1)
    return [start + step * n for n in range(SHOWN_TERMS + 1)]


def _geometric_terms(rng: random.Random, level: _Level) -> list[int]:
    """start, start * ratio, ... with |ratio| >= 2 so that no difference row is ever constant."""
    start = _signed(rng, 9, level.negatives, magnitude_min=1)
    ratio = _signed(rng, level.ratio_max, level.negatives, magnitude_min=2)
    return [start * ratio**n for n in range(SHOWN_TERMS + 1)]


def _quadratic_terms(rng: random.Random, level: _Level) -> list[int]:
    """a n^2 + b n + c for n = 0, 1, ... with a != 0."""
    a = _signed(rng, max(1, level.coefficient_max // 3), level.negatives, magnitude_min=1)
    b = _signed(rng, level.coefficient_max, level.negatives)
    c = _signed(rng, level.value_max, level.negatives)
    return [a * n * n + b * n + c for n in range(SHOWN_TERMS + 1)]


_GENERATORS: dict[str, Callable[[random.Random, _Level], tuple[str, str]]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "linear_equation": _linear_equation,
    "sequence": _sequence,
}
_SEQUENCE_TERMS: dict[str, Callable[[random.Random, _Level], list[int]]] = {
    "arithmetic": _arithmetic_terms,
    "geometric": _geometric_terms,
    "quadratic": _quadratic_terms,
}


def _solve_arithmetic(question: str) -> str | None:
    """The result of `What is a op b?`, or None for another kind of question."""
    match = _ARITHMETIC_QUESTION.fullmatch(question)
    if match is None:
        return None
    a, operator, b = int(match[1]), match[2], int(match[3])
    return str({"+": a + b, "-": a - b, "*": a * b}[operator])


def _solve_linear(question: str) -> str | None:
    """`x = ...` for `Solve ax + b = c for x.`, or None for another question or no integer solution."""
    match = _LINEAR_QUESTION.fullmatch(question)
    if match is None:
        return None
    a = {"": 1, "-": -1}.get(match[1]) or int(match[1])
    b = (-1 if match[2] == "-" else 1) * int(match[3]) if match[2] else 0
    numerator = int(match[4]) - b
    if a == 0 or numerator % a:
        return None
    return f"x = {numerator // a}"


def _solve_sequence(question: str) -> str | None:
    """The next term of a polynomial (by finite differences) or geometric sequence, or None."""
    match = _SEQUENCE_QUESTION.fullmatch(question)
    if match is None:
        return None
    terms = [int(term) for term in match[1].split(", ")]
    next_term = _next_polynomial_term(terms)
    if next_term is None:
        next_term = _next_geometric_term(terms)
    return None if next_term is None else str(next_term)


def _next_polynomial_term(terms: list[int]) -> int | None:
    """Extend the difference table from its first constant row (of two or more entries), if any."""
    rows = [terms]
    while len(rows[-1]) >= 2:
        if len(set(rows[-1])) == 1:
            # The constant row repeats, so each row above grows by the last entry of the row below.
            return sum(row[-1] for row in rows)
        rows.append([later - earlier for earlier, later in zip(rows[-1], rows[-1][1:])])
    return None


def _next_geometric_term(terms: list[int]) -> int | None:
    """terms[-1] * ratio when every term is the previous one times the same integer ratio, else None."""
    if terms[0] == 0 or terms[1] % terms[0]:
        return None
    ratio = terms[1] // terms[0]
    if any(later != earlier * ratio for earlier, later in zip(terms, terms[1:])):
        return None
    return terms[-1] * ratio


def _without_spaces(text: str) -> str:
    """text with all whitespace removed, so `x=5` and `x = 5` compare equal."""
    return "".join(text.split())
