"""The OpenAI-compatible HTTP API: routes, limits, authentication, streaming.

`create_app` wires a loaded model and tokenizer to a batching `Engine` and returns a FastAPI app;
`run_server` loads a checkpoint and serves it with uvicorn. Each request becomes one engine job (one
row per prompt and choice); the handler then either collects the job's events into one JSON answer
or streams them as server-sent events. A request that waits or runs past the timeout is cancelled
and answered 504; a client that disconnects cancels its job; a full queue answers 429. Middleware
checks the API key, then the body's size and read deadline, before any route reads the body; work
that grows with a request (tokenizing, building a long answer) runs on worker threads, so that one
big request never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from importlib import resources
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenizers import Tokenizer
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from dynamoe.data.tokenizer import EOS_TOKEN, eos_id
from dynamoe.decoding import DecodeRequest, NewToken, PromptScored, RowDone
from dynamoe.errors import DynamoeError
from dynamoe.generate import SamplingConfig
from dynamoe.model import Dial, Transformer
from dynamoe.serve.chat import CHAT_STOP, JINJA_TEMPLATE, render_chat
from dynamoe.serve.dial import effort_dial
from dynamoe.serve.engine import Engine, EngineLimits, EngineStopped, Job, JobEvent, JobFailed, QueueFull
from dynamoe.serve.errors import APIError, error_body, error_response, install_error_handlers
from dynamoe.serve.limits import BodyLimits, with_header_deadline
from dynamoe.serve.metrics import Metrics
from dynamoe.serve.responses import (DONE_LINE, RowResult, Vocabulary, chat_logprobs, completion_choice,
                                     completion_logprobs, envelope, new_id, now, sse, usage)
from dynamoe.serve.schemas import (MAX_SEED, ChatMessage, ChatRequest, CompletionRequest, DetokenizeRequest,
                                   SamplingFields, TokenizeRequest)
from dynamoe.serve.security import APIKeyGuard, check_api_key

log = logging.getLogger(__name__)

MIN_TEMPERATURE = 1e-5  # sampling colder than this is greedy decoding
MIN_TOP_P = 1e-6
CLIENT_CLOSED = 499  # nginx's code for "client closed request": logged and counted, never read by anyone


@dataclass(frozen=True)
class ServeSettings:
    """What the server allows and how it answers."""

    model_name: str = "dynamoe"  # the id clients pass as `model` and /v1/models lists
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer <key>`
    threshold: float | None = None  # default compute dial (None: as trained)
    max_tokens_limit: int = 1024  # largest max_tokens a request may ask for
    max_prompt_tokens: int | None = None  # longest prompt in tokens (None: the model's context)
    max_prompts: int = 64  # prompts in one completions request
    max_body_bytes: int = 1_000_000
    request_timeout_s: float = 300.0  # waiting plus running; then the job is cancelled and the answer is 504
    read_timeout_s: float = 5.0  # for a request's headers, and again for its body; then the connection is dropped
    engine: EngineLimits = field(default_factory=EngineLimits)

    def validate(self) -> None:
        """Raise DynamoeError naming the first setting out of range."""
        positive = {"--max-tokens": self.max_tokens_limit, "--max-body-bytes": self.max_body_bytes,
                    "--max-batch-size": self.engine.max_batch_size, "--max-queue": self.engine.max_queue,
                    "--prefill-chunk": self.engine.prefill_chunk,
                    "--max-prompt-tokens": self.max_prompt_tokens or 1}
        for flag, value in positive.items():
            if value < 1:
                raise DynamoeError(f"{flag}={value} must be at least 1")
        for flag, seconds in {"--timeout": self.request_timeout_s, "--read-timeout": self.read_timeout_s}.items():
            if not seconds > 0:
                raise DynamoeError(f"{flag}={seconds} must be a positive number of seconds")
        if not self.engine.batch_window_s >= 0:
            raise DynamoeError(f"--batch-window-ms={self.engine.batch_window_s * 1000} must be >= 0")
        if self.api_key is not None:
            check_api_key(self.api_key, "--api-key")


class CountRequests:
    """ASGI middleware: count every answer by route and status, and time it."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]
        endpoint = scope["path"] if scope["path"] in self.routes else "other"  # bounded label values

        async def status_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, status_send)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            self.metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - started)


