"""Generation: cached decoding equals full forwards, batching equals one prompt at a time, sampling, stops, CLI."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from dynamoe.checkpoint import save_checkpoint
from dynamoe.cli import main
from dynamoe.config import tiny
from dynamoe.data.tokenizer import TOKENIZER_FILE
from dynamoe.errors import DynamoeError
from dynamoe.decoding import DecodeBatch, DecodeRequest, NewToken, PromptScored, RowDone
from dynamoe.generate import GREEDY, SamplingConfig, generate, stream, visible_text
from dynamoe.model import Dial, Transformer

PROMPTS = [[5, 17, 300, 42], [7], [99, 98, 97, 96, 95, 94, 93, 92, 91]]


def random_model(router: str = "dynamic") -> Transformer:
    """A tiny model with weights large enough that routing and argmax are decisive, in float64.

    float64 keeps rounding differences (batch size changes matmul blocking) far below any logit gap
    or routing threshold, so exact token equality is a fair test.
    """
    torch.manual_seed(0)
    cfg = tiny(ffn="dense") if router == "dense" else tiny(router=router)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(std=0.15)
    return model


def letters(token_ids: list[int]) -> str:
    """A stand-in tokenizer: one letter per token."""
    return "".join(chr(ord("a") + token % 26) for token in token_ids)


def greedy_by_full_forwards(model: Transformer, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy decoding without a cache: the whole sequence through the model for every token."""
    ids, experts = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            out = model(torch.tensor([ids]))
            ids.append(int(out.logits[0, -1].argmax()))
            if out.routings:
                experts.append(torch.stack([r.k_T[-1] for r in out.routings]).double().mean().item())
    return ids[len(prompt):], experts


@pytest.mark.parametrize("router", ["dynamic", "topk", "relu", "dense"])
def test_cached_greedy_equals_full_forwards(router: str) -> None:
    model = random_model(router)
    result = generate(model, PROMPTS[0], max_new_tokens=10)[0]
    expected_ids, expected_experts = greedy_by_full_forwards(model, PROMPTS[0], 10)
    assert result.token_ids == expected_ids
    assert result.experts == pytest.approx(expected_experts)
    assert result.finish_reason == "length"
    assert all(block.attn.kv_cache is None for block in model.layers)


@pytest.mark.parametrize("router", ["dynamic", "topk"])
def test_batch_of_different_lengths_equals_one_prompt_at_a_time(router: str) -> None:
    model = random_model(router)
    batched = generate(model, PROMPTS, max_new_tokens=8)
    alone = [generate(model, prompt, max_new_tokens=8)[0] for prompt in PROMPTS]
    for together, single in zip(batched, alone):
        assert together.token_ids == single.token_ids
        assert together.experts == single.experts
    assert len({tuple(g.token_ids) for g in alone}) == len(PROMPTS)  # the rows really differ
    if router == "dynamic":
        assert len({k for g in alone for k in g.experts}) > 1  # and k really varies per token


def test_compiled_decode_equals_eager_decode() -> None:
    model = random_model()
    eager = generate(model, PROMPTS, max_new_tokens=6)
    model.compile_decode()
    compiled = generate(model, PROMPTS, max_new_tokens=6)
    assert [g.token_ids for g in compiled] == [g.token_ids for g in eager]
    assert [g.experts for g in compiled] == [g.experts for g in eager]
    assert len({k for g in eager for k in g.experts}) > 1  # k varies, so the eager dispatch inside the graph is exercised
    with torch.no_grad():  # and the compiled step really runs: its logits match the eager forward's
        model.setup_caches(1, 8)
        tokens, positions = torch.tensor([PROMPTS[0][:1]]), torch.tensor([0])
        compiled_logits = model.compiled_decode(tokens, input_pos_T=positions).logits
        # Not exact: RMSNorm and RoPE compute in float32, where eager and fused kernels round differently.
        assert (compiled_logits - model(tokens).logits).abs().max() < 1e-5
        model.clear_caches()


def test_batch_rows_stop_independently() -> None:
    model = random_model()
    alone = [generate(model, prompt, max_new_tokens=8)[0] for prompt in PROMPTS]
    stop_id = alone[1].token_ids[2]
    batched = generate(model, PROMPTS, max_new_tokens=8, stop_ids={stop_id})
    for together, single in zip(batched, alone):
        if stop_id in single.token_ids:
            assert together.token_ids == single.token_ids[:single.token_ids.index(stop_id) + 1]
            assert together.finish_reason == "eos"
        else:
            assert together.token_ids == single.token_ids


