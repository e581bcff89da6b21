"""Text generation: prefill the prompt, then decode one token at a time from a preallocated KV cache.

Small pure functions in the manner of gpt-fast: `prefill`, `decode_step` and `decode_one_token` run
the model, `sample` picks tokens, `visible_text` decides what of a continuation may be shown. `stream`
runs prompts as the rows of one batch of the decode core (dynamoe.decoding, which the server shares)
and yields each token as it is decoded; `generate` collects a stream. Each row decodes at its own
positions, so that every row computes what it would compute alone.

Shape legend: B batch (one row per prompt), T tokens in this call, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F

from dynamoe.config import ModelConfig
from dynamoe.errors import DynamoeError
from dynamoe.model import Dial, ModelOutput, Transformer

if TYPE_CHECKING:
    from dynamoe.decoding import NewToken

FinishReason = Literal["stop", "eos", "length"]  # a stop string, a stop token, max_new_tokens
REPLACEMENT_CHAR = "\ufffd"  # what decoding shows for the bytes of a character not yet complete


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits."""

    temperature: float = 0.8  # 0: greedy (argmax)
    top_p: float = 0.95  # nucleus: the smallest top set of tokens whose mass reaches top_p; 1 keeps all
    top_k: int = 0  # only the k most probable tokens; 0 keeps all
    seed: int = 0  # seeds a torch.Generator, so the same seed gives the same tokens

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise DynamoeError naming the first invalid field."""
        # `not x >= 0` rather than `x < 0`, so that NaN is rejected too.
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0 and math.isfinite(self.temperature)):
            raise DynamoeError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise DynamoeError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise DynamoeError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k!r}")
        if not isinstance(self.seed, int):
            raise DynamoeError(f"seed must be an integer, got {self.seed!r}")


GREEDY = SamplingConfig(temperature=0.0)


@dataclass
class Generation:
    """Everything one prompt produced."""

    token_ids: list[int]  # every decoded token, including a final stop token or the one completing a stop string
    text: str  # the continuation, without the stop string (empty when no decode function was given)
    experts: list[float]  # per token id, mean experts/token over the MoE layers; empty for a dense model
    finish_reason: FinishReason


def sample(logits_BV: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token of each row: the argmax at temperature 0, else a draw from the tempered, filtered softmax."""
    if sampling.temperature == 0:
        return logits_BV.argmax(dim=-1)
    # The row's maximum subtracted first: a tiny temperature then sends the others to -inf, never to NaN.
    logits_BV = (logits_BV.float() - logits_BV.float().amax(dim=-1, keepdim=True)) / sampling.temperature
    if sampling.top_k:
        logits_BV = keep_top_k(logits_BV, sampling.top_k)
    if sampling.top_p < 1:
        logits_BV = keep_top_p(logits_BV, sampling.top_p)
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def keep_top_k(logits_BV: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits with all but the top_k largest of each row set to -inf."""
    kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, -math.inf)


def keep_top_p(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with -inf outside each row's smallest top set whose probability mass reaches top_p."""
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(dim=-1)
    # A token is kept while the mass before it is below top_p (the router's rule), so the top one always is
    # (the exclusive cumsum starts at exactly 0, however small top_p).
    drop_sorted_BV = F.pad(probs_BV.cumsum(dim=-1)[:, :-1], (1, 0)) >= top_p
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, -math.inf)


def mean_experts(out: ModelOutput, B: int, T: int) -> torch.Tensor | None:
    """(B, T) experts per token averaged over the MoE layers (as the fused step counted them, where it ran); None for
    a dense model."""
    if out.experts_BT is not None:
        return out.experts_BT
    if not out.routings:
        return None
    k_LN = torch.stack([routing.k_T for routing in out.routings])  # L MoE layers, N = B * T tokens
    return k_LN.float().mean(dim=0).view(B, T)


