"""`dynamoe serve`: the official openai client against a real server (uvicorn in a thread) on a tiny model.

Parity is the backbone: a served completion equals `dynamoe.generate`, echoed log probabilities equal
`dynamoe eval`'s losses, a batched request equals the same request served alone.
"""

from __future__ import annotations

import copy
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import openai
import pytest
import requests
import torch
import torch.nn.functional as F

from dynamoe.checkpoint import load_model, save_checkpoint
from dynamoe.cli import main
from dynamoe.config import tiny
from dynamoe.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from dynamoe.evaluate import evaluate_tokens
from dynamoe.decoding import DecodeRequest, NewToken, RowDone
from dynamoe.generate import GREEDY, generate
from dynamoe.model import Dial, Transformer
from dynamoe.model.layers import Projection
from dynamoe.retrofit import RetrofitConfig, retrofit
from dynamoe.serve import EngineLimits, ServeSettings, create_app
from dynamoe.serve.background import serve_in_thread
from dynamoe.serve.chat import CHAT_STOP, JINJA_TEMPLATE, render_chat
from dynamoe.serve.engine import Engine, Job, JobFailed

MODEL = "tiny"


def tiny_model(max_seq_len: int = 64) -> Transformer:
    """A tiny dynamic-routing model in float64 with weights large enough that argmax and routing are decisive.

    float64 keeps the rounding differences of different batch shapes far below any logit gap, so a
    batched row and the same row alone must give the same tokens.
    """
    torch.manual_seed(0)
    model = Transformer(tiny(router="dynamic", max_seq_len=max_seq_len)).double().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(std=0.15)
    return model


