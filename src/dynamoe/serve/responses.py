"""Engine events to OpenAI response bodies: whole completions, and server-sent-event chunks.

A `RowResult` accumulates one row's events; the functions below shape rows into the `text_completion`
and `chat.completion` objects (and their `.chunk` forms) that the openai client and lm-eval read.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from dynamoe.decoding import NewToken, PromptScored, RowDone, TokenLogprob

DONE_LINE = "data: [DONE]\n\n"


@dataclass
class RowResult:
    """Everything one row produced so far."""

    prompt_ids: Sequence[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    done: RowDone | None = None

    def add(self, event: PromptScored | NewToken | RowDone) -> None:
        """Fold one engine event into the row."""
        if isinstance(event, PromptScored):
            self.prompt_logprobs = event.logprobs
        elif isinstance(event, NewToken):
            self.token_ids.append(event.token_id)
            self.text += event.text
            self.logprobs.append(event.logprob)
        else:
            self.done = event


class Vocabulary:
    """Token ids to the strings shown in logprobs, and text offsets."""

    def __init__(self, decode: Callable[..., str]) -> None:
        self.decode = decode

    def token(self, token_id: int) -> str:
        """The text of one token, special tokens spelled out."""
        return self.decode([token_id], skip_special_tokens=False)

    def top(self, logprob: TokenLogprob | None) -> dict[str, float] | None:
        """top_logprobs as {token text: log probability}; of two tokens with the same text the likelier stays."""
        if logprob is None:
            return None
        alternatives: dict[str, float] = {}
        for token_id, value in logprob.top:
            alternatives.setdefault(self.token(token_id), value)
        return alternatives

    def offsets(self, token_ids: Sequence[int], start: int = 0) -> list[int]:
        """The character offset where each token's text begins (decoding prefixes: bytes may span tokens)."""
        return [start + len(self.decode(list(token_ids[:i]))) for i in range(len(token_ids))]


def new_id(prefix: str) -> str:
    """A unique response id such as cmpl-3f2a..."""
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_logprobs(vocab: Vocabulary, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob | None],
                        start: int) -> dict[str, Any]:
    """The legacy completions logprobs object for a run of tokens whose text starts at offset `start`."""
    return {"tokens": [vocab.token(t) for t in token_ids],
            "token_logprobs": [None if lp is None else lp.logprob for lp in logprobs],
            "top_logprobs": [vocab.top(lp) for lp in logprobs],
            "text_offset": vocab.offsets(token_ids, start)}


def completion_choice(vocab: Vocabulary, index: int, row: RowResult, echo: bool, with_logprobs: bool) -> dict[str, Any]:
    """One choice of a text_completion: echoed prompt, continuation, logprobs, finish reason."""
    prompt_text = vocab.decode(list(row.prompt_ids)) if echo else ""
    logprobs = None
    if with_logprobs:
        generated = completion_logprobs(vocab, row.token_ids, row.logprobs, len(prompt_text))
        if echo and row.prompt_logprobs is not None:
            prompt = completion_logprobs(vocab, row.prompt_ids, row.prompt_logprobs, 0)
            generated = {key: prompt[key] + generated[key] for key in generated}
        logprobs = generated
    assert row.done is not None
    return {"index": index, "text": prompt_text + row.text, "logprobs": logprobs, "finish_reason": row.done.finish_reason}


def chat_logprobs(vocab: Vocabulary, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob | None]) -> dict[str, Any]:
    """The chat logprobs object: one entry per token with its top alternatives."""
    def entry(token: str, value: float) -> dict[str, Any]:
        return {"token": token, "logprob": value, "bytes": list(token.encode("utf-8"))}

    content = []
    for token_id, logprob in zip(token_ids, logprobs):
        if logprob is None:
            continue
        item = entry(vocab.token(token_id), logprob.logprob)
        item["top_logprobs"] = [entry(token, value) for token, value in (vocab.top(logprob) or {}).items()]
        content.append(item)
    return {"content": content}


def usage(rows: Sequence[RowResult], choices_per_prompt: int, routed: bool, per_layer: bool = False) -> dict[str, Any]:
    """Token counts, plus dynamoe's experts per generated token: the mean over MoE layers, and one per layer on request.

    A generated token's experts are those of the forward pass that produced it; None for a dense model or
    when no token was generated.
    """
    # Rows run prompt by prompt, choices_per_prompt rows each; a prompt sampled n times is counted once, as OpenAI does.
    prompt_tokens = sum(len(row.prompt_ids) for row in rows[::choices_per_prompt])
    finished = [row.done for row in rows if row.done is not None]
    completion_tokens = sum(done.completion_tokens for done in finished)
    layers = [sum(sums) / completion_tokens for sums in zip(*(done.experts_per_layer for done in finished))] \
        if routed and completion_tokens else []
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens,
                            "mean_experts_per_token": round(sum(layers) / len(layers), 4) if layers else None}
    if per_layer:
        body["experts_per_layer"] = [round(k, 4) for k in layers] if layers else None
    return body


def envelope(response_id: str, kind: str, model: str, created: int, choices: list[dict[str, Any]],
             usage_: dict[str, Any] | None = None) -> dict[str, Any]:
    """The object around the choices."""
    body: dict[str, Any] = {"id": response_id, "object": kind, "created": created, "model": model, "choices": choices}
    if usage_ is not None or kind in ("text_completion", "chat.completion"):
        body["usage"] = usage_
    return body


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def now() -> int:
    """Seconds since the epoch, as OpenAI's `created`."""
    return int(time.time())
