"""The scheduler: one thread owns the model and a running batch of the decode core; requests join it between steps.

Each request is a `Job` of one or more rows (prompts x choices), each with its own compute dial. Jobs
wait in a bounded queue (`submit` raises QueueFull when it is full: the server answers 429). The
scheduler thread loops: drop the rows of cancelled jobs (client gone, timeout), let waiting rows join
the batch as its slots allow, then run one step of the batch (a prompt chunk, then one decode step of
every decoding row; see dynamoe.decoding). Events go to each job's callback on this thread.

Batching is continuous: a waiting row joins at the next step boundary whenever a slot is free, finished
rows leave at once and their slots are reused, so the batch stays full under load and a new request starts
streaming after at most one step plus its own prefill. Rows of any dial share the batch. (The former static
batching, where a batch of one dial ran until its last row ended, gave about half the throughput under a
mixed-dial load: docs/serve.md, "Load".)
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

from dynamoe.decoding import DecodeBatch, DecodeRequest, Event, NewToken, Row, RowDone
from dynamoe.errors import DynamoeError
from dynamoe.model import Transformer
from dynamoe.serve.metrics import Metrics

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class JobFailed:
    """The batch holding this job raised; the message is for the server log and a 500 answer."""

    message: str


JobEvent = Union[Event, JobFailed]


class QueueFull(Exception):
    """The engine's queue holds as many jobs as it may; the client should retry later."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no more jobs."""


@dataclass(eq=False)
class Job:
    """One request: its rows, and the callback its events go to (called on the engine thread)."""

    requests: list[DecodeRequest]
    on_event: Callable[[JobEvent], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    admitted: int = 0  # rows that have joined the batch so far

    def cancel(self) -> None:
        """Stop this job's rows at the next step boundary (or drop the job if it is still waiting)."""
        self.cancelled.set()


@dataclass(frozen=True)
class EngineLimits:
    """How many rows run together, how prompts are prefilled, how many requests may wait."""

    max_batch_size: int = 32  # rows decoded together (slots of the KV cache); 1 serves one row at a time
    max_queue: int = 256  # jobs waiting; one more is refused with QueueFull
    batch_window_s: float = 0.005  # an idle engine waits this long for more requests to prefill together
    prefill_chunk: int = 512  # prompt tokens per prefill call: a longer prompt is prefilled over several steps


class Engine:
    """The model behind a queue and one scheduler thread; `submit` is safe to call from any thread."""

    def __init__(self, model: Transformer, decode: Callable[[list[int]], str], limits: EngineLimits = EngineLimits(),
                 metrics: Metrics | None = None) -> None:
        self.model, self.decode, self.limits = model, decode, limits
        self.metrics = metrics or Metrics()
        self.batch = self._new_batch()
        self._rows: dict[Row, Job] = {}  # the batch's rows and the job of each
        self._waiting: deque[Job] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.model, self.limits.max_batch_size, self.decode, self.limits.prefill_chunk)

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._loop, name="dynamoe-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel every job, waiting or running, and wait for the scheduler thread to end."""
        with self._condition:
            self._stopping = True  # the scheduler thread cancels the running jobs (it alone touches the batch)
            for job in self._waiting:
                job.cancel()
            self._waiting.clear()
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when the queue is at its limit (EngineStopped once stopping)."""
        with self._condition:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.limits.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the server's limit")
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._condition.notify()

    def _loop(self) -> None:
        while self._wait_for_work():
            self._drop_cancelled()
            with self._condition:
                self._admit()
            self._step()
        for job in set(self._rows.values()):
            job.cancel()
        self._drop_cancelled()
        self.batch.close()

    def _wait_for_work(self) -> bool:
        """Block while there is nothing to do; False once stopping."""
        with self._condition:
            while not (self._stopping or self._waiting or self._rows):
                self._condition.wait()
            if self._stopping:
                return False
            gathering = not self._rows and sum(len(job.requests) for job in self._waiting) < self.limits.max_batch_size
        if gathering and self.limits.batch_window_s:
            time.sleep(self.limits.batch_window_s)  # let requests that arrive together share the first prefill
        return True

    def _admit(self) -> None:
        """Move waiting rows into the batch's free slots, oldest job first (called holding the lock)."""
        self._waiting = deque(job for job in self._waiting if not job.cancelled.is_set())
        while self._waiting and self.batch.free_slots:
            self._admit_rows(self._waiting[0])
        self.metrics.queue_depth.set(len(self._waiting))

    def _admit_rows(self, job: Job) -> None:
        """Join as many of the job's waiting rows as there are free slots; the job leaves the queue once all have."""
        while job.admitted < len(job.requests) and self.batch.free_slots:
            index = job.admitted
            try:
                row = self.batch.add(job.requests[index], lambda event, job=job: self._deliver(job, event), index)
            except DynamoeError as refused:  # the server checks requests before; this keeps the thread alive regardless
                job.cancel()
                job.on_event(JobFailed(str(refused)))
                break
            self._rows[row] = job
            job.admitted += 1
        if job.admitted == len(job.requests) or job.cancelled.is_set():
            self._waiting.remove(job)

    def _deliver(self, job: Job, event: Event) -> None:
        """Count an event, then pass it to its job; a finished row leaves the engine's books."""
        if isinstance(event, NewToken):
            self.metrics.generated_tokens.inc()
        elif isinstance(event, RowDone):
            self._rows = {row: owner for row, owner in self._rows.items() if not (owner is job and row.tag == event.row)}
            self.metrics.prompt_tokens.inc(event.prompt_tokens)
            self.metrics.experts.inc(event.experts_sum)
            self.metrics.positions.inc(event.positions)
            if event.finish_reason == "eos":  # OpenAI's finish reasons: the end-of-text token is a stop too
                event = dataclasses.replace(event, finish_reason="stop")
        job.on_event(event)

    def _drop_cancelled(self) -> None:
        """Free the slots of the rows whose job was cancelled (the client went away, or its time ran out)."""
        for row, job in list(self._rows.items()):
            if job.cancelled.is_set():
                self.batch.cancel(row)
                del self._rows[row]
                self.metrics.cancelled_rows.inc()

    def _step(self) -> None:
        """One step of the batch; a failure fails every job in it (never the scheduler thread) and starts a new batch."""
        started = time.perf_counter()
        try:
            self.batch.step()
        except Exception as error:  # a bug must fail its requests, never the scheduler thread
            log.exception("a step of %d rows failed", len(self._rows))
            for job in set(self._rows.values()):
                job.cancel()
                job.on_event(JobFailed(f"{type(error).__name__}: {error}"))
            self._rows.clear()
            self.batch.close()
            self.batch = self._new_batch()
            return
        if self.batch.decoded_rows:
            self.metrics.batch_rows.observe(self.batch.decoded_rows)
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