def never_ending(model: Transformer, eos_id: int) -> Transformer:
    """The model with the end-of-text token made impossible (a head bias of -1e9), so that it generates to the limit."""
    head = Projection(model.config.dim, model.config.vocab_size, bias=True).to(model.output.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(model.output.weight)
        head.bias[eos_id] = -1e9
    model.output = head
    return model


@contextmanager
def running(tokenizer, model: Transformer | None = None, start_engine: bool = True, **settings: Any) -> Iterator[tuple[str, Any]]:
    """A server on a free port; yields its base URL and the app."""
    limits = settings.pop("engine", EngineLimits(batch_window_s=0.002))
    app = create_app(model or tiny_model(), tokenizer, ServeSettings(model_name=MODEL, engine=limits, **settings),
                     start_engine=start_engine)
    with serve_in_thread(app) as url:
        yield url, app


def client(url: str, api_key: str = "unused", timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def tokenizer(tiny_corpus: Path):
    return load_tokenizer(tiny_corpus)


@pytest.fixture(scope="module")
def server(tokenizer) -> Iterator[tuple[str, Any, Transformer]]:
    """The shared server, and a copy of its model to compute references with."""
    model = tiny_model()
    reference = copy.deepcopy(model)
    with running(tokenizer, model, max_tokens_limit=48) as (url, app):
        yield url, app, reference


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def expected_greedy(reference: Transformer, tokenizer, prompt_ids: list[int], max_tokens: int, stop=(),
                    dial: Dial = None) -> str:
    eos = tokenizer.token_to_id("<|endoftext|>")
    return generate(reference, prompt_ids, max_tokens, GREEDY, stop_ids={eos}, stop=stop, decode=tokenizer.decode,
                    dial=dial)[0].text


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# -- the openai client ------------------------------------------------------------------------------------------


def test_completion_equals_generate(server, tokenizer) -> None:
    url, _, reference = server
    response = client(url).completions.create(model=MODEL, prompt="To be, or not", max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.text == expected_greedy(reference, tokenizer, encode(tokenizer, "To be, or not"), 12)
    assert choice.finish_reason in ("length", "stop")
    assert response.usage.prompt_tokens == len(encode(tokenizer, "To be, or not"))
    if choice.finish_reason == "length":
        assert response.usage.completion_tokens == 12
    assert 1 <= response.usage.model_extra["mean_experts_per_token"] <= 8


def test_echo_logprobs_equal_eval_losses(server, tokenizer) -> None:
    """lm-eval's loglikelihood request: every prompt token's log probability, as `dynamoe eval` scores it."""
    url, _, reference = server
    ids = encode(tokenizer, "Q: What is 12 + 30? A: 42. To be, or not to be, that is the question.")
    response = client(url).completions.create(model=MODEL, prompt=[ids], max_tokens=1, logprobs=1, echo=True,
                                              temperature=0, seed=1234)
    logprobs = response.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert len(logprobs.token_logprobs) == len(ids) + 1  # the prompt, then the one generated token
    served = np.array(logprobs.token_logprobs[1:len(ids)])
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0, :-1].float()
    expected = -F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").numpy()
    assert np.abs(served - expected).max() < 1e-3
    report = evaluate_tokens(reference, {"text": np.array(ids)}, max_tokens=None, progress=False)
    assert abs(served.sum() + report.total.loss * report.total.tokens) < 1e-3
    # lm-eval's greedy check compares each token's log probability with the best alternative's.
    for position, (value, top) in enumerate(zip(served, logprobs.top_logprobs[1:len(ids)])):
        best = max(top.values())
        assert value <= best + 1e-9
        assert (value == best) == (int(logits[position].argmax()) == ids[position + 1])
    assert response.choices[0].text.startswith(tokenizer.decode(ids))


def test_token_id_prompts_batch_equals_one_by_one(server, tokenizer) -> None:
    url, _, reference = server
    prompts = [[5, 17, 300, 42], [7], list(range(100, 140))]
    response = client(url).completions.create(model=MODEL, prompt=prompts, max_tokens=10, temperature=0)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, response.choices):
        assert choice.text == expected_greedy(reference, tokenizer, prompt, 10)
    assert response.usage.prompt_tokens == sum(map(len, prompts))


def test_streamed_completion_equals_whole(server) -> None:
    url, _, _ = server
    request = dict(model=MODEL, prompt="def f(x):", max_tokens=16, temperature=0.9, seed=7)
    whole = client(url).completions.create(**request)
    chunks = list(client(url).completions.create(**request, stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].text
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_echo_and_logprobs_equal_whole(server) -> None:
    url, _, _ = server
    request = dict(model=MODEL, prompt=[[5, 6, 7, 8]], max_tokens=6, temperature=0, echo=True, logprobs=2)
    whole = client(url).completions.create(**request).choices[0]
    chunks = [chunk.choices[0] for chunk in client(url).completions.create(**request, stream=True)]
    assert "".join(chunk.text for chunk in chunks) == whole.text
    streamed = [chunk.logprobs for chunk in chunks if chunk.logprobs is not None]
    assert sum((lp.tokens for lp in streamed), []) == whole.logprobs.tokens
    assert sum((lp.token_logprobs for lp in streamed), []) == whole.logprobs.token_logprobs
    assert sum((lp.text_offset for lp in streamed), []) == whole.logprobs.text_offset
    # Two alternatives each, fewer only where two tokens decode to the same text (partial UTF-8 bytes).
    assert all(len(top) == 2 or "\ufffd" in top for top in whole.logprobs.top_logprobs[1:]), whole.logprobs.top_logprobs


def test_seed_reproduces_and_choices_differ(server) -> None:
    url, _, _ = server
    request = dict(model=MODEL, prompt="Once", max_tokens=12, temperature=1.0, seed=3, n=2)
    first, second = (client(url).completions.create(**request) for _ in range(2))
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.choices[0].text != first.choices[1].text


def test_stop_string_ends_the_text(server, tokenizer) -> None:
    url, _, reference = server
    prompt = encode(tokenizer, "To be")
    free = expected_greedy(reference, tokenizer, prompt, 20)
    stop = free[3:5]  # a string the free continuation is known to contain
    response = client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    assert response.choices[0].text == free[:free.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_chat_and_streamed_chat_with_usage(server, tokenizer) -> None:
    url, _, reference = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    response = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    prompt = encode(tokenizer, render_chat([(m["role"], m["content"]) for m in messages]))
    assert response.choices[0].message.content == expected_greedy(reference, tokenizer, prompt, 10, (CHAT_STOP,)).lstrip()
    assert response.choices[0].message.role == "assistant"
    assert response.usage.prompt_tokens == len(prompt)

    chunks = list(client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == response.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == response.usage.total_tokens


def test_chat_template_has_a_jinja_twin() -> None:
    jinja2 = pytest.importorskip("jinja2")
    messages = [("system", "S"), ("user", "Hi"), ("assistant", "Hello."), ("user", "Sum 2 and 2?")]
    rendered = jinja2.Template(JINJA_TEMPLATE).render(messages=[{"role": r, "content": c} for r, c in messages],
                                                      add_generation_prompt=True)
    assert rendered == render_chat(messages) == "S\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Sum 2 and 2?\n\nAssistant:"


def test_models_health_and_tokenizer_endpoints(server, tokenizer) -> None:
    url, _, _ = server
    assert [model.id for model in client(url).models.list().data] == [MODEL]
    assert requests.get(f"{url}/health").json() == {"status": "ok"}
    info = requests.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64
    tokens = requests.post(f"{url}/tokenize", json={"prompt": "Hi there", "add_special_tokens": False}).json()["tokens"]
    assert tokens == encode(tokenizer, "Hi there")
    assert requests.post(f"{url}/detokenize", json={"tokens": tokens}).json() == {"prompt": "Hi there"}
    # lm-eval finds the end-of-text id by tokenizing the eos_token text: it must be the one special token.
    eos = requests.post(f"{url}/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"]
    assert eos == [tokenizer.token_to_id("<|endoftext|>")]


def test_metrics_page(server) -> None:
    url, _, _ = server
    client(url).completions.create(model=MODEL, prompt="x", max_tokens=2)
    page = requests.get(f"{url}/metrics").text
    for name in ("dynamoe_requests_total{", "dynamoe_request_seconds_bucket{", "dynamoe_generated_tokens_total",
                 "dynamoe_batch_rows_bucket", "dynamoe_mean_experts_per_token"):
        assert name in page
    assert 'endpoint="/v1/completions",status="200"' in page
    mean_k = float(next(line for line in page.splitlines() if line.startswith("dynamoe_mean_experts_per_token ")).split()[1])
    assert 1 <= mean_k <= 8  # experts over every position the finished requests ran


# -- the compute dial -------------------------------------------------------------------------------------------


def test_per_request_threshold_changes_the_experts(server, tokenizer) -> None:
    url, _, reference = server
    prompt = list(range(10, 30))

    def served(threshold: float) -> Any:
        return client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                              extra_body={"dynamoe": {"threshold": threshold}})

    low, high = served(0.2), served(0.9)
    assert low.usage.model_extra["mean_experts_per_token"] < high.usage.model_extra["mean_experts_per_token"]
    assert low.choices[0].text == expected_greedy(reference, tokenizer, prompt, 8, dial=0.2)
    with pytest.raises(openai.BadRequestError, match="threshold"):
        served(1.5)


def test_requests_at_different_dials_share_a_batch_and_equal_solo_answers(tokenizer) -> None:
    """Requests queued together run as one batch whatever their dials, each row as if alone."""
    model = tiny_model()
    reference = copy.deepcopy(model)
    thresholds = [0.3, 0.8, 0.3, 0.8, 0.3]
    prompts = [list(range(7, 7 + 3 * (i + 1))) for i in range(len(thresholds))]
    with running(tokenizer, model, start_engine=False) as (url, app):
        server = app.state.server
        answers: dict[int, str] = {}

        def ask(i: int) -> None:
            answers[i] = client(url).completions.create(model=MODEL, prompt=prompts[i], max_tokens=6, temperature=0,
                                                        extra_body={"dynamoe": {"threshold": thresholds[i]}}).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(thresholds))]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(server.engine._waiting) == len(thresholds))
        server.engine.start()
        for thread in threads:
            thread.join()
        metrics = server.metrics
        assert metrics.value("dynamoe_batch_rows_bucket", le="4.0") < metrics.value("dynamoe_batch_rows_count")  # 5 rows
    for i, threshold in enumerate(thresholds):
        assert answers[i] == expected_greedy(reference, tokenizer, prompts[i], 6, dial=threshold)


