"""The batching engine: one scheduler thread runs waiting requests together on the model.

Requests (jobs) wait in a bounded queue. The scheduler takes the oldest job, waits a short window so
that requests arriving together can join, then runs every waiting job that routes with the same
threshold as one batch (up to a row and token budget): one prefill of the right-padded prompts, then
one decode step per token for all rows together, each row at its own positions (as in
`dynamoe.generate`). Rows with different compute dials never share a batch, because the routing
threshold is a setting of the whole model. Events (prompt scores, tokens, the end of a row) go back
to the job's callback as they happen; a cancelled job (client gone, timeout) stops decoding at the
next step.

Shape legend: B rows in the batch, T tokens in this call, V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from dynamoe.generate import SamplingConfig, mean_experts, sample, visible_text
from dynamoe.model import Transformer, routing_threshold
from dynamoe.serve.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sequence:
    """One prompt to score and continue: a row of a batch."""

    prompt_ids: tuple[int, ...]
    max_tokens: int  # new tokens at most; 0 only scores the prompt
    sampling: SamplingConfig
    stop: tuple[str, ...] = ()
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
    """One generated token of a row, with the text it makes visible (may be '' while held back)."""

    row: int
    token_id: int
    text: str
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class RowDone:
    """A row has finished; its usage figures."""

    row: int
    finish_reason: str  # "stop" (a stop string or the end-of-text token) or "length"
    prompt_tokens: int
    completion_tokens: int
    experts_sum: float  # experts used, summed over MoE layers' means at every position the model ran for this row
    positions: int  # positions the model ran for this row (prompt tokens + generated tokens fed back)


@dataclass(frozen=True)
class JobFailed:
    """The batch holding this job raised; the message is for the server log and a 500 answer."""

    message: str


Event = Union[PromptScored, NewToken, RowDone, JobFailed]


class QueueFull(Exception):
    """The engine's queue holds as many jobs as it may; the client should retry later."""


@dataclass
class Job:
    """One request: its rows share the compute dial, events go to `on_event` (called on the engine thread)."""

    sequences: list[Sequence]
    threshold: float | None
    on_event: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop this job's rows at the next decode step (or drop the job if it is still waiting)."""
        self.cancelled.set()


@dataclass(frozen=True)
class EngineLimits:
    """How much the scheduler may put in one batch and keep waiting."""

    max_batch_size: int = 32  # rows per batch; 1 serves one request at a time
    max_batch_tokens: int = 16384  # rows x longest prompt per batch (bounds the prefill's memory)
    max_queue: int = 256  # jobs waiting; one more is refused with QueueFull
    batch_window_s: float = 0.005  # an idle engine waits this long for more requests to batch with


@dataclass
class _Row:
    """A row of the running batch: which job and sequence it serves, and its decoding state."""

    job: Job
    index: int  # the row's index within its job
    sequence: Sequence
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    shown: str = ""
    running: bool = True
    experts_sum: float = 0.0
    positions: int = 0


