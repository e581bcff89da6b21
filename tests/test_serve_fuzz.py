"""Fuzzing the server from its own OpenAPI schema (schemathesis + hypothesis): no request gets a 5xx.

Valid and deliberately invalid bodies, paths and parameters go to a live server on a tiny model;
every answer must be below 500 and every error must have the OpenAI shape. Bounded to a few hundred
requests, so it runs in well under a minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dynamoe.config import tiny  # noqa: E402
from dynamoe.data.tokenizer import load_tokenizer  # noqa: E402
from dynamoe.model import Transformer  # noqa: E402
from dynamoe.serve import EngineLimits, ServeSettings, create_app  # noqa: E402
from dynamoe.serve.background import serve_in_thread  # noqa: E402

EXAMPLES = 250


def test_fuzzed_requests_never_get_a_server_error(tiny_corpus: Path) -> None:
    torch.manual_seed(0)
    settings_ = ServeSettings(model_name="tiny", max_tokens_limit=8, max_prompts=8,
                              engine=EngineLimits(batch_window_s=0.0))
    app = create_app(Transformer(tiny(router="dynamic")), load_tokenizer(tiny_corpus), settings_)
    schema = schemathesis.openapi.from_dict(app.openapi())
    cases = st.one_of(schema.as_strategy(schemathesis.GenerationMode.POSITIVE),
                      schema.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    seen: dict[int, int] = {}
    with serve_in_thread(app) as url:

        @given(case=cases)
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            response = case.call(base_url=url, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}"
            if response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

        check()
    # The fuzzer must have reached both sides: answers and refusals.
    assert any(200 <= status < 300 for status in seen) and any(400 <= status < 500 for status in seen), seen