def test_scoring_and_long_generation_share_a_batch(tokenizer) -> None:
    """A full-context prompt scored beside a short prompt generating many tokens: positions stay in range."""
    model = tiny_model()
    reference = copy.deepcopy(model)
    long_prompt, short_prompt = [(i * 7) % 500 + 1 for i in range(64)], [3, 4, 5]
    with running(tokenizer, model, start_engine=False) as (url, app):
        server = app.state.server
        results: dict[str, Any] = {}
        requests_ = {"score": dict(prompt=long_prompt, max_tokens=1, logprobs=1, echo=True, temperature=0),
                     "generate": dict(prompt=short_prompt, max_tokens=40, temperature=0)}

        def ask(name: str) -> None:
            results[name] = client(url).completions.create(model=MODEL, **requests_[name])

        threads = [threading.Thread(target=ask, args=(name,)) for name in requests_]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(server.engine._waiting) == 2)
        server.engine.start()
        for thread in threads:
            thread.join()
    assert results["generate"].choices[0].text == expected_greedy(reference, tokenizer, short_prompt, 40)
    with torch.no_grad():
        logits = reference(torch.tensor([long_prompt])).logits[0, :-1].float()
    expected = -F.cross_entropy(logits, torch.tensor(long_prompt[1:]), reduction="none").numpy()
    served = np.array(results["score"].choices[0].logprobs.token_logprobs[1:64])
    assert np.abs(served - expected).max() < 1e-3


