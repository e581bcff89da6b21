"""The server against hostile or unlucky clients: huge stop strings, blank keys, unauthenticated bodies, text that
is not Unicode, bodies and headers that never arrive, prompts of a megabyte.

Each test reproduces a finding of a hostile test of the server (issue 18): it fails on the code before the fix.
Time bounds here are generous timeouts on a blocked request, not measurements; `benchmarks/serve_abuse.py`
measures the costs side by side.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from dynamoe.checkpoint import save_checkpoint
from dynamoe.cli import main
from dynamoe.config import tiny
from dynamoe.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from dynamoe.model import Transformer
from test_serve import MODEL, client, running

STOP_CHARACTERS = 240_000  # four of them: 960 KB, under the default body limit of 1 MB


@pytest.fixture(scope="module")
def tokenizer(tiny_corpus: Path):
    return load_tokenizer(tiny_corpus)


@pytest.fixture(scope="module")
def server(tokenizer) -> Iterator[tuple[str, Any]]:
    with running(tokenizer, max_tokens_limit=24) as (url, app):
        yield url, app


def post(url: str, path: str, raw: bytes) -> requests.Response:
    return requests.post(f"{url}{path}", data=raw, headers={"Content-Type": "application/json"}, timeout=60)


def assert_openai_error(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)  # the bound on a server that never answers


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


# -- stop strings -----------------------------------------------------------------------------------------------


def test_huge_stop_strings_neither_slow_the_request_nor_its_neighbours(server) -> None:
    """Four stops of 240,000 characters took 172 s for 20 tokens, and a request sent meanwhile waited as long."""
    url, _ = server
    body = {"model": MODEL, "prompt": "To be, or not to be", "max_tokens": 20, "temperature": 0}
    stops = [(kind * STOP_CHARACTERS)[:STOP_CHARACTERS] for kind in ("To be", " or", "not ", "e")]
    answers: dict[str, requests.Response] = {}

    def ask(name: str, payload: dict[str, Any]) -> None:
        answers[name] = requests.post(f"{url}/v1/completions", json=payload, timeout=60)

    hostile = threading.Thread(target=ask, args=("hostile", {**body, "stop": stops}))
    hostile.start()
    ask("neighbour", {**body, "max_tokens": 4})
    hostile.join()
    ask("plain", body)
    assert answers["neighbour"].status_code == 200, answers["neighbour"].text
    assert answers["hostile"].status_code == 200, answers["hostile"].text
    assert answers["hostile"].json()["choices"][0]["text"] == answers["plain"].json()["choices"][0]["text"]


# -- the API key ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,environment,source", [
    (["--api-key", ""], {}, "--api-key"),
    (["--api-key", "   "], {"DYNAMOE_API_KEY": "good"}, "--api-key"),
    (["--api-key", "two words"], {}, "--api-key"),
    ([], {"DYNAMOE_API_KEY": ""}, "$DYNAMOE_API_KEY"),
    ([], {"DYNAMOE_API_KEY": " \t"}, "$DYNAMOE_API_KEY"),
], ids=["empty-flag", "blank-flag", "spaced-flag", "empty-variable", "blank-variable"])
def test_an_empty_or_blank_api_key_is_an_error_not_an_open_server(flag: list[str], environment: dict[str, str],
                                                                  source: str, tmp_path: Path, tiny_corpus: Path,
                                                                  monkeypatch, capsys) -> None:
    """`--api-key ""` served without a key, while a blank $DYNAMOE_API_KEY was refused."""
    checkpoint = save_checkpoint(tmp_path / "run", 1, Transformer(tiny()), {"step": 1, "optimizer": {}}, {},
                                 tiny_corpus / TOKENIZER_FILE)
    monkeypatch.delenv("DYNAMOE_API_KEY", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    def refuse_to_serve(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"the server would start (API key {kwargs.get('api_key')!r})")

    monkeypatch.setattr("dynamoe.serve.app.create_app", refuse_to_serve)
    assert main(["serve", str(checkpoint), "--device", "cpu", *flag]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"dynamoe: error: {source} ") and "\n" not in error, error


def test_unauthenticated_requests_are_refused_before_their_body_is_read(tokenizer) -> None:
    """Unauthenticated bodies got 400 with field-level detail; /docs, /redoc, /openapi.json answered without a key."""
    with running(tokenizer, api_key="sesame") as (url, _):
        error = assert_openai_error(post(url, "/v1/completions", b'{"prompt": 5, "temperature": "hot"}'), 401)
        assert error["code"] == "invalid_api_key" and "prompt" not in error["message"]
        for path in ("/docs", "/redoc", "/openapi.json", "/metrics", "/v1/models", "/v1/nothing"):
            assert_openai_error(requests.get(f"{url}{path}", timeout=10), 401)
        assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
        key = {"Authorization": "Bearer sesame"}
        assert requests.get(f"{url}/openapi.json", headers=key, timeout=10).json()["info"]["title"] == "dynamoe"
        for page in ("/docs", "/redoc"):  # off: a browser cannot send the key
            assert requests.get(f"{url}{page}", headers=key, timeout=10).status_code == 404
        # A declared body that never comes: the refusal does not wait for it, and the connection is closed.
        with connect(url) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 900000\r\n\r\n{")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 401 ")
        assert client(url, api_key="sesame").completions.create(model=MODEL, prompt="a", max_tokens=2).choices


# -- text that is not Unicode -----------------------------------------------------------------------------------


SURROGATE = "\\ud800"  # in JSON: a lone surrogate, which UTF-8 cannot encode
NOT_UNICODE = [
    ("/v1/completions", {"prompt": f"a{SURROGATE}b"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", SURROGATE]}, "prompt.1"),
    ("/v1/completions", {"prompt": "a", "stop": ["x", SURROGATE]}, "stop.1"),
    ("/v1/completions", {"prompt": "a", "user": SURROGATE}, "user"),
    ("/v1/completions", {"prompt": "a", SURROGATE: 1}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
     "messages.0.content.0.text"),
    ("/tokenize", {"prompt": f"\\udfff{SURROGATE}"}, "prompt"),
    ("/detokenize", {"tokens": [1], "model": SURROGATE}, "model"),
]


@pytest.mark.parametrize("path,body,param", NOT_UNICODE, ids=[f"{path}:{param}" for path, _, param in NOT_UNICODE])
def test_lone_surrogates_get_a_400_naming_the_field(server, path: str, body: dict, param: str | None) -> None:
    """A prompt holding a lone surrogate (JSON "\\ud800") got a 500 on /v1/completions, chat and /tokenize."""
    url, _ = server
    raw = json.dumps(body).replace("\\\\ud800", "\\ud800").replace("\\\\udfff", "\\udfff").encode()
    assert b"\\ud800" in raw and b"\\\\" not in raw
    error = assert_openai_error(post(url, path, raw), 400)
    assert error["param"] == param and "surrogate" in error["message"]
    pair = raw.replace(b"\\ud800", b"\\ud83d\\ude00").replace(b"\\udfff", b"")  # a proper pair is fine text
    assert post(url, path, pair).status_code != 500


# -- slow clients and big prompts ------------------------------------------------------------------------------


def test_a_body_that_does_not_arrive_is_answered_408_and_dropped(tokenizer) -> None:
    """A request declaring Content-Length: 100 and sending 2 bytes held its connection for over 200 s."""
    with running(tokenizer, read_timeout_s=0.5) as (url, _):
        with connect(url) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"")
            answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 0.5 s" in answer
        assert client(url).completions.create(model=MODEL, prompt="still serving", max_tokens=1).choices


def drip(sock: socket.socket, pieces: Iterator[bytes], every_s: float) -> bool:
    """Send pieces one by one, every_s apart, until they run out (False) or the server closes the connection (True)."""
    sock.settimeout(every_s)
    for piece in pieces:
        try:
            sock.sendall(piece)
            if sock.recv(1) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionError:
            return True
    return False


def test_headers_that_do_not_arrive_close_the_connection(tokenizer) -> None:
    """Headers sent a byte at a time, or never, held their connection for as long as the client liked."""
    with running(tokenizer, read_timeout_s=0.5) as (url, _):
        slow_header = (b"X-Slow: " + b"a" * 200 + b"\r\n")
        with connect(url) as sock:
            assert drip(sock, iter([b"GET /health HTTP/1.1\r\n", *(slow_header[i:i + 1] for i in range(200))]), 0.05)
        with connect(url) as silent:
            assert read_until_closed(silent) == b""
        # A keep-alive connection may still send its next request, and a normal one is answered.
        session = requests.Session()
        for _ in range(2):
            assert session.get(f"{url}/health", timeout=10).ok
            time.sleep(0.2)


class LoopSpy:
    """A tokenizer's stand-in that records, for each call, whether it came from a thread running an event loop."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.calls = tokenizer, []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.tokenizer, name)

        def spied(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, on_event_loop()))
            return method(*args, **kwargs)

        return spied


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_tokenizing_never_blocks_the_event_loop(server) -> None:
    """A 1 MB prompt was tokenized on the event loop: /health took 1.39 s meanwhile."""
    url, app = server
    spy = LoopSpy(app.state.server.tokenizer)
    app.state.server.tokenizer = spy
    try:
        megabyte = "To be, or not to be: that is the question. " * 22_500  # 990,000 characters
        error = assert_openai_error(requests.post(f"{url}/v1/completions", json={"prompt": megabyte}, timeout=60), 400)
        assert error["code"] == "context_length_exceeded"
        assert requests.post(f"{url}/tokenize", json={"prompt": "Hi there"}, timeout=60).json()["count"] > 0
        assert requests.post(f"{url}/detokenize", json={"tokens": [5, 6]}, timeout=60).ok
        chat = {"messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 2}
        assert requests.post(f"{url}/v1/chat/completions", json=chat, timeout=60).ok
    finally:
        app.state.server.tokenizer = spy.tokenizer
    assert len(spy.calls) >= 4 and not any(on_loop for _, on_loop in spy.calls), spy.calls