def test_sampling_is_reproducible_by_seed_and_top_k_one_is_greedy() -> None:
    model = random_model()
    def sampled(**kwargs: float) -> list[int]:
        return generate(model, PROMPTS[0], 12, SamplingConfig(**{"temperature": 1.0, "top_p": 1.0, **kwargs}))[0].token_ids
    assert sampled(seed=3) == sampled(seed=3)
    assert sampled(seed=3) != sampled(seed=4)
    greedy = generate(model, PROMPTS[0], 12, GREEDY)[0].token_ids
    assert sampled(seed=3, top_k=1) == greedy
    assert sampled(seed=5, top_p=1e-6) == greedy  # the nucleus always keeps the most probable token


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1e-40), SamplingConfig(temperature=1.0, top_p=1e-12)],
                         ids=["tiny-temperature", "tiny-top-p"])
def test_extreme_sampling_parameters_degenerate_to_greedy(sampling: SamplingConfig) -> None:
    from dynamoe.generate import sample

    logits_BV = torch.randn(4, 512) * 30
    assert torch.equal(sample(logits_BV, sampling, torch.Generator().manual_seed(0)), logits_BV.argmax(-1))


def test_stop_string_stops_and_is_trimmed_without_ever_being_shown() -> None:
    model = random_model()
    full = generate(model, PROMPTS[0], 12, decode=letters)[0]
    assert full.text == letters(full.token_ids)
    stop = full.text[4:6]  # spans two tokens: the first must be held back until the second decides
    cut = full.text.find(stop)
    events = list(stream(model, PROMPTS[0], 12, stop=["zzzzzzzz", stop], decode=letters))
    assert "".join(event.text for event in events) == full.text[:cut]
    assert [event.token_id for event in events] == full.token_ids[:cut + 2]
    assert events[-1].finish_reason == "stop"
    assert all(event.finish_reason is None for event in events[:-1])


def test_partial_characters_are_held_back_until_complete() -> None:
    model = random_model()
    def utf8(token_ids: list[int]) -> str:
        return bytes(token % 256 for token in token_ids).decode("utf-8", errors="replace")
    result = generate(model, PROMPTS[2], 30, SamplingConfig(temperature=1.0, top_p=1.0, seed=0), decode=utf8)[0]
    events = list(stream(model, PROMPTS[2], 30, SamplingConfig(temperature=1.0, top_p=1.0, seed=0), decode=utf8))
    assert result.text == utf8(result.token_ids) == "".join(event.text for event in events)
    assert all(not event.text.endswith("\ufffd") for event in events[:-1])


def test_partial_characters_and_possible_stop_strings_are_held_back() -> None:
    def utf8(token_ids: list[int]) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")
    ids = list("ab€c".encode())  # € is three bytes
    assert visible_text(ids[:3], [], utf8, final=False) == ("ab", False)
    assert visible_text(ids[:3], [], utf8, final=True) == ("ab\ufffd", False)
    assert [visible_text(ids[:n], ["b€"], utf8, final=False) for n in range(1, 7)] == [("a", False)] * 4 + [("a", True)] * 2
    assert visible_text(ids, ["b€x"], utf8, final=False) == ("ab€c", False)


class CountingStop(str):
    """A stop string that counts the characters read out of it by indexing and slicing."""

    read = 0

    def __getitem__(self, key):  # type: ignore[override]
        piece = super().__getitem__(key)
        CountingStop.read += len(piece)
        return piece


def test_stop_string_work_does_not_grow_with_the_stop_length() -> None:
    """Found by a hostile client: four stops of 240,000 characters took minutes (every prefix was compared)."""
    def text_of(ids: list[int]) -> str:
        return "".join("abc"[token % 3] for token in ids)

    ids = list(range(40))  # "abcabc...bca"
    shown, reads = [], []
    for length in (100, 1_000, 10_000):
        CountingStop.read = 0
        shown.append(visible_text(ids, [CountingStop("q" * length), CountingStop("c" + "a" * (length - 1))],
                                  text_of, final=False))
        reads.append(CountingStop.read)
    assert reads[0] == reads[1] == reads[2] <= 10, reads
    assert shown == [("ab", False)] * 3  # held back from the first "c": the first that may begin the second stop