def test_reasoning_effort_sets_the_dial_relative_to_the_trained_routing(server, tokenizer) -> None:
    url, _, reference = server
    messages = [{"role": "user", "content": "Count: one two three"}]
    prompt = encode(tokenizer, render_chat([("user", messages[0]["content"])]))

    def served(**extra: Any) -> Any:
        return client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, **extra)

    efforts = {effort: served(reasoning_effort=effort) for effort in ("minimal", "low", "medium", "high")}
    ks = [reply.usage.model_extra["mean_experts_per_token"] for reply in efforts.values()]
    assert ks == sorted(ks) and ks[0] < ks[-1]
    # Trained at 0.5: medium routes as trained, low at 0.6 x 0.5 in every layer.
    for effort, dial in (("medium", None), ("low", 0.3)):
        expected = expected_greedy(reference, tokenizer, prompt, 8, (CHAT_STOP,), dial=dial).lstrip()
        assert efforts[effort].choices[0].message.content == expected
    with pytest.raises(openai.BadRequestError, match="not both"):
        served(reasoning_effort="low", extra_body={"dynamoe": {"threshold": 0.4}})
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        served(reasoning_effort="maximal")


def test_reasoning_effort_on_a_model_without_a_dial(tokenizer) -> None:
    torch.manual_seed(0)
    with running(tokenizer, Transformer(tiny(router="topk")).eval()) as (url, _):
        ask = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert client(url).chat.completions.create(**ask, reasoning_effort="medium").choices  # as trained: any model
        with pytest.raises(openai.BadRequestError, match="reasoning_effort needs a topp or dynamic router"):
            client(url).chat.completions.create(**ask, reasoning_effort="low")