class Engine:
    """The model behind a queue and one scheduler thread; `submit` is safe to call from any thread."""

    def __init__(self, model: Transformer, decode: Callable[[list[int]], str], eos_id: int,
                 limits: EngineLimits = EngineLimits(), metrics: Metrics | None = None) -> None:
        self.model, self.decode, self.eos_id, self.limits = model, decode, eos_id, limits
        self.metrics = metrics or Metrics()
        self.device = next(model.parameters()).device
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._loop, name="dynamoe-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel every job, waiting or running, and wait for the scheduler thread to end."""
        with self._condition:
            self._stopping = True
            for job in (*self._waiting, *self._running):
                job.cancel()
            self._waiting.clear()
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when the queue is at its limit."""
        with self._condition:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.limits.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the server's limit")
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._condition.notify()

    def _loop(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            if jobs:
                self._run(jobs)

    def _next_batch(self) -> list[Job] | None:
        """Block until work arrives; then the oldest job and the jobs that can share its batch (None: stopping)."""
        with self._condition:
            while not self._waiting and not self._stopping:
                self._condition.wait()
            if self._stopping:
                return None
            busy = sum(len(job.sequences) for job in self._waiting) >= self.limits.max_batch_size
        if not busy and self.limits.max_batch_size > 1:
            time.sleep(self.limits.batch_window_s)  # let requests that arrive together share the batch
        with self._condition:
            self._running = self._take_batch()
            self.metrics.queue_depth.set(len(self._waiting))
            return self._running

    def _take_batch(self) -> list[Job]:
        """Remove from the queue the oldest job plus every later one with its threshold that fits the budget."""
        live = [job for job in self._waiting if not job.cancelled.is_set()]
        self._waiting = deque(live)
        if not live:
            return []
        threshold = live[0].threshold
        taken: list[Job] = []
        rows, longest = 0, 0
        for job in live:
            if job.threshold != threshold:
                continue
            job_rows = len(job.sequences)
            job_longest = max(len(sequence.prompt_ids) for sequence in job.sequences)
            fits = (rows + job_rows <= self.limits.max_batch_size
                    and (rows + job_rows) * max(longest, job_longest) <= self.limits.max_batch_tokens)
            if taken and not fits:
                continue  # the first job always runs, even alone over budget (its request limits bound it)
            taken.append(job)
            rows, longest = rows + job_rows, max(longest, job_longest)
        for job in taken:
            self._waiting.remove(job)
        return taken

    def _run(self, jobs: list[Job]) -> None:
        """Run one batch, turning any failure into a JobFailed event for each of its jobs."""
        started = time.perf_counter()
        rows = [_Row(job, index, sequence, _generator(sequence.sampling, self.device))
                for job in jobs for index, sequence in enumerate(job.sequences)]
        self.metrics.batch_rows.observe(len(rows))
        threshold = jobs[0].threshold
        dial = routing_threshold(self.model, threshold) if threshold is not None else contextlib.nullcontext()
        try:
            with dial:
                run_batch(self.model, rows, self.decode, self.eos_id, self.metrics)
        except Exception as error:  # a bug must fail its requests, never the scheduler thread
            log.exception("batch of %d rows failed", len(rows))
            for job in jobs:
                job.on_event(JobFailed(f"{type(error).__name__}: {error}"))
        finally:
            self.model.clear_caches()
            self.metrics.batch_seconds.observe(time.perf_counter() - started)


def _generator(sampling: SamplingConfig, device: torch.device) -> torch.Generator | None:
    """A row's own random generator (None when greedy), so that its tokens do not depend on its batch-mates."""
    if sampling.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


@torch.no_grad()
def run_batch(model: Transformer, rows: list[_Row], decode: Callable[[list[int]], str], eos_id: int,
              metrics: Metrics) -> None:
    """Prefill the rows' prompts together, then decode them step by step until every row has finished."""
    device = next(model.parameters()).device
    lengths = [len(row.sequence.prompt_ids) for row in rows]
    longest = max(lengths)
    idx_BT = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        idx_BT[b, :lengths[b]] = torch.tensor(row.sequence.prompt_ids, device=device)
    # The cache only needs the positions of tokens fed back: a row's last new token is never fed.
    cache_len = max(longest, *(length + row.sequence.max_tokens - 1 for length, row in zip(lengths, rows)))
    if any(row.sequence.max_tokens > 1 for row in rows):
        model.setup_caches(len(rows), cache_len)
        out = model(idx_BT, input_pos_T=torch.arange(longest, device=device))
    else:  # scoring and one-token requests: the plain causal forward, the very computation of `dynamoe eval`
        out = model(idx_BT)
    experts_BT = mean_experts(out.routings, len(rows), longest)
    for b, row in enumerate(rows):
        row.positions = lengths[b]
        row.experts_sum = 0.0 if experts_BT is None else float(experts_BT[b, :lengths[b]].sum())
        if row.sequence.score_prompt:
            row.job.on_event(PromptScored(row.index, prompt_logprobs(out.logits[b, :lengths[b]], row.sequence)))
        if row.sequence.max_tokens == 0:
            finish(row, "length")
    metrics.prompt_tokens.inc(sum(lengths))

    rows_B = torch.arange(len(rows), device=device)
    logits_BV = out.logits[rows_B, torch.tensor(lengths, device=device) - 1]
    lengths_B = torch.tensor(lengths, device=device)
    for step in range(max(row.sequence.max_tokens for row in rows)):
        tokens = choose_tokens(logits_BV, rows)
        for b, row in enumerate(rows):
            if row.running and row.job.cancelled.is_set():
                row.running = False
                metrics.cancelled_rows.inc()
            elif row.running:
                emit_token(row, tokens[b], logits_BV[b], decode, eos_id)
                metrics.generated_tokens.inc()
        if not any(row.running for row in rows):
            break
        # Finished rows keep being fed (cheaper than reshaping the cache), at a clamped position they own.
        input_pos_B1 = (lengths_B + step).clamp(max=cache_len - 1)[:, None]
        out = model(torch.tensor(tokens, device=device)[:, None], input_pos_T=input_pos_B1)
        logits_BV = out.logits[:, -1]
        experts_B1 = mean_experts(out.routings, len(rows), 1)
        experts = [0.0] * len(rows) if experts_B1 is None else experts_B1[:, 0].tolist()  # one host sync per step
        for b, row in enumerate(rows):
            if row.running:
                row.positions += 1
                row.experts_sum += experts[b]


