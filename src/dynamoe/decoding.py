"""The batched decode core: a running batch whose rows join and leave between decode steps.

A `DecodeBatch` holds a KV cache of `slots` rows. A request added to it is prefilled into the cache
(short prompts that wait together in one call; a long prompt in chunks, one per step, so that it does
not stall the rows already decoding), samples its first token, and from then on decodes one token per
`step` together with every other live row: each row at its own positions, routed at its own dial,
sampled from its own generator, ended by its own stop strings and stop tokens. A row that finishes or
is cancelled leaves at once, and the last decoding row moves into its cache slot: the decoding rows are
always the first rows of the cache, one slice that the model reads without copying. Every event goes to
its request's callback as it happens. `dynamoe generate` and the server's scheduler both drive it.

Shape legend: B rows in a call, T tokens, V vocabulary, L MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import torch

from dynamoe.errors import DynamoeError
from dynamoe.generate import GREEDY, FinishReason, SamplingConfig, decode_step, sample, visible_text
from dynamoe.model import Dial, ModelOutput, Transformer

MIN_CACHE_LENGTH = 64  # positions a new KV cache holds at least; it doubles when a row needs more


@dataclass(frozen=True)
class DecodeRequest:
    """One prompt to score and continue: a row of the batch."""

    prompt_ids: tuple[int, ...]
    max_tokens: int  # new tokens at most; 0 only scores the prompt
    sampling: SamplingConfig = GREEDY
    stop: tuple[str, ...] = ()  # stop strings; finding them needs the batch's decode function
    stop_ids: frozenset[int] = frozenset()  # stop tokens, e.g. the end-of-text token
    dial: Dial = None  # this row's routing thresholds (see Transformer.layer_thresholds); None: as trained
    logprobs: int | None = None  # alternatives per token in top_logprobs; None: no log probabilities at all
    score_prompt: bool = False  # log probabilities of the prompt tokens too (echo with logprobs)


@dataclass(frozen=True)
class TokenLogprob:
    """The log probability of one token and the most probable alternatives at its position."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log probability), most probable first


@dataclass(frozen=True)
class PromptScored:
    """Log probabilities of a row's prompt tokens; the first is None (nothing precedes it)."""

    row: int
    logprobs: tuple[TokenLogprob | None, ...]


@dataclass(frozen=True)
class NewToken:
    """One generated token of a row, with the text it makes visible ('' while held back)."""

    row: int
    token_id: int
    text: str
    logprob: TokenLogprob | None
    experts: float | None  # experts used to produce it, averaged over the MoE layers; None for a dense model
    finish_reason: FinishReason | None = None  # set on the row's last token


@dataclass(frozen=True)
class RowDone:
    """A row has finished; its usage figures."""

    row: int
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    experts_per_layer: tuple[float, ...]  # experts each MoE layer used to produce the generated tokens, summed
    experts_sum: float  # experts averaged over the MoE layers, summed over every position the model ran for the row
    positions: int  # positions the model ran for the row (prompt tokens + generated tokens fed back)


Event = Union[PromptScored, NewToken, RowDone]


@dataclass(eq=False)
class Row:
    """A request in the batch and its decoding state."""

    request: DecodeRequest
    tag: int  # the `row` of its events
    on_event: Callable[[Event], None]
    generator: torch.Generator | None  # its own, so that its tokens do not depend on its batch-mates; None: greedy
    prefilled: int = 0  # prompt tokens in the cache
    slot: int = -1  # its cache row, from its first prefill call on
    generated: list[int] = field(default_factory=list)
    shown: str = ""
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    experts_per_layer: list[float] = field(default_factory=list)
    experts_sum: float = 0.0
    positions: int = 0

    @property
    def prompt_length(self) -> int:
        return len(self.request.prompt_ids)


