"""The playground page at / in a real headless browser: it streams the served tokens, coloured by their experts."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from dynamoe.config import tiny
from dynamoe.data.tokenizer import load_tokenizer
from dynamoe.model import Transformer
from dynamoe.serve import ServeSettings, create_app
from dynamoe.serve.background import serve_in_thread
from dynamoe.serve.browser import headless_chromium, missing_browser, run_playground

pytestmark = pytest.mark.skipif(missing_browser() is not None, reason=f"no headless browser: {missing_browser()}")


def test_playground_streams_the_served_tokens_coloured_by_their_experts(tmp_path: Path, tiny_corpus: Path) -> None:
    torch.manual_seed(0)
    model = Transformer(tiny(router="dynamic")).eval()
    app = create_app(model, load_tokenizer(tiny_corpus), ServeSettings(model_name="tiny", max_tokens_limit=32))
    prompt = "To be, or not to be"
    with serve_in_thread(app) as url, headless_chromium(tmp_path / "profile") as driver:
        figures = run_playground(driver, url, prompt, max_tokens=24, threshold=0.3)
        spans = driver.find_elements("css selector", "#output .token")
        shown = "".join(span.get_attribute("textContent") for span in spans)
        experts = [float(span.get_attribute("data-experts")) for span in spans]
        colours = {span.value_of_css_property("background-color") for span in spans}
        driver.save_screenshot(str(tmp_path / "playground.png"))
        expected = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).completions.create(
            model="tiny", prompt=prompt, max_tokens=24, temperature=0, extra_body={"dynamoe": {"threshold": 0.3}})
    assert figures["status"].startswith("done") and int(figures["token-count"]) == len(spans) > 0
    assert shown == expected.choices[0].text
    assert float(figures["mean-k"]) == pytest.approx(expected.usage.model_extra["mean_experts_per_token"], abs=0.005)
    assert sum(experts) / len(experts) == pytest.approx(float(figures["mean-k"]), abs=0.005)
    assert len(colours) == len(set(experts)) > 1  # a colour per number of experts, and the number varies
    assert float(figures["tokens-per-s"]) > 0
    assert (tmp_path / "playground.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