def choose_tokens(logits_BV: torch.Tensor, rows: list[_Row]) -> list[int]:
    """Each row's next token: greedy rows by one argmax, sampled rows each from its own generator."""
    tokens = logits_BV.argmax(dim=-1).tolist()
    for b, row in enumerate(rows):
        if row.running and row.generator is not None:
            tokens[b] = int(sample(logits_BV[b:b + 1], row.sequence.sampling, row.generator)[0])
    return tokens


def emit_token(row: _Row, token_id: int, logits_V: torch.Tensor, decode: Callable[[list[int]], str], eos_id: int) -> None:
    """Record a row's new token, send its visible text (and log probability), and finish the row if it ends here."""
    row.generated.append(token_id)
    ended = token_id == eos_id
    at_length = len(row.generated) >= row.sequence.max_tokens
    text, stopped = visible_text(row.generated, row.sequence.stop, decode, final=ended or at_length)
    logprob = None
    if row.sequence.logprobs is not None:
        logprob = token_logprob(logits_V.float().log_softmax(dim=-1), token_id, row.sequence.logprobs)
    row.job.on_event(NewToken(row.index, token_id, text[len(row.shown):], logprob))
    row.shown = text
    if ended or stopped:
        finish(row, "stop")
    elif at_length:
        finish(row, "length")


def finish(row: _Row, reason: str) -> None:
    """Mark a row finished and send its usage."""
    row.running = False
    row.job.on_event(RowDone(row.index, reason, len(row.sequence.prompt_ids), len(row.generated),
                             row.experts_sum, row.positions))


def token_logprob(logprobs_V: torch.Tensor, token_id: int, alternatives: int) -> TokenLogprob:
    """The log probability of token_id and the `alternatives` most probable tokens, from one log-softmax."""
    top = logprobs_V.topk(alternatives) if alternatives else None
    pairs = () if top is None else tuple(zip(top.indices.tolist(), top.values.tolist()))
    return TokenLogprob(float(logprobs_V[token_id]), pairs)


def prompt_logprobs(logits_TV: torch.Tensor, sequence: Sequence) -> tuple[TokenLogprob | None, ...]:
    """Log probability of each prompt token given the ones before it (None for the first)."""
    logprobs_TV = logits_TV[:-1].float().log_softmax(dim=-1)
    ids_T = torch.tensor(sequence.prompt_ids[1:], device=logits_TV.device)
    chosen = logprobs_TV.gather(-1, ids_T[:, None])[:, 0].tolist()
    alternatives = sequence.logprobs or 0
    if alternatives:
        top = logprobs_TV.topk(alternatives, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    else:
        tops = [()] * len(chosen)
    return (None, *(TokenLogprob(value, pairs) for value, pairs in zip(chosen, tops)))