def test_text_shown_token_by_token_is_never_taken_back() -> None:
    """Against the plain definition: the shown text only grows, never holds any of a stop, and ends cut at the first
    stop string to appear (before the first of its occurrences, which may have begun before another stop's)."""
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.randrange(3) for _ in range(rng.randint(1, 12))]
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        texts = [letters(ids[:n]) for n in range(1, len(ids) + 1)]
        at_stop = next((text for text in texts if any(s in text for s in stops)), None)
        expected = texts[-1] if at_stop is None else at_stop[:min(at_stop.find(s) for s in stops if s in at_stop)]
        shown = ""
        for n in range(1, len(ids) + 1):
            text, stopped = visible_text(ids[:n], stops, letters, final=n == len(ids))
            assert text.startswith(shown) and expected.startswith(text), (ids, stops, n, text)
            shown = text
            if stopped:
                break
        assert shown == expected and stopped == (at_stop is not None), (ids, stops)


def test_max_new_tokens_and_eos() -> None:
    model = random_model()
    result = generate(model, PROMPTS[0], 5)[0]
    assert len(result.token_ids) == len(result.experts) == 5 and result.finish_reason == "length"
    eos = result.token_ids[2]
    stopped = generate(model, PROMPTS[0], 5, stop_ids={eos})[0]
    assert stopped.token_ids == result.token_ids[:result.token_ids.index(eos) + 1]
    assert stopped.finish_reason == "eos"


def test_abandoned_stream_clears_the_cache() -> None:
    model = random_model()
    events = stream(model, PROMPTS[0], 5)
    next(events)
    assert model.layers[0].attn.kv_cache is not None
    events.close()
    assert all(block.attn.kv_cache is None for block in model.layers)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(prompt_ids=[]), "the prompt is empty"),
    (dict(prompt_ids=[[1, 2], []]), "prompt 1 of the batch is empty"),
    (dict(prompt_ids=[1] * 60), "prompt of 60 tokens + 8 new tokens exceeds the model's context of 64"),
    (dict(prompt_ids=[1, 512]), "outside the model's vocabulary"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop=[""]), "stop strings must be non-empty"),
    (dict(stop=["x"], decode=None), "decode function"),
])
def test_invalid_requests_raise_before_generating(kwargs: dict, message: str) -> None:
    model = random_model("topk")
    request = {"prompt_ids": [1, 2, 3], "max_new_tokens": 8, "decode": letters, **kwargs}
    with pytest.raises(DynamoeError, match=re.escape(message)):
        stream(model, **request)
    assert model.layers[0].attn.kv_cache is None


@pytest.mark.parametrize(("field", "value"), [("temperature", -1.0), ("temperature", float("nan")), ("top_p", 0.0),
                                              ("top_p", 1.5), ("top_k", -1)])
def test_invalid_sampling_config(field: str, value: float) -> None:
    with pytest.raises(DynamoeError, match=field):
        SamplingConfig(**{field: value})


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny model saved with the tiny corpus's tokenizer."""
    torch.manual_seed(0)
    model = Transformer(tiny())
    return save_checkpoint(tmp_path_factory.mktemp("run"), 1, model, {"step": 1, "optimizer": {}}, {},
                           tiny_corpus / TOKENIZER_FILE)


def test_cli_generate_prints_the_prompt_and_its_continuation(capsys, tiny_checkpoint: Path) -> None:
    code = main(["generate", str(tiny_checkpoint), "--prompt", "To be, or not", "--max-new-tokens", "6",
                 "--show-experts", "--color", "always"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("To be, or not")
    assert "\x1b[" in out and out.splitlines()[-1].startswith("experts/token:")
    assert "6 tokens" in err


def test_cli_generate_is_reproducible_and_plain_when_piped(capsys, tiny_checkpoint: Path) -> None:
    argv = ["generate", str(tiny_checkpoint), "--prompt", "def f(x):", "--max-new-tokens", "8", "--temperature", "1",
            "--seed", "7", "--show-experts"]
    outputs = []
    for _ in range(2):
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert "\x1b[" not in outputs[0]  # captured stdout is not a terminal


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "7" * 100], "exceeds the model's context"),
])
def test_cli_generate_errors_are_one_line(capsys, tiny_checkpoint: Path, argv: list[str], fragment: str) -> None:
    code = main(["generate", str(tiny_checkpoint), "--max-new-tokens", "4", *argv])
    out, err = capsys.readouterr()
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynamoe: error: ") and fragment in lines[0]