class Server:
    """The model, tokenizer and engine behind the routes, and the request-to-job translation."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, settings: ServeSettings) -> None:
        self.model, self.config, self.settings = model, model.config, settings
        # Like vLLM's: the literal text <|endoftext|> in a prompt is the end-of-text token (a document
        # boundary), so that /tokenize gives lm-eval the real EOS id.
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.encode_special_tokens = False
        self.tokenizer.no_padding()  # a tokenizer.json may ask for them; a prompt is encoded as it is
        self.tokenizer.no_truncation()
        self.eos_id = eos_id(self.tokenizer)
        self.vocab = Vocabulary(self.tokenizer.decode)
        self.metrics = Metrics()
        self.dialable = model.dialable
        self.routed = bool(model.routers())
        self.default_dial = self._default_dial(settings.threshold)
        self.max_prompt_tokens = min(settings.max_prompt_tokens or self.config.max_seq_len, self.config.max_seq_len)
        self.engine = Engine(model, self.tokenizer.decode, settings.engine, self.metrics)
        self.created = now()

    def _default_dial(self, requested: float | None) -> Dial:
        """--threshold, checked; None (as trained) without it."""
        if requested is not None and not self.dialable:
            raise DynamoeError(f"--threshold needs a topp or dynamic router, but this model's is "
                               f"{self.config.router if self.routed else 'a dense feed-forward'}; drop --threshold")
        self.model.layer_thresholds(requested)
        return requested

    # -- requests to sequences ------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        """404 for a model id this server does not serve (omitting it is fine)."""
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {self.settings.model_name!r}",
                           "model", "model_not_found")

    def dial_for(self, body: SamplingFields) -> Dial:
        """The request's compute dial: dynamoe.threshold, else reasoning_effort, else the server's default."""
        requested = body.dynamoe.threshold if body.dynamoe is not None else None
        effort = body.reasoning_effort
        if requested is not None and effort is not None:
            raise APIError(400, "set dynamoe.threshold or reasoning_effort, not both: each sets the compute dial",
                           "reasoning_effort")
        if requested is None and effort in (None, "medium"):
            return self.default_dial if effort is None else None  # medium: as trained
        if not self.dialable:
            param = "dynamoe.threshold" if requested is not None else "reasoning_effort"
            raise APIError(400, f"{param} needs a topp or dynamic router, but this model's router is "
                                f"{self.config.router if self.routed else 'absent (dense)'}", param)
        return float(requested) if requested is not None else effort_dial(effort, self.model.trained_thresholds())

    # The methods below do work that grows with the request: routes call them on a worker thread. The
    # tokenizer's batch calls release the GIL, so that even a megabyte of text leaves the event loop free.

    def tokenize(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """The token ids of each text."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ids, checked against the vocabulary."""
        self.check_prompt(ids, "tokens")
        return self.tokenizer.decode_batch([ids])[0]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The token ids of text prompts; the empty prompt is the start of a document (the end-of-text token)."""
        return [ids or [self.eos_id] for ids in self.tokenize(texts)]

    def prompt_ids(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """The token ids of each prompt of a completions request, checked against the vocabulary and limits."""
        prompts: list[Any] = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        if len(prompts) > self.settings.max_prompts:
            raise APIError(400, f"{len(prompts)} prompts in one request; the limit is {self.settings.max_prompts}", "prompt")
        ids_per_prompt = self.encode(prompts) if isinstance(prompts[0], str) else [list(ids) for ids in prompts]
        for ids in ids_per_prompt:
            self.check_prompt(ids, "prompt")
        return ids_per_prompt

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        """The token ids of a chat rendered with the template, checked against the limits."""
        [prompt] = self.encode([render_chat((message.role, message.text()) for message in messages)])
        self.check_prompt(prompt, "messages")
        return prompt

    def check_prompt(self, ids: list[int], param: str) -> None:
        """400 for a token id outside the vocabulary or a prompt over the length limit."""
        bad = next((token for token in ids if token >= self.config.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary of {self.config.vocab_size}", param)
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}", param,
                           "context_length_exceeded")

    def max_new_tokens(self, requested: int | None, prompt_length: int, param: str) -> int:
        """The tokens to generate for a prompt: the request's max_tokens, or what the context leaves (capped)."""
        # n new tokens need n - 1 of them fed back, so a prompt may fill the context and still get one.
        room = self.config.max_seq_len - prompt_length + 1
        if requested is None:
            return min(room, self.settings.max_tokens_limit)
        if requested > self.settings.max_tokens_limit:
            raise APIError(400, f"{param}={requested} is over the server's limit of {self.settings.max_tokens_limit}", param)
        if requested > room:
            raise APIError(400, f"a prompt of {prompt_length} tokens leaves room for {room} new tokens in the model's "
                                f"context of {self.config.max_seq_len}, but {param}={requested}; lower {param}",
                           param, "context_length_exceeded")
        return requested

    def sequences(self, prompts: list[list[int]], body: SamplingFields, max_tokens: int | None, param: str,
                  stop: tuple[str, ...], logprobs: int | None, score_prompt: bool) -> list[DecodeRequest]:
        """One engine row per prompt and choice; choice j of a seeded request samples with seed + j."""
        dial = self.dial_for(body)
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        rows = []
        for ids in prompts:
            new_tokens = self.max_new_tokens(max_tokens, len(ids), param)
            for choice in range(body.n):
                # Below MIN_TEMPERATURE, logits / temperature overflows; the limit of the softmax there is the argmax.
                temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
                # A top_p that underflows float32 would drop every token; any tiny top_p keeps just the top one.
                sampling = SamplingConfig(temperature=temperature, top_p=max(body.top_p, MIN_TOP_P), top_k=body.top_k,
                                          seed=(seed + choice) % (MAX_SEED + 1))
                rows.append(DecodeRequest(tuple(ids), new_tokens, sampling, stop, frozenset({self.eos_id}), dial, logprobs,
                                    score_prompt))
        return rows

    # -- jobs ---------------------------------------------------------------------------------------------

    def submit(self, sequences: list[DecodeRequest]) -> tuple[Job, asyncio.Queue[JobEvent]]:
        """Queue a job whose events arrive on the returned asyncio queue; 429 when the engine's queue is full."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[JobEvent] = asyncio.Queue()

        def on_event(event: JobEvent) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        job = Job(sequences, on_event)
        try:
            self.engine.submit(job)
        except QueueFull as full:
            raise APIError(429, f"the server is busy ({full}); retry shortly", code="queue_full") from None
        except EngineStopped as stopped:
            raise APIError(503, f"{stopped}; retry on another server or later", code="shutting_down") from None
        return job, events

    async def events(self, job: Job, queue: asyncio.Queue[JobEvent], deadline: float) -> AsyncIterator[JobEvent]:
        """The job's events until every row is done; 504 past the deadline, 500 if its batch failed."""
        loop = asyncio.get_running_loop()
        remaining = len(job.requests)
        try:
            while remaining:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=max(deadline - loop.time(), 0.0))
                except TimeoutError:
                    raise APIError(504, f"the request did not finish within {self.settings.request_timeout_s} s "
                                        "(waiting and generating); ask for fewer tokens or retry later",
                                   code="timeout") from None
                if isinstance(event, JobFailed):
                    raise APIError(500, f"generation failed: {event.message}")
                if isinstance(event, RowDone):
                    remaining -= 1
                yield event
        finally:
            if remaining:  # abandoned: a timeout, a failure, or a client that went away
                job.cancel()

    def usage(self, rows: list[RowResult], body: SamplingFields) -> dict[str, Any]:
        """The usage object of a request's rows (experts per layer when dynamoe.experts_per_layer asks for them)."""
        return usage(rows, body.n, self.routed, body.dynamoe is not None and body.dynamoe.experts_per_layer)

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.request_timeout_s

    async def collect(self, request: Request, job: Job, queue: asyncio.Queue[JobEvent], rows: list[RowResult]) -> bool:
        """Fold every event into rows; False if the client disconnected first (the job is then cancelled)."""
        deadline = self.deadline()

        async def consume() -> None:
            async with aclosing(self.events(job, queue, deadline)) as events:
                async for event in events:
                    rows[event.row].add(event)  # type: ignore[union-attr]

        consumer = asyncio.create_task(consume())
        watcher = asyncio.create_task(wait_for_disconnect(request))
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer.done():
            watcher.cancel()
            consumer.result()  # re-raises a timeout or failure as its APIError
            return True
        consumer.cancel()
        job.cancel()
        return False


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read, so only that message can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(model: Transformer, tokenizer: Tokenizer, settings: ServeSettings = ServeSettings(),
               start_engine: bool = True) -> FastAPI:
    """The FastAPI app serving `model`; its engine thread runs from startup to shutdown."""
    server = Server(model.eval(), tokenizer, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start_engine:
            server.engine.start()
        yield
        server.engine.stop()

    # With a key, the interactive pages are off: a browser cannot send it. The schema stays, behind the key.
    pages = {"docs_url": None, "redoc_url": None} if settings.api_key is not None else {}
    app = FastAPI(title="dynamoe", version="0.1.0", lifespan=lifespan, **pages,
                  description="OpenAI-compatible API for dynamoe MoE models, with a per-request compute dial.")
    app.state.server = server
    install_error_handlers(app)

    playground = (resources.files("dynamoe.serve") / "static" / "playground.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground_page() -> HTMLResponse:
        """The playground: a prompt, the compute dial, and the streamed tokens coloured by the experts each used."""
        return HTMLResponse(playground)  # a static page (no key needed); its requests carry the key it is given

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: 200 while the server runs (no API key needed)."""
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics: requests, tokens, latency histograms, batch sizes, experts per token."""
        return PlainTextResponse(server.metrics.render(), media_type=server.metrics.content_type)

    def model_card() -> dict[str, Any]:
        cfg = server.config
        routing = {"router": cfg.router if server.routed else None, "dialable": server.dialable,
                   "k_max": (cfg.top_k if cfg.router == "topk" else cfg.k_max) if server.routed else None,
                   "trained_thresholds": model.trained_thresholds()}
        return {"id": settings.model_name, "object": "model", "created": server.created, "owned_by": "dynamoe",
                "max_model_len": server.config.max_seq_len, "dynamoe": routing}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The one model this server serves."""
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        """The served model, by id."""
        server.check_model(model_id)
        return model_card()

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """What lm-eval's remote tokenizer needs: special tokens, context length, the chat template."""
        return {"eos_token": EOS_TOKEN, "bos_token": None, "pad_token": None, "model_max_length": server.config.max_seq_len,
                "vocab_size": server.config.vocab_size, "chat_template": JINJA_TEMPLATE}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """Text to token ids, as the completions endpoint encodes a text prompt."""
        server.check_model(body.model)
        [ids] = await asyncio.to_thread(server.tokenize, [body.prompt], body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.config.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        """Token ids to text."""
        server.check_model(body.model)
        return {"prompt": await asyncio.to_thread(server.detokenize, body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion: prompts as text or token ids, echo and logprobs (lm-eval's loglikelihood), streaming."""
        server.check_model(body.model)
        prompts = await asyncio.to_thread(server.prompt_ids, body.prompt)
        sequences = server.sequences(prompts, body, body.max_tokens, "max_tokens", body.stop_strings(), body.logprobs,
                                     score_prompt=body.echo and body.logprobs is not None)
        job, queue = server.submit(sequences)
        name, created, response_id = settings.model_name, now(), new_id("cmpl")
        rows = [RowResult(sequence.prompt_ids) for sequence in sequences]
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = stream_completion(server, job, queue, rows, body, response_id, created, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        if not await server.collect(request, job, queue, rows):
            return error_response(CLIENT_CLOSED, "the client closed the connection")

        def answer() -> JSONResponse:  # echoed prompts and their log probabilities grow with the prompts
            choices = [completion_choice(server.vocab, index, row, body.echo, body.logprobs is not None)
                       for index, row in enumerate(rows)]
            return JSONResponse(envelope(response_id, "text_completion", name, created, choices,
                                         server.usage(rows, body)))

        return await asyncio.to_thread(answer)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        """Chat: the messages rendered with the chat template (see docs/serve.md), then a completion."""
        server.check_model(body.model)
        prompt = await asyncio.to_thread(server.chat_prompt, body.messages)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        alternatives = (body.top_logprobs or 0) if body.logprobs else None
        sequences = server.sequences([prompt], body, body.max_completion_tokens or body.max_tokens, param,
                                     (*body.stop_strings(), CHAT_STOP), alternatives, score_prompt=False)
        job, queue = server.submit(sequences)
        created, response_id = now(), new_id("chatcmpl")
        rows = [RowResult(sequence.prompt_ids) for sequence in sequences]
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream_chat(server, job, queue, rows, body, response_id, created, include_usage),
                                     media_type="text/event-stream")
        if not await server.collect(request, job, queue, rows):
            return error_response(CLIENT_CLOSED, "the client closed the connection")
        choices = []
        for index, row in enumerate(rows):
            assert row.done is not None
            choices.append({"index": index, "message": {"role": "assistant", "content": row.text.lstrip()},
                            "logprobs": chat_logprobs(server.vocab, row.token_ids, row.logprobs) if body.logprobs else None,
                            "finish_reason": row.done.finish_reason})
        return JSONResponse(envelope(response_id, "chat.completion", settings.model_name, created, choices,
                                     server.usage(rows, body)))

    # The last added runs first: count every answer, then check the key, then the body's size and deadline.
    app.add_middleware(BodyLimits, max_body_bytes=settings.max_body_bytes, read_timeout_s=settings.read_timeout_s)
    if settings.api_key is not None:
        app.add_middleware(APIKeyGuard, api_key=settings.api_key)
    app.add_middleware(CountRequests, metrics=server.metrics,
                       routes=frozenset(route.path for route in app.routes if "{" not in getattr(route, "path", "{")))
    return app


def uvicorn_config(app: FastAPI, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for an app of `create_app`: its HTTP protocol gets the app's deadline for request headers."""
    read_timeout_s = app.state.server.settings.read_timeout_s
    return uvicorn.Config(app, http=with_header_deadline(AutoHTTPProtocol, read_timeout_s), **options)


async def stream_events(server: Server, job: Job, queue: asyncio.Queue[JobEvent],
                        on_event: Callable[[JobEvent], list[str]], closing: Callable[[], list[str]]) -> AsyncIterator[str]:
    """Server-sent events: on_event's chunks for each engine event, then closing's, then [DONE]; errors as an event."""
    started = time.perf_counter()
    first_token = True
    try:
        async with aclosing(server.events(job, queue, server.deadline())) as events:
            async for event in events:
                if first_token and isinstance(event, NewToken):
                    server.metrics.first_token_seconds.observe(time.perf_counter() - started)
                    first_token = False
                for chunk in on_event(event):
                    yield chunk
        for chunk in closing():
            yield chunk
    except APIError as error:  # the status line is sent already: report the error in the stream
        yield sse(error_body(error.status, error.message, error.param, error.code))
    yield DONE_LINE


def stream_completion(server: Server, job: Job, queue: asyncio.Queue[JobEvent], rows: list[RowResult],
                      body: CompletionRequest, response_id: str, created: int, include_usage: bool) -> AsyncIterator[str]:
    """A streamed text_completion: echoed prompts first, then one chunk per token with text, then finish reasons."""
    vocab, with_logprobs, token_experts = server.vocab, body.logprobs is not None, wants_token_experts(body)
    prompt_texts = [vocab.decode(list(row.prompt_ids)) if body.echo else "" for row in rows]

    def chunk(index: int, text: str, logprobs: dict[str, Any] | None = None, finish_reason: str | None = None,
              experts: float | None = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse(envelope(response_id, "text_completion", server.settings.model_name, created,
                            [with_experts(choice, experts)]))

    # Echo without logprobs needs no model output: send the prompts at once.
    opening = [chunk(index, text) for index, text in enumerate(prompt_texts) if text and not with_logprobs]

    def on_event(event: JobEvent) -> list[str]:
        row = rows[event.row]  # type: ignore[union-attr]
        row.add(event)  # type: ignore[arg-type]
        if isinstance(event, PromptScored):
            return [chunk(event.row, prompt_texts[event.row],
                          completion_logprobs(vocab, row.prompt_ids, event.logprobs, 0))]
        if isinstance(event, NewToken):
            logprobs = None
            if with_logprobs:
                start = len(prompt_texts[event.row]) + len(vocab.decode(row.token_ids[:-1]))
                logprobs = completion_logprobs(vocab, [event.token_id], [event.logprob], start)
            if token_experts:
                return [chunk(event.row, event.text, logprobs, None, event.experts)]
            return [chunk(event.row, event.text, logprobs)] if event.text or logprobs else []
        assert isinstance(event, RowDone)
        return [chunk(event.row, "", None, event.finish_reason)]

    def closing() -> list[str]:
        if not include_usage:
            return []
        return [sse(envelope(response_id, "text_completion", server.settings.model_name, created, [],
                             server.usage(rows, body)))]

    async def chunks() -> AsyncIterator[str]:
        for line in opening:
            yield line
        async for line in stream_events(server, job, queue, on_event, closing):
            yield line

    return chunks()


def stream_chat(server: Server, job: Job, queue: asyncio.Queue[JobEvent], rows: list[RowResult], body: ChatRequest,
                response_id: str, created: int, include_usage: bool) -> AsyncIterator[str]:
    """A streamed chat.completion: the role first, then content deltas, then each choice's finish reason."""
    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None,
              logprobs: dict[str, Any] | None = None, experts: float | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse(envelope(response_id, "chat.completion.chunk", server.settings.model_name, created,
                            [with_experts(choice, experts)]))

    shown = [""] * len(rows)
    token_experts = wants_token_experts(body)

    def on_event(event: JobEvent) -> list[str]:
        row = rows[event.row]  # type: ignore[union-attr]
        row.add(event)  # type: ignore[arg-type]
        if isinstance(event, NewToken):
            # The reply follows "Assistant:", so its leading whitespace is the template's, not content.
            text = event.text if shown[event.row] else event.text.lstrip()
            shown[event.row] += text
            logprobs = chat_logprobs(server.vocab, [event.token_id], [event.logprob]) if body.logprobs else None
            if token_experts:
                return [chunk(event.row, {"content": text}, None, logprobs, event.experts)]
            return [chunk(event.row, {"content": text}, None, logprobs)] if text or logprobs else []
        if isinstance(event, RowDone):
            return [chunk(event.row, {}, event.finish_reason)]
        return []

    def closing() -> list[str]:
        if not include_usage:
            return []
        return [sse(envelope(response_id, "chat.completion.chunk", server.settings.model_name, created, [],
                             server.usage(rows, body)))]

    async def chunks() -> AsyncIterator[str]:
        for index in range(len(rows)):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for line in stream_events(server, job, queue, on_event, closing):
            yield line

    return chunks()


def wants_token_experts(body: SamplingFields) -> bool:
    """Whether streamed token chunks carry each token's experts."""
    return body.dynamoe is not None and body.dynamoe.token_experts


def with_experts(choice: dict[str, Any], experts: float | None) -> dict[str, Any]:
    """A streamed choice, with its token's experts (dynamoe.token_experts) when there are some."""
    return choice if experts is None else {**choice, "dynamoe": {"experts": round(experts, 4)}}


def serve_checkpoint(checkpoint: Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                     model_name: str = "dynamoe", threshold: float | None = None, max_batch_size: int = 32,
                     max_queue: int = 256, max_tokens: int = 1024, max_prompt_tokens: int | None = None,
                     max_body_bytes: int = 1_000_000, timeout: float = 300.0, read_timeout: float = 5.0,
                     batch_window_ms: float = 5.0, prefill_chunk: int = 512,
                     compile: bool = False, device: str = "auto") -> None:
    """Check the settings, load a checkpoint and serve it with uvicorn until interrupted (`dynamoe serve`)."""
    from dynamoe.checkpoint import load_model, load_tokenizer_for
    from dynamoe.train import resolve_device

    limits = EngineLimits(max_batch_size=max_batch_size, max_queue=max_queue, batch_window_s=batch_window_ms / 1000,
                          prefill_chunk=prefill_chunk)
    settings = ServeSettings(model_name=model_name, api_key=api_key, threshold=threshold, max_tokens_limit=max_tokens,
                             max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
                             request_timeout_s=timeout, read_timeout_s=read_timeout, engine=limits)
    settings.validate()
    if not 0 <= port <= 65535:
        raise DynamoeError(f"--port={port} must be in 0..65535")
    model, _ = load_model(checkpoint, device=resolve_device(device), pack=True)
    if compile:
        model.compile_decode()
    app = create_app(model, load_tokenizer_for(checkpoint), settings)
    print(f"serving {checkpoint} as {model_name!r} on http://{host}:{port}/v1 "
          f"(API key {'required' if api_key else 'not required'}); Ctrl-C stops", flush=True)
    uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)).run()
