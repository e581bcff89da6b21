"""The compute dial and the benchmark: bytes read per token, interleaved measurement, outputs and clear errors."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dynamoe.bench import BenchSettings, VariantResult, bytes_per_token, run_bench
from dynamoe.checkpoint import save_checkpoint
from dynamoe.cli import main
from dynamoe.config import tiny
from dynamoe.errors import DynamoeError
from dynamoe.model import Dial, Transformer
from dynamoe.model import packed as packed_module

FAST = BenchSettings(decode_tokens=3, repeats=2, eval_tokens=48, prompt_tokens=8, batch_sizes=(2, 4))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> tuple[Path, Path]:
    """Run folders of tiny random models with the corpus's tokenizer: static top-2, then dynamic."""
    root = tmp_path_factory.mktemp("bench")
    for router in ("topk", "dynamic"):
        torch.manual_seed(0)
        save_checkpoint(root / router, 1, Transformer(tiny(router=router)), {"step": 1, "optimizer": {}}, {},
                        tiny_corpus / "tokenizer.json")
    return root / "topk", root / "dynamic"


def mean_k(model: Transformer, idx: torch.Tensor, dial: Dial = None) -> float:
    with torch.no_grad():
        out = model(idx, thresholds_BL=model.routing_thresholds([dial] * idx.shape[0]))
        return torch.stack([r.k_T.float() for r in out.routings]).mean().item()


@pytest.mark.parametrize("router", ["dynamic", "topp"])
def test_lower_threshold_runs_fewer_experts_and_leaves_the_model_as_trained(router: str) -> None:
    torch.manual_seed(0)
    model = Transformer(tiny(router=router)).eval()
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        before = model(idx).logits
    ks = [mean_k(model, idx, threshold) for threshold in (0.2, 0.5, 1.0)]
    assert ks[0] < ks[1] < ks[2] == 8.0
    assert mean_k(model, idx) == ks[1]  # None is the trained threshold, 0.5
    with torch.no_grad():
        assert torch.equal(model(idx).logits, before)  # a dial is data: the model itself is unchanged
        assert torch.equal(model(idx, thresholds_BL=model.routing_thresholds([0.5, None])).logits, before)


def test_rows_at_different_dials_share_a_batch_and_each_equals_itself_alone() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny(router="dynamic", layer_thresholds=[0.6, 0.8])).double().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(std=0.15)
    idx = torch.randint(0, 512, (4, 12))
    dials: list[Dial] = [0.2, None, [0.3, 0.95], 1.0]
    with torch.no_grad():
        together = model(idx, thresholds_BL=model.routing_thresholds(dials))
        k_BL = torch.stack([r.k_T.view(4, 12) for r in together.routings], -1)
        for b, dial in enumerate(dials):
            alone = model(idx[b:b + 1], thresholds_BL=model.routing_thresholds([dial]))
            torch.testing.assert_close(together.logits[b:b + 1], alone.logits, rtol=0, atol=1e-12)
            assert torch.equal(k_BL[b], torch.stack([r.k_T for r in alone.routings], -1))
    assert len({round(k_BL[b].double().mean().item(), 6) for b in range(4)}) == 4  # the dials really differ


@pytest.mark.parametrize("cfg", [tiny(router="topk"), tiny(router="relu"), tiny(ffn="dense")], ids=["topk", "relu", "dense"])
def test_dial_refuses_models_without_a_threshold_router(cfg) -> None:
    model = Transformer(cfg)
    assert not model.dialable and model.trained_thresholds() == [] and model.routing_thresholds([None]) is None
    with pytest.raises(DynamoeError, match="topp and dynamic"):
        model.routing_thresholds([None, 0.5])


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, math.nan, True, [0.5], [0.5, 2.0]])
def test_dial_refuses_values_outside_the_unit_interval_or_the_layer_count(value: Dial) -> None:
    model = Transformer(tiny(router="dynamic"))
    with pytest.raises(DynamoeError, match=r"\(0, 1\]|2 MoE layers"):
        model.routing_thresholds([value])
    assert model.dialable and model.trained_thresholds() == [0.5, 0.5]