def test_cli_generate_unknown_checkpoint(capsys, tmp_path: Path) -> None:
    code = main(["generate", str(tmp_path / "nowhere"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "nowhere" in err


# -- the decode core: rows that join and leave a running batch -------------------------------------------------------


def run_continuously(batch: DecodeBatch, requests: list[DecodeRequest]) -> tuple[dict[int, list], int]:
    """Feed the requests to the batch as slots free up, stepping until every row is done; events per request, and
    the most distinct dials that decoded together in one step."""
    events: dict[int, list] = {index: [] for index in range(len(requests))}
    waiting = list(enumerate(requests))
    mixed = 0
    while waiting or len(batch):
        while waiting and batch.free_slots:
            index, request = waiting.pop(0)
            batch.add(request, events[index].append, index)
        batch.step()
        mixed = max(mixed, len({repr(row.request.dial) for row in batch.decoding}))
    return events, mixed


def test_rows_joining_a_running_batch_at_their_own_dials_equal_each_row_alone() -> None:
    model = random_model()
    sampled = SamplingConfig(temperature=1.0, top_p=0.9, seed=11)
    # Prompts longer than the chunk (6 tokens) are prefilled over several steps while the others decode.
    cases: list[tuple[list[int], int, SamplingConfig, Dial]] = [
        (PROMPTS[0], 3, GREEDY, None), (PROMPTS[1], 20, sampled, 0.2), (PROMPTS[2], 5, GREEDY, 0.9),
        (list(range(40, 60)), 6, GREEDY, [0.3, 1.0]), ([8, 9], 4, sampled, None), (list(range(3, 16)), 7, GREEDY, 0.5)]
    requests = [DecodeRequest(tuple(prompt), n, sampling, dial=dial) for prompt, n, sampling, dial in cases]
    events, mixed = run_continuously(DecodeBatch(model, slots=3, chunk_tokens=6), requests)
    assert mixed == 3  # rows of three different dials decoded in one step
    assert model.cache_length() == 0  # the batch gave its cache back once empty
    for index, (prompt, n, sampling, dial) in enumerate(cases):
        alone = generate(model, prompt, n, sampling, dial=dial)[0]
        tokens = [event for event in events[index] if isinstance(event, NewToken)]
        assert [event.token_id for event in tokens] == alone.token_ids
        assert [event.experts for event in tokens] == alone.experts
        done = events[index][-1]
        assert isinstance(done, RowDone) and done.completion_tokens == n and done.positions == len(prompt) + n - 1
        assert sum(done.experts_per_layer) / len(done.experts_per_layer) == pytest.approx(sum(alone.experts))


def test_a_cancelled_row_frees_its_slot_for_the_next_request() -> None:
    model = random_model()
    batch = DecodeBatch(model, slots=1)
    first: list = []
    row = batch.add(DecodeRequest(tuple(PROMPTS[0]), 30), first.append)
    for _ in range(3):
        batch.step()
    assert batch.free_slots == 0
    batch.cancel(row)
    assert batch.free_slots == 1 and not any(isinstance(event, RowDone) for event in first)
    events, _ = run_continuously(batch, [DecodeRequest(tuple(PROMPTS[2]), 6)])
    assert [event.token_id for event in events[0] if isinstance(event, NewToken)] == \
        generate(model, PROMPTS[2], 6)[0].token_ids


def test_chunked_prompt_scores_equal_one_full_forward() -> None:
    model = random_model()
    prompt = list(range(100, 123))
    events, _ = run_continuously(DecodeBatch(model, slots=2, chunk_tokens=5),
                                 [DecodeRequest(tuple(prompt), 0, logprobs=2, score_prompt=True)])
    scored, done = events[0]
    assert isinstance(scored, PromptScored) and isinstance(done, RowDone) and done.completion_tokens == 0
    with torch.no_grad():
        logprobs_TV = model(torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
    assert scored.logprobs[0] is None
    expected = logprobs_TV.gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in scored.logprobs[1:]], dtype=torch.float64), expected)
    assert all(lp.top[0][0] == int(row.argmax()) for lp, row in zip(scored.logprobs[1:], logprobs_TV))