def test_usage_experts_per_layer_and_streamed_token_experts_equal_generate(server, tokenizer) -> None:
    url, _, reference = server
    prompt = list(range(30, 50))
    alone = generate(reference, prompt, 8, stop_ids={tokenizer.token_to_id("<|endoftext|>")})[0]
    request = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    whole = client(url).completions.create(**request, extra_body={"dynamoe": {"experts_per_layer": True}}).usage
    layers = whole.model_extra["experts_per_layer"]
    assert len(layers) == 2 and sum(layers) / 2 == pytest.approx(whole.model_extra["mean_experts_per_token"], abs=1e-4)
    assert whole.model_extra["mean_experts_per_token"] == pytest.approx(sum(alone.experts) / len(alone.experts), abs=1e-4)
    chunks = list(client(url).completions.create(**request, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"dynamoe": {"token_experts": True}}))
    tokens = [chunk.choices[0] for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason is None]
    assert [choice.model_extra["dynamoe"]["experts"] for choice in tokens] == [round(k, 4) for k in alone.experts]
    assert "experts_per_layer" not in chunks[-1].usage.model_extra  # only on request


def test_a_retrofitted_model_served_as_trained_equals_dynamoe_generate(capsys, tmp_path: Path, tiny_corpus: Path,
                                                                         tokenizer) -> None:
    """Per-layer thresholds (retrofit's calibration) are the trained routing: the server must not replace them."""
    torch.manual_seed(0)
    static = Transformer(tiny(router="topk", top_k=4, target_k=None)).eval()
    with torch.no_grad():
        for block in static.layers:
            block.ffn.router.gate.weight.normal_(std=0.3)
    dynamic, log = retrofit(static, tiny_corpus, RetrofitConfig(target_k=2.0, mode="free", seq_len=32,
                                                                calibration_tokens=8 * 32), progress=False)
    assert dynamic.config.threshold == 1.0 and len(set(log["thresholds"])) == 2  # config.threshold alone: top-4
    checkpoint = save_checkpoint(tmp_path / "run", 1, dynamic, {"step": 1, "optimizer": {}}, {},
                                 tiny_corpus / TOKENIZER_FILE)
    text = "To be, or not to be"
    assert main(["generate", str(checkpoint), "--prompt", text, "--max-new-tokens", "12", "--temperature", "0",
                 "--show-experts", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    generated, legend = out[len(text):].rstrip("\n").rsplit("\n", 1)
    cli_mean_k = float(legend.split("mean ")[1].split()[0])
    model, _ = load_model(checkpoint, pack=True)  # as `dynamoe serve` loads it
    with running(tokenizer, model, max_tokens_limit=48) as (url, _):
        reply = client(url).completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0)
    assert reply.choices[0].text == generated
    served_mean_k = reply.usage.model_extra["mean_experts_per_token"]
    assert round(served_mean_k, 2) == cli_mean_k and served_mean_k < 3.5  # at top-4 routing it would be 4


def test_a_request_arriving_mid_batch_starts_within_one_step(tokenizer) -> None:
    """Continuous batching: a short request joins the running batch at the next step and ends long before its
    batch-mate, which decodes on unchanged."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    model = never_ending(tiny_model(max_seq_len=256), eos)
    reference = copy.deepcopy(model)
    engine = Engine(model, tokenizer.decode, EngineLimits(batch_window_s=0.0))
    order: list[tuple[str, Any]] = []  # (job, event) in the order the engine thread sent them
    engine.start()
    try:
        engine.submit(Job([DecodeRequest((1, 2, 3), 150)], lambda event: order.append(("long", event))))
        wait_until(lambda: len(order) >= 5)
        submitted_at = len(order)
        engine.submit(Job([DecodeRequest((4, 5), 4)], lambda event: order.append(("short", event))))
        wait_until(lambda: any(job == "short" and isinstance(event, RowDone) for job, event in order), timeout=60)
    finally:
        engine.stop()
    first_short = next(i for i, (job, _) in enumerate(order) if job == "short")
    long_done = any(job == "long" and isinstance(event, RowDone) for job, event in order[:first_short])
    assert not long_done and first_short - submitted_at <= 1  # at most the step under way finished first
    for job, prompt, n in (("short", [4, 5], 4), ("long", [1, 2, 3], 150)):
        tokens = [event.token_id for name, event in order if name == job and isinstance(event, NewToken)]
        assert tokens == generate(reference, prompt, n)[0].token_ids[:len(tokens)] and tokens


# -- safety: keys, limits, queue, timeouts, disconnects -------------------------------------------------------------


def test_api_key(tokenizer) -> None:
    with running(tokenizer, api_key="sesame") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "sesame"}):
            assert requests.get(f"{url}/v1/models", headers=headers).status_code == 401
        assert requests.get(f"{url}/metrics").status_code == 401
        assert requests.get(f"{url}/health").status_code == 200
        assert client(url, api_key="sesame").completions.create(model=MODEL, prompt="a", max_tokens=2).choices


def test_full_queue_answers_429_and_a_stopping_engine_503(tokenizer) -> None:
    with running(tokenizer, start_engine=False, engine=EngineLimits(max_queue=1)) as (url, app):
        server = app.state.server
        server.engine.submit(Job([DecodeRequest((1, 2), 1)], lambda event: None))  # fills the queue
        with pytest.raises(openai.RateLimitError, match="busy"):
            client(url).completions.create(model=MODEL, prompt="a", max_tokens=2)
        server.engine.stop()
        response = requests.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"


def test_timeout_answers_504_and_cancels(tokenizer) -> None:
    with running(tokenizer, start_engine=False, request_timeout_s=0.3) as (url, app):
        response = requests.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 4})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        assert all(job.cancelled.is_set() for job in app.state.server.engine._waiting)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_client_disconnect_cancels_generation(tokenizer, stream: bool) -> None:
    model = never_ending(tiny_model(max_seq_len=2048), tokenizer.token_to_id("<|endoftext|>"))
    with running(tokenizer, model, max_tokens_limit=2000) as (url, app):
        metrics = app.state.server.metrics
        body = {"prompt": "a", "max_tokens": 2000, "stream": stream}
        if stream:
            with requests.post(f"{url}/v1/completions", json=body, stream=True) as response:
                next(response.iter_lines())  # generation has started; now hang up
        else:
            with pytest.raises(requests.Timeout):
                requests.post(f"{url}/v1/completions", json=body, timeout=0.5)
        wait_until(lambda: metrics.value("dynamoe_cancelled_rows_total") == 1)
        assert metrics.value("dynamoe_generated_tokens_total") < 2000
        assert len(app.state.server.engine.batch) == 0  # its slot is free


def test_body_over_the_limit_is_413(server, tokenizer) -> None:
    with running(tokenizer, max_body_bytes=1000) as (url, _):
        response = requests.post(f"{url}/v1/completions", json={"prompt": "x" * 2000})
        assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
        # Without a Content-Length (chunked), the body is counted as it arrives.
        chunks = (piece for piece in [b'{"prompt": "', b"x" * 600, b"x" * 600, b'"}'])
        response = requests.post(f"{url}/v1/completions", data=chunks, headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


BAD_REQUESTS = [
    ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 49}, "max_tokens"),  # over the server's limit of 48
    ({"prompt": list(range(60)), "max_tokens": 10}, "max_tokens"),  # over the context
    ({"prompt": list(range(65)), "max_tokens": 1}, "prompt"),
    ({"prompt": [], "max_tokens": 1}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [1, 100000]}, "prompt"),
    ({"prompt": "a", "temperature": -0.5}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "a", "dynamoe": {"threshold": 0}}, "dynamoe.threshold"),
    ({"prompt": "a", "unknown_field": 1}, "unknown_field"),
    ({"prompt": "a", "model": "gpt-4"}, "model"),
    ({"max_tokens": 3}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_REQUESTS, ids=[param for _, param in BAD_REQUESTS])
def test_invalid_requests_get_openai_errors(server, body: dict, param: str) -> None:
    url, _, _ = server
    response = requests.post(f"{url}/v1/completions", json=body)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]


@pytest.mark.parametrize("path,data,status", [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", b"NaN", 400),
    ("/v1/chat/completions", b'{"messages": []}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "x"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "assistant", "content": "x"}]}', 400),
    ("/v1/nothing", b"{}", 404),
])
def test_malformed_bodies_get_openai_errors(server, path: str, data: bytes, status: int) -> None:
    url, _, _ = server
    response = requests.post(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert client(url).completions.create(model=MODEL, prompt="still serving", max_tokens=1).choices


def test_cli_serve_rejects_bad_settings(capsys, tmp_path: Path, tiny_corpus: Path) -> None:
    assert main(["serve", str(tmp_path), "--max-batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dynamoe: error: --max-batch-size=0 must be at least 1"
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    static = save_checkpoint(tmp_path / "run", 1, Transformer(tiny(router="topk")), {"step": 1, "optimizer": {}}, {},
                             tiny_corpus / TOKENIZER_FILE)
    assert main(["serve", str(static), "--threshold", "0.5", "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dynamoe: error: --threshold needs a topp or dynamic router") and "\n" not in error


@pytest.mark.parametrize("extreme", [{"temperature": 1e-300}, {"temperature": 2.0, "top_p": 5e-324},
                                     {"temperature": 1.0, "top_k": 2**62}, {"dynamoe": {"threshold": 5e-324}}],
                         ids=["colder-than-float", "top-p-underflows-float32", "huge-top-k", "tiny-threshold"])
def test_extreme_but_valid_values_are_served(server, extreme: dict) -> None:
    """Found by the fuzzer: values that overflow or underflow float32 once inside the sampler."""
    url, _, _ = server
    response = requests.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 4, **extreme})
    assert response.status_code == 200, response.text


def test_engine_stop_cancels_the_running_batch(tokenizer) -> None:
    eos = tokenizer.token_to_id("<|endoftext|>")
    engine = Engine(never_ending(tiny_model(max_seq_len=2048), eos), tokenizer.decode)
    events: list = []
    job = Job([DecodeRequest((1, 2, 3), 2000, stop_ids=frozenset({eos}))], events.append)
    engine.start()
    engine.submit(job)
    wait_until(lambda: len(events) >= 3)  # decoding
    engine.stop()
    assert job.cancelled.is_set() and not any(isinstance(event, RowDone) for event in events)
    assert len(events) < 2000 and engine.metrics.value("dynamoe_cancelled_rows_total") == 1


def test_a_failing_batch_fails_its_jobs_and_the_engine_goes_on(tokenizer) -> None:
    broken = [True]

    def decode(ids: list[int]) -> str:
        if broken[0]:
            raise ValueError("decoder exploded")
        return tokenizer.decode(ids)

    engine = Engine(tiny_model(), decode)
    first, refused, second = [], [], []
    engine.start()
    try:
        engine.submit(Job([DecodeRequest((1, 2), 3)], first.append))
        wait_until(lambda: bool(first))
        assert isinstance(first[0], JobFailed) and "decoder exploded" in first[0].message
        engine.submit(Job([DecodeRequest((1,) * 60, 10)], refused.append))  # does not fit the context of 64
        wait_until(lambda: bool(refused))
        assert isinstance(refused[0], JobFailed) and "context" in refused[0].message
        broken[0] = False
        engine.submit(Job([DecodeRequest((1, 2), 3)], second.append))
        wait_until(lambda: any(isinstance(event, RowDone) for event in second))
        assert sum(isinstance(event, NewToken) for event in second) == 3
    finally:
        engine.stop()