def test_bench_measures_every_variant_and_writes_its_outputs(tmp_path: Path, tiny_corpus: Path, checkpoints) -> None:
    topk, dynamic = checkpoints
    report = run_bench([topk, dynamic], tiny_corpus, tmp_path, dial=[0.3, 0.6], settings=FAST, device="cpu", progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    variants = saved["variants"]
    assert [v["name"] for v in variants] == ["topk", "dynamic @0.3", "dynamic @0.6"]
    assert all(set(v) == {f.name for f in dataclasses.fields(VariantResult)} for v in variants)
    first, low, high = variants
    assert first["ideal_latency_ratio"] == 1.0 and first["measured_latency_ratio"] == 1.0
    assert first["threshold"] is None and first["decode_mean_k"] == 2.0 and first["eval_mean_k"] == 2.0
    assert (low["threshold"], high["threshold"]) == (0.3, 0.6)
    # Teacher-forced decoding feeds both settings the same text, so the dial alone moves k.
    assert low["decode_mean_k"] < high["decode_mean_k"] and low["bytes_per_token"] < high["bytes_per_token"]
    assert high["ideal_latency_ratio"] == pytest.approx(high["bytes_per_token"] / first["bytes_per_token"])
    assert high["measured_latency_ratio"] == pytest.approx(high["decode_median_ms"] / first["decode_median_ms"])
    for v in variants:
        assert v["decode_steps"] == FAST.repeats * FAST.decode_tokens
        assert set(v["perplexity_per_domain"]) == {"prose", "code", "math"} and v["perplexity"] > 1
        assert set(v["batch_tokens_per_s"]) == {"2", "4"} and min(v["batch_tokens_per_s"].values()) > 0
        assert 0 < v["router_share"] < 1 and v["decode_p95_ms"] >= v["decode_median_ms"] > 0
        assert v["cost_per_million_batch1"] == pytest.approx(0.10 / 3600 * v["decode_median_ms"] / 1e3 * 1e6)
    assert saved["environment"]["torch_threads"] >= 1 and saved["settings"]["dial"] == [0.3, 0.6]
    assert report.variants[1].name in (tmp_path / "results.md").read_text()
    assert (tmp_path / "latency_vs_perplexity.png").read_bytes()[:4] == b"\x89PNG"


def test_compiled_bench_counts_the_same_experts_and_bytes(tmp_path: Path, tiny_corpus: Path, checkpoints) -> None:
    settings = dataclasses.replace(FAST, repeats=1, batch_sizes=(2,))
    eager = run_bench([checkpoints[1]], tiny_corpus, tmp_path / "eager", settings=settings, progress=False)
    compiled = run_bench([checkpoints[1]], tiny_corpus, tmp_path / "compiled", settings=settings, progress=False,
                         compile_decode=True)
    (e,), (c,) = eager.variants, compiled.variants
    assert c.decode_mean_k_per_layer == e.decode_mean_k_per_layer and c.bytes_per_token == e.bytes_per_token
    assert 0 < c.router_share < 1 and compiled.settings["compile_decode"] is True


def test_packed_and_plain_bench_measure_the_same_model(tmp_path: Path, tiny_corpus: Path, checkpoints,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed_module, "PACK_MIN_ELEMENTS", 0)  # the tiny test matrices are packed too
    settings = dataclasses.replace(FAST, repeats=1, batch_sizes=(2,))
    plain = run_bench([checkpoints[1]], tiny_corpus, tmp_path / "plain", settings=settings, progress=False, pack=False)
    packed = run_bench([checkpoints[1]], tiny_corpus, tmp_path / "packed", settings=settings, progress=False)
    (p,), (q,) = plain.variants, packed.variants
    assert q.perplexity == pytest.approx(p.perplexity, rel=1e-4) and q.decode_mean_k_per_layer == p.decode_mean_k_per_layer
    assert packed.settings["pack"] is True and plain.settings["pack"] is False


def test_bench_errors(tmp_path: Path, tiny_corpus: Path, checkpoints) -> None:
    from dynamoe.data.tokenizer import train_tokenizer

    topk, dynamic = checkpoints
    with pytest.raises(DynamoeError, match=r"\(0, 1\]"):
        run_bench([dynamic], tiny_corpus, tmp_path, dial=[0.5, 1.2], settings=FAST)
    with pytest.raises(DynamoeError, match="none of the checkpoints"):
        run_bench([topk], tiny_corpus, tmp_path, dial=[0.5], settings=FAST)
    with pytest.raises(DynamoeError, match="does not exist"):
        run_bench([tmp_path / "nowhere"], tiny_corpus, tmp_path, settings=FAST)
    for bad in (dict(repeats=0), dict(decode_tokens=-1), dict(batch_sizes=(8, 0)), dict(price_per_hour=-1.0)):
        with pytest.raises(DynamoeError, match=next(iter(bad))):
            BenchSettings(**bad)
    other = shutil.copytree(topk, tmp_path / "other")  # a run folder: its checkpoint holds the tokenizer
    train_tokenizer(["a different corpus, a different vocabulary"], vocab_size=300).save(str(next(other.glob("ckpt-*")) / "tokenizer.json"))
    with pytest.raises(DynamoeError, match="tokenizer"):
        run_bench([topk, other], tiny_corpus, tmp_path, settings=FAST)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_error(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    """The one line a failing command prints on stderr."""
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("dynamoe: error: "), err
    return lines[0]


def test_cli_bench_and_threshold_flags(capsys, tmp_path: Path, tiny_corpus: Path, checkpoints) -> None:
    topk, dynamic = checkpoints
    fast = ["--corpus", tiny_corpus, "--decode-tokens", 2, "--repeats", 1, "--eval-tokens", 32, "--batch-sizes", 2,
            "--device", "cpu", "--threads", 1, "--no-progress"]
    code, out, err = run_cli(capsys, "bench", topk, dynamic, "--dial", 0.4, "--out", tmp_path / "bench", *fast)
    assert code == 0, err
    assert "| variant |" in out and "dynamic @0.4" in out and (tmp_path / "bench" / "results.json").is_file()
    assert "(0, 1]" in cli_error(capsys, "bench", dynamic, "--dial", 1.5, *fast)
    assert "repeats" in cli_error(capsys, "bench", dynamic, *fast, "--repeats", 0)
    assert "topp and dynamic" in cli_error(capsys, "bench", topk, "--dial", 0.5, *fast)

    evaluate = ["eval", dynamic, "--corpus", tiny_corpus, "--max-tokens", 32, "--json", "--device", "cpu"]
    code, out, err = run_cli(capsys, *evaluate)
    assert code == 0, err
    code, dialled, err = run_cli(capsys, *evaluate, "--threshold", 0.2)
    assert code == 0, err
    assert json.loads(dialled)["total"]["mean_k"] < json.loads(out)["total"]["mean_k"]
    assert "topp and dynamic" in cli_error(capsys, "eval", topk, "--corpus", tiny_corpus, "--threshold", 0.3)
    code, _, err = run_cli(capsys, "generate", dynamic, "--prompt", "def", "--max-new-tokens", 2, "--temperature", 0,
                           "--threshold", 0.3, "--device", "cpu")
    assert code == 0, err


def test_variant_threshold_is_the_dial_else_the_trained_one_unless_per_layer() -> None:
    from dynamoe.bench import Variant

    model = Transformer(tiny(router="dynamic", threshold=0.5))
    assert Variant("v", "ckpt", model, None).routing_threshold == 0.5
    assert Variant("v", "ckpt", model, 0.3).routing_threshold == 0.3
    per_layer = Transformer(tiny(router="dynamic", layer_thresholds=[0.4, 0.6]))
    assert Variant("v", "ckpt", per_layer, None).routing_threshold is None
    assert Variant("v", "ckpt", Transformer(tiny(router="topk")), None).routing_threshold is None