@torch.no_grad()
def prefill(model: Transformer, idx_BT: torch.Tensor, lengths_B: torch.Tensor, thresholds_BL: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fill the KV cache with right-padded prompts; logits and mean experts at each row's last prompt token."""
    B, T = idx_BT.shape
    out = model(idx_BT, input_pos_T=torch.arange(T, device=idx_BT.device), thresholds_BL=thresholds_BL)
    last_B = lengths_B - 1
    rows_B = torch.arange(B, device=idx_BT.device)
    experts_BT = mean_experts(out, B, T)
    return out.logits[rows_B, last_B], None if experts_BT is None else experts_BT[rows_B, last_B]


@torch.no_grad()
def decode_step(model: Transformer, token_B1: torch.Tensor, input_pos_B1: torch.Tensor,
                thresholds_BL: torch.Tensor | None = None, cache_rows: slice | None = None) -> ModelOutput:
    """Feed one token per row at its own position, through the compiled graph when compile_decode has run."""
    return (model.compiled_decode or model)(token_B1, input_pos_T=input_pos_B1, thresholds_BL=thresholds_BL,
                                            cache_rows=cache_rows)


@torch.no_grad()
def decode_one_token(model: Transformer, token_B1: torch.Tensor, input_pos_B1: torch.Tensor, sampling: SamplingConfig,
                     generator: torch.Generator | None = None, thresholds_BL: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Feed one token per row at its own position; the next token of each row and the mean experts spent on it."""
    out = decode_step(model, token_B1, input_pos_B1, thresholds_BL)
    experts_B1 = mean_experts(out, *token_B1.shape)
    return sample(out.logits[:, -1], sampling, generator), None if experts_B1 is None else experts_B1[:, 0]


def stream(model: Transformer, prompt_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int,
           sampling: SamplingConfig = GREEDY, stop_ids: Collection[int] = (), stop: Sequence[str] = (),
           decode: Callable[[list[int]], str] | None = None, dial: Dial = None) -> Iterator[NewToken]:
    """Yield each prompt's tokens as they are decoded; text and stop strings need `decode` (ids -> text).

    dial: the routing thresholds of every row (see Transformer.layer_thresholds); None routes as trained.
    """
    rows = as_rows(prompt_ids)
    check_request(rows, max_new_tokens, model.config, stop, decode)
    model.layer_thresholds(dial)
    # Checked here, not in the generator, so that a bad request fails at the call rather than at the first `next`.
    return _stream(model, rows, max_new_tokens, sampling, frozenset(stop_ids), tuple(stop), decode, dial)


def generate(model: Transformer, prompt_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingConfig = GREEDY, stop_ids: Collection[int] = (), stop: Sequence[str] = (),
             decode: Callable[[list[int]], str] | None = None, dial: Dial = None) -> list[Generation]:
    """Generate a continuation of each prompt (one list of ids, or a batch of them); one Generation per prompt."""
    events = list(stream(model, prompt_ids, max_new_tokens, sampling, stop_ids, stop, decode, dial))
    results = []
    for row in range(len(as_rows(prompt_ids))):
        mine = [event for event in events if event.row == row]
        experts = [event.experts for event in mine if event.experts is not None]
        finish_reason = mine[-1].finish_reason
        assert finish_reason is not None  # every row's last event carries one
        results.append(Generation(token_ids=[event.token_id for event in mine], text="".join(event.text for event in mine),
                                  experts=experts, finish_reason=finish_reason))
    return results


def as_rows(prompt_ids: Sequence[int] | Sequence[Sequence[int]]) -> list[list[int]]:
    """A batch of prompts from one prompt or several; an empty sequence is one empty prompt."""
    if len(prompt_ids) == 0 or isinstance(prompt_ids[0], int):
        return [list(prompt_ids)]  # type: ignore[arg-type]
    return [list(row) for row in prompt_ids]  # type: ignore[union-attr]


def check_request(rows: list[list[int]], max_new_tokens: int, config: ModelConfig, stop: Sequence[str],
                  decode: Callable[[list[int]], str] | None) -> None:
    """Raise DynamoeError for a request the model cannot serve, naming what to change."""
    for index, row in enumerate(rows):
        which = "the prompt" if len(rows) == 1 else f"prompt {index} of the batch"
        if not row:
            raise DynamoeError(f"{which} is empty; generation needs at least one token to continue from")
        bad = [token for token in row if not (isinstance(token, int) and 0 <= token < config.vocab_size)]
        if bad:
            raise DynamoeError(f"{which} holds token id {bad[0]!r}, outside the model's vocabulary of {config.vocab_size}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise DynamoeError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    longest = max(len(row) for row in rows)
    if longest + max_new_tokens > config.max_seq_len:
        raise DynamoeError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of "
                           f"{config.max_seq_len}; shorten the prompt or lower --max-new-tokens")
    if any(not isinstance(s, str) or not s for s in stop):
        raise DynamoeError(f"stop strings must be non-empty text, got {list(stop)!r}")
    if stop and decode is None:
        raise DynamoeError("stop strings need a decode function (token ids -> text) to be found")


def _stream(model: Transformer, rows: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
            stop_ids: frozenset[int], stop: tuple[str, ...], decode: Callable[[list[int]], str] | None,
            dial: Dial) -> Iterator[NewToken]:
    """The decoding loop behind `stream`: every prompt a row of one DecodeBatch, its KV cache alive only while it runs.

    Every row samples from its own generator seeded with sampling.seed, so that a prompt gives the same
    tokens alone or in a batch.
    """
    from dynamoe.decoding import DecodeBatch, DecodeRequest, NewToken  # the decode core builds on this module

    events: list[NewToken] = []

    def keep_tokens(event: object) -> None:
        if isinstance(event, NewToken):
            events.append(event)

    batch = DecodeBatch(model, len(rows), decode)
    try:
        for index, row in enumerate(rows):
            batch.add(DecodeRequest(tuple(row), max_new_tokens, sampling, stop, stop_ids, dial), keep_tokens, index)
        while len(batch):
            batch.step()
            yield from events
            events.clear()
    finally:
        batch.close()


def visible_text(token_ids: list[int], stop: Sequence[str], decode: Callable[[list[int]], str] | None,
                 final: bool) -> tuple[str, bool]:
    """The continuation's text that is safe to show, and whether it hit a stop string (then cut before it)."""
    if decode is None:
        return "", False
    text = decode(token_ids)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        return text[:min(hits)], True
    if final:
        return text, False
    # Hold back a character whose bytes are still arriving, then any text that may begin a stop string: from the
    # first character equal to a stop's first among its last len(stop) - 1. One scan per stop, never longer than
    # the text, however long the stop (testing every prefix of the stop would be quadratic in its length).
    text = text.rstrip(REPLACEMENT_CHAR)
    starts = (text.find(s[0], max(len(text) - len(s) + 1, 0)) for s in stop)
    return text[:min((start for start in starts if start >= 0), default=len(text))], False


# --show-experts: a token's colour says how many experts it used, from blue (few) to red (many).
EXPERT_COLOURS = ("90", "34", "36", "32", "33", "35", "31", "91", "1;91")  # ANSI codes for 0, 1, ..., 8+ experts


def expert_bucket(experts: float) -> int:
    """The colour index of a mean experts/token: rounded half up, 8 and more share the last colour."""
    return min(int(experts + 0.5), len(EXPERT_COLOURS) - 1)


def paint(text: str, experts: float) -> str:
    """text in the ANSI colour of its experts/token."""
    return f"\x1b[{EXPERT_COLOURS[expert_bucket(experts)]}m{text}\x1b[0m" if text else ""


def experts_legend(experts: list[float], k_max: int, colour: bool) -> str:
    """One line closing --show-experts: the colour scale (or, without colour, the counts) and the mean."""
    buckets = [expert_bucket(k) for k in experts]
    summary = f"mean {sum(experts) / len(experts):.2f} over {len(experts)} tokens" if experts else "no tokens"
    if not colour:
        counts = ", ".join(f"{bucket}: {buckets.count(bucket)}" for bucket in sorted(set(buckets)))
        return f"experts/token: {summary}" + (f" ({counts})" if counts else "")
    first = 0 if 0 in buckets else 1
    last = max(expert_bucket(k_max), *buckets)
    labels = [f"{k}+" if k == len(EXPERT_COLOURS) - 1 else str(k) for k in range(first, last + 1)]
    return "experts/token: " + " ".join(paint(label, k) for k, label in zip(range(first, last + 1), labels)) + f"; {summary}"
