"""Retrofit: a static top-k model's dynamic twin, its calibration, light-mode distillation and the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dynamoe.checkpoint import load_model, save_model
from dynamoe.cli import main
from dynamoe.config import tiny
from dynamoe.data import TokenDataset
from dynamoe.data.tokenizer import TOKENIZER_FILE
from dynamoe.errors import DynamoeError
from dynamoe.model import Transformer
from dynamoe.retrofit import RetrofitConfig, calibrate_thresholds, dynamic_twin, retrofit, router_inputs

from test_cli import assert_one_line_error, run_cli


def static_model(top_k: int = 4, renormalize: bool = True) -> Transformer:
    """A tiny static top-k model with weights large enough that its gates are far from uniform."""
    torch.manual_seed(0)
    cfg = tiny(router="topk", top_k=top_k, n_experts=8, k_max=8, target_k=None, renormalize_topk=renormalize)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.ffn.router.gate.weight.normal_(std=0.3)
    return model


@pytest.mark.parametrize("renormalize", [True, False], ids=["mixtral", "qwen2-moe"])
def test_twin_at_threshold_one_equals_the_static_model(renormalize: bool) -> None:
    static = static_model(renormalize=renormalize)
    twin = dynamic_twin(static, target_k=2.0)
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        expected, got = static(tokens), twin(tokens)
    assert all(bool((r.k_T == 4).all()) for r in got.routings)  # threshold 1: every one of the top_k slots
    assert torch.allclose(got.logits, expected.logits, atol=1e-5)
    assert twin.layers[0].ffn.experts.w_down is not static.layers[0].ffn.experts.w_down  # a copy, not shared


def test_twin_keeps_the_static_weights_of_the_experts_it_keeps() -> None:
    static, tokens = static_model(), torch.randint(0, 512, (2, 16))
    twin = dynamic_twin(static, target_k=2.0)
    h = router_inputs(twin, tokens, 0, batch_size=2)
    with torch.no_grad():
        dynamic, fixed = twin.routers()[0](h, torch.full((h.shape[0],), 0.5)), static.routers()[0](h)
    assert torch.equal(dynamic.experts_TK[:, :4], fixed.experts_TK)
    assert (dynamic.k_T < 4).any()  # some experts were dropped ...
    torch.testing.assert_close(dynamic.weights_TK[:, :4], fixed.weights_TK * dynamic.mask_TK)  # ... the rest unchanged


@pytest.mark.parametrize("target_k", [1.5, 2.5])
def test_calibration_hits_the_target_in_every_layer(target_k: float) -> None:
    twin = dynamic_twin(static_model(), target_k)
    tokens = torch.randint(0, 512, (8, 32))
    thresholds = calibrate_thresholds(twin, tokens, target_k)
    assert len(thresholds) == 2 and all(0 < t < 1 for t in thresholds)
    for layer, router in enumerate(twin.routers()):
        with torch.no_grad():
            k_T = router(router_inputs(twin, tokens, layer, batch_size=8)).k_T
        assert k_T.float().mean().item() == pytest.approx(target_k, abs=0.1)
        assert len(set(k_T.tolist())) > 1  # k really varies per token


def test_light_mode_trains_only_the_temperature_heads(tiny_corpus: Path) -> None:
    static = static_model()
    before = {name: p.clone() for name, p in static.state_dict().items()}
    cfg = RetrofitConfig(target_k=2.0, mode="light", tokens=4 * 32 * 6, batch_size=4, seq_len=32, lr=1e-2,
                         calibration_tokens=8 * 32)
    dynamic, log = retrofit(static, tiny_corpus, cfg, progress=False)
    assert len(log["history"]) == 6 and all(torch.isfinite(torch.tensor(h["kl"])) for h in log["history"])
    after = dynamic.state_dict()
    for name, value in before.items():  # the static model is untouched, and its weights carried over unchanged
        assert torch.equal(static.state_dict()[name], value)
        assert torch.equal(after[name], value), name
    heads = [name for name in after if ".temperature_head." in name]
    assert heads and any(not torch.allclose(after[name], dynamic_twin(static, 2.0).state_dict()[name]) for name in heads)
    assert dynamic.config.layer_thresholds == log["thresholds"]
    assert [r.threshold for r in dynamic.routers()] == log["thresholds"]


def test_layer_thresholds_survive_a_save_and_are_the_trained_routing(tmp_path: Path) -> None:
    static = static_model()
    twin = dynamic_twin(static, 2.0)
    twin.set_trained_thresholds([0.6, 0.7])
    save_model(tmp_path / "ckpt", twin)
    loaded, cfg = load_model(tmp_path / "ckpt")
    assert cfg.layer_thresholds == [0.6, 0.7] and loaded.trained_thresholds() == [0.6, 0.7]
    assert loaded.routing_thresholds([0.4, None]).tolist() == [[0.4, 0.4], [0.6, 0.7]]
    with pytest.raises(DynamoeError, match="per MoE layer"):
        tiny(router="dynamic", layer_thresholds=[0.5])


def test_twin_rejects_what_it_cannot_retrofit() -> None:
    with pytest.raises(DynamoeError, match="below the checkpoint's top_k"):
        dynamic_twin(static_model(top_k=4), target_k=4.0)
    torch.manual_seed(0)
    with pytest.raises(DynamoeError, match="static top-k"):
        dynamic_twin(Transformer(tiny(router="dynamic")), target_k=2.0)


@pytest.fixture(scope="module")
def static_checkpoint(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    static = static_model()
    return save_model(tmp_path_factory.mktemp("static") / "ckpt", static, tiny_corpus / TOKENIZER_FILE)


def test_cli_free_retrofit_writes_a_dynamic_checkpoint(capsys, tiny_corpus: Path, static_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "retrofit", static_checkpoint, tmp_path / "dyn", "--target-k", "2", "--mode", "free",
                             "--corpus", tiny_corpus, "--seq-len", "32", "--eval-tokens", "512", "--no-progress")
    assert code == 0, err
    config = json.loads((tmp_path / "dyn" / "config.json").read_text())
    assert config["router"] == "dynamic" and len(config["layer_thresholds"]) == 2
    assert "before: perplexity" in out and "after: perplexity" in out
    after_k = float(out.split("after:")[1].split("mean experts/token")[1])
    assert after_k == pytest.approx(2.0, abs=0.5)  # calibrated on validation text, measured on test text
    assert (tmp_path / "dyn" / TOKENIZER_FILE).is_file()


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--target-k", "4"], "below the checkpoint's top_k"),
    (["--target-k", "2", "--tokens", "0"], "tokens"),
])
def test_cli_retrofit_errors_are_one_line(capsys, tiny_corpus: Path, static_checkpoint: Path, tmp_path: Path,
                                          argv: list[str], fragment: str) -> None:
    code, _, err = run_cli(capsys, "retrofit", static_checkpoint, tmp_path / "dyn", "--corpus", tiny_corpus, *argv)
    assert_one_line_error(code, err, fragment)


def test_cli_retrofit_refuses_a_dynamic_checkpoint(capsys, tiny_corpus: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "dynamic", Transformer(tiny(router="dynamic")), tiny_corpus / TOKENIZER_FILE)
    code, _, err = run_cli(capsys, "retrofit", ckpt, tmp_path / "out", "--target-k", "2", "--corpus", tiny_corpus)
    assert_one_line_error(code, err, "static top-k")