class DecodeBatch:
    """Rows in one KV cache, prefilled as they join and decoded one step at a time together (see the module doc)."""

    def __init__(self, model: Transformer, slots: int, decode: Callable[[list[int]], str] | None = None,
                 chunk_tokens: int = 512) -> None:
        self.model, self.slots, self.decode, self.chunk_tokens = model, slots, decode, chunk_tokens
        self.device = model.tok_embeddings.weight.device
        self.decoding: list[Row] = []  # decoding[i] is in cache slot i
        self.prefilling: list[Row] = []  # joined, prompt not all in the cache yet; oldest first
        self.decoded_rows = 0  # rows in the last decode call
        self._thresholds_BL: torch.Tensor | None = None
        self._thresholds_stale = False

    def __len__(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    @property
    def free_slots(self) -> int:
        """Rows that may still join."""
        return self.slots - len(self)

    def add(self, request: DecodeRequest, on_event: Callable[[Event], None], tag: int = 0) -> Row:
        """Join a request to the batch; its prefill runs at the next steps. DynamoeError for a request it cannot serve."""
        if not self.free_slots:
            raise DynamoeError(f"the batch already holds {self.slots} rows")
        self.model.layer_thresholds(request.dial)
        need = request.max_tokens - 1 if request.max_tokens else 0  # the last new token is never fed back
        if not request.prompt_ids or len(request.prompt_ids) + need > self.model.config.max_seq_len:
            raise DynamoeError(f"a prompt of {len(request.prompt_ids)} tokens and {request.max_tokens} new tokens does "
                               f"not fit the model's context of {self.model.config.max_seq_len}")
        sampling = request.sampling
        generator = None if sampling.temperature == 0 else torch.Generator(device=self.device).manual_seed(sampling.seed)
        row = Row(request, tag, on_event, generator, experts_per_layer=[0.0] * len(self.model.routers()))
        self.prefilling.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """Drop a row, wherever it is, without a RowDone; its slot is free at once."""
        if row in self.prefilling:
            self.prefilling.remove(row)
        elif row in self.decoding:
            self._leave(row)

    @torch.no_grad()
    def step(self) -> None:
        """One prefill call if a prompt waits, then one decode step of every decoding row (those just prefilled too)."""
        self.decoded_rows = 0
        if self.prefilling:
            self._prefill(self._next_prefill())
        if self.decoding:
            self._decode()
        if not len(self):  # nothing held: give the cache's memory back
            self.model.clear_caches()

    def close(self) -> None:
        """Drop every row and the KV cache."""
        self.decoding.clear()
        self.prefilling.clear()
        self.model.clear_caches()

    # -- prefill ----------------------------------------------------------------------------------------------

    def _next_prefill(self) -> list[Row]:
        """The rows of the next prefill call: the next chunk of a long prompt alone, or short prompts that wait together."""
        head = self.prefilling[0]
        if head.prefilled or head.prompt_length > self.chunk_tokens:
            return [head]
        group: list[Row] = []
        longest = 0
        for row in self.prefilling:  # in order of arrival; right-padded to the longest, within the chunk's budget
            longest = max(longest, row.prompt_length)
            if row.prefilled or (len(group) + 1) * longest > self.chunk_tokens:
                break
            group.append(row)
        return group

    def _prefill(self, group: list[Row]) -> None:
        """Run the group's next prompt tokens into their cache slots; rows whose prompt is done sample a first token.

        Rows starting together start at position 0 and are right-padded: a pad entry sits past its
        row's prompt, where the row writes its own token before any query of its reads that position.
        """
        first_slot = len(self.decoding) if group[0].slot < 0 else group[0].slot
        spans = [(row.prefilled, min(row.prompt_length - row.prefilled, self.chunk_tokens)) for row in group]
        T = max(length for _, length in spans)
        idx_BT = torch.zeros(len(group), T, dtype=torch.long)
        for b, (row, (start, length)) in enumerate(zip(group, spans)):
            row.slot = first_slot + b
            idx_BT[b, :length] = torch.tensor(row.request.prompt_ids[start:start + length])
        starts_B1 = torch.tensor([[start] for start, _ in spans], device=self.device)
        input_pos_BT = starts_B1 + torch.arange(T, device=self.device)
        self._ensure_cache(int(input_pos_BT.max()) + 1)
        out = self.model(idx_BT.to(self.device), input_pos_T=input_pos_BT,
                         thresholds_BL=self.model.routing_thresholds([row.request.dial for row in group]),
                         cache_rows=slice(first_slot, first_slot + len(group)))
        k_BTL = experts_per_position(out, len(group), T)
        for b, (row, (start, length)) in enumerate(zip(group, spans)):
            row.prefilled += length
            row.positions += length
            row.experts_sum += sum(mean(k_L) or 0.0 for k_L in k_BTL[b][:length])
            if row.request.score_prompt:
                targets = row.request.prompt_ids[start + 1:start + length + 1]
                row.prompt_logprobs += prompt_logprobs(out.logits[b, :len(targets)], targets, row.request.logprobs or 0)
            if row.prefilled == row.prompt_length:
                self.prefilling.remove(row)
                self._prompt_done(row, out.logits[b, length - 1], k_BTL[b][length - 1])

    def _prompt_done(self, row: Row, logits_V: torch.Tensor, experts_L: list[int]) -> None:
        """A row's prompt is all in the cache: report its scores, then finish it or sample its first token and decode."""
        if row.request.score_prompt:
            row.on_event(PromptScored(row.tag, (None, *row.prompt_logprobs)))
        if row.request.max_tokens == 0:
            self._finish(row, "length")
            return
        if row.slot != len(self.decoding):  # rows before it in its prefill call have left: close the gap
            self.model.move_cache_row(row.slot, len(self.decoding))
            row.slot = len(self.decoding)
        self.decoding.append(row)
        self._thresholds_stale = True
        self._emit(row, choose_tokens(logits_V[None], [row])[0], logits_V, experts_L)

    # -- decode -----------------------------------------------------------------------------------------------

    def _decode(self) -> None:
        """Feed every decoding row its last token; each row's next token, sampled its own way."""
        rows = list(self.decoding)
        self.decoded_rows = len(rows)
        tokens_B1 = torch.tensor([[row.generated[-1]] for row in rows], device=self.device)
        input_pos_B1 = torch.tensor([[row.prompt_length + len(row.generated) - 1] for row in rows], device=self.device)
        self._ensure_cache(int(input_pos_B1.max()) + 1)
        out = decode_step(self.model, tokens_B1, input_pos_B1, self._thresholds(), slice(0, len(rows)))
        logits_BV = out.logits[:, -1]
        k_BL = [k_TL[0] for k_TL in experts_per_position(out, len(rows), 1)]
        for row, token_id, logits_V, k_L in zip(rows, choose_tokens(logits_BV, rows), logits_BV, k_BL):
            row.positions += 1
            row.experts_sum += mean(k_L) or 0.0
            self._emit(row, token_id, logits_V, k_L)

    def _thresholds(self) -> torch.Tensor | None:
        """The decoding rows' (B, L) routing thresholds, rebuilt only when the rows changed."""
        if self._thresholds_stale:
            self._thresholds_BL = self.model.routing_thresholds([row.request.dial for row in self.decoding])
            self._thresholds_stale = False
        return self._thresholds_BL

    def _emit(self, row: Row, token_id: int, logits_V: torch.Tensor, experts_L: list[int]) -> None:
        """Record a row's new token, send its visible text (and log probability), and finish the row if it ends here."""
        request = row.request
        row.generated.append(token_id)
        for layer, k in enumerate(experts_L):
            row.experts_per_layer[layer] += k
        finish: FinishReason | None = "eos" if token_id in request.stop_ids else None
        if finish is None and len(row.generated) >= request.max_tokens:
            finish = "length"
        text, stopped = visible_text(row.generated, request.stop, self.decode, final=finish is not None)
        if stopped:
            finish = "stop"
        logprob = None
        if request.logprobs is not None:
            logprob = token_logprob(logits_V.float().log_softmax(dim=-1), token_id, request.logprobs)
        row.on_event(NewToken(row.tag, token_id, text[len(row.shown):], logprob, mean(experts_L), finish))
        row.shown = text
        if finish is not None:
            self._leave(row)
            self._finish(row, finish)

    def _finish(self, row: Row, reason: FinishReason) -> None:
        row.on_event(RowDone(row.tag, reason, row.prompt_length, len(row.generated), tuple(row.experts_per_layer),
                             row.experts_sum, row.positions))

    def _leave(self, row: Row) -> None:
        """Take a decoding row out; the last decoding row moves into its slot."""
        last = self.decoding.pop()
        if last is not row:
            self.model.move_cache_row(last.slot, row.slot)
            last.slot = row.slot
            self.decoding[row.slot] = last
        self._thresholds_stale = True

    def _ensure_cache(self, length: int) -> None:
        """A KV cache of `slots` rows holding at least `length` positions (allocated, or doubled, as needed)."""
        held = self.model.cache_length()
        if length <= held:
            return
        room = min(self.model.config.max_seq_len, max(length, 2 * held, MIN_CACHE_LENGTH))
        if held:
            self.model.grow_caches(room)
        else:
            self.model.setup_caches(self.slots, room)


def experts_per_position(out: ModelOutput, B: int, T: int) -> list[list[list[int]]]:
    """k of every MoE layer at every position, as nested lists [B][T][L] (one host transfer); [L] is empty if dense."""
    if not out.routings:
        return [[[] for _ in range(T)] for _ in range(B)]
    return torch.stack([routing.k_T for routing in out.routings], dim=1).view(B, T, -1).tolist()


def mean(values: Sequence[float]) -> float | None:
    """The mean, or None for no values (a dense model's experts)."""
    return sum(values) / len(values) if values else None


def choose_tokens(logits_BV: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """Each row's next token: greedy rows by one argmax, sampled rows each from its own generator."""
    tokens = logits_BV.argmax(dim=-1).tolist()
    for b, row in enumerate(rows):
        if row.generator is not None:
            tokens[b] = int(sample(logits_BV[b:b + 1], row.request.sampling, row.generator)[0])
    return tokens


def token_logprob(logprobs_V: torch.Tensor, token_id: int, alternatives: int) -> TokenLogprob:
    """The log probability of token_id and the `alternatives` most probable tokens, from one log-softmax."""
    top = logprobs_V.topk(alternatives) if alternatives else None
    pairs = () if top is None else tuple(zip(top.indices.tolist(), top.values.tolist()))
    return TokenLogprob(float(logprobs_V[token_id]), pairs)


def prompt_logprobs(logits_TV: torch.Tensor, targets: Sequence[int], alternatives: int) -> list[TokenLogprob]:
    """Log probability of each target token given the positions up to it (logits_TV[t] predicts targets[t])."""
    if not targets:
        return []
    logprobs_TV = logits_TV.float().log_softmax(dim=-1)
    chosen = logprobs_TV.gather(-1, torch.tensor(targets, device=logits_TV.device)[:, None])[:, 0].tolist()
    if not alternatives:
        return [TokenLogprob(value, ()) for value in chosen]
    top = logprobs_TV.topk(alternatives, dim=-1)
    return [TokenLogprob(value, tuple(zip(ids, values)))
            for value, ids, values in zip(chosen, top.indices.tolist(), top.values.tolist())]
