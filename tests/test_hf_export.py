"""Hugging Face export: transformers loads what dynamoe writes and computes the same logits; dynamic routing is
refused by default and round-trips through dynamoe when allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from dynamoe.checkpoint import load_model, unique_state_dict
from dynamoe.cli import main
from dynamoe.config import ModelConfig, tiny
from dynamoe.hf import load_hf
from dynamoe.model import Transformer

TOLERANCE = 1e-4

# Static top-k models, each needing a different transformers layout.
STATIC = {
    "MixtralForCausalLM": dict(attn_head_dim=8),
    "Qwen3MoeForCausalLM": dict(qk_norm="head", qkv_bias=True, out_bias=True, renormalize_topk=False, dense_layers=[0],
                                tie_embeddings=True),
    "Qwen2MoeForCausalLM": dict(shared_expert_dim=48, qkv_bias=True, n_kv_heads=2),
    "OlmoeForCausalLM": dict(qk_norm="proj", clip_qkv=0.8),
}


def save_dynamoe(cfg: ModelConfig, folder: Path, seed: int = 0) -> Transformer:
    """A dynamoe checkpoint folder (config and weights) of a random model with random norms and biases."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif name.endswith("router.gate.weight"):
                param.copy_(0.3 * torch.randn_like(param))
            elif name in ("tok_embeddings.weight", "output.weight"):  # logits of std ~3: 1e-4 is a tight bound
                param.copy_(0.5 * torch.randn_like(param))
    folder.mkdir(parents=True)
    cfg.save(folder / "config.json")
    save_file(unique_state_dict(model), folder / "model.safetensors")
    return model


def max_diff(ours: Transformer, theirs: torch.nn.Module, tokens_BT: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(tokens_BT).logits - theirs(tokens_BT).logits).abs().max().item()


@pytest.mark.parametrize("architecture", list(STATIC))
def test_transformers_loads_the_export_with_identical_logits(architecture: str, tmp_path: Path) -> None:
    model = save_dynamoe(tiny(router="topk", top_k=2, **STATIC[architecture]), tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [architecture]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    tokens_BT = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert max_diff(model, theirs, tokens_BT) <= TOLERANCE
    # And back: importing the export gives the model we started from.
    reimported, cfg = load_hf(tmp_path / "hf")
    assert max_diff(model, reimported, tokens_BT) <= 1e-6


def test_a_warmed_up_static_model_exports_once_past_its_warm_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny(router="topk", top_k=2, target_k_decay_steps=3, **STATIC["MixtralForCausalLM"])
    model = save_dynamoe(cfg, tmp_path / "warming")  # at step 0: still routing with k_max experts
    assert main(["export", str(tmp_path / "warming"), str(tmp_path / "refused")]) == 2
    assert "still warming up from dense routing (it runs 8 experts per token" in capsys.readouterr().err
    for router in model.routers():
        router.controller_steps.fill_(3)
    (tmp_path / "warm").mkdir()
    cfg.save(tmp_path / "warm" / "config.json")
    save_file(unique_state_dict(model), tmp_path / "warm" / "model.safetensors")
    assert main(["export", str(tmp_path / "warm"), str(tmp_path / "hf")]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    tokens_BT = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert max_diff(model, theirs, tokens_BT) <= TOLERANCE


def test_dynamic_routing_is_refused_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save_dynamoe(tiny(router="dynamic", target_k=2.0), tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "transformers cannot run" in err and "--allow-dynamic" in err and "\n" not in err
    assert not (tmp_path / "hf").exists()

    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--allow-dynamic"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dynamoe_routing"]["router"] == "dynamic" and config["num_experts_per_tok"] == 2
    assert "cannot run that routing" in (tmp_path / "hf" / "README.md").read_text()
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # loads, as the static stand-in the README describes
    # dynamoe's own import restores the dynamic router exactly, temperature heads included.
    reimported, cfg = load_hf(tmp_path / "hf")
    assert cfg.router == "dynamic" and cfg.threshold == model.config.threshold
    tokens_BT = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert max_diff(model, reimported, tokens_BT) <= 1e-6


def test_as_topk_exports_a_dynamic_model_as_the_static_top_k_of_its_gate(tmp_path: Path) -> None:
    from dynamoe.hf.exporter import static_topk

    model = save_dynamoe(tiny(router="dynamic", target_k=2.0), tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--as-topk", "3"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_experts_per_tok"] == 3 and "dynamoe_routing" not in config
    assert not (tmp_path / "hf" / "README.md").exists()  # a static model: nothing to explain
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    tokens_BT = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert max_diff(static_topk(model, 3)[0], theirs, tokens_BT) <= TOLERANCE


def test_models_transformers_cannot_express_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_dynamoe(tiny(router="topk", ffn="dense"), tmp_path / "dense")
    save_dynamoe(tiny(router="topk", dense_layers=[1]), tmp_path / "plain_dense_layer")  # no family without QK-norm has it
    for name, message in (("dense", "a dense model has no Mixture-of-Experts layout"),
                          ("plain_dense_layer", "no transformers architecture")):
        assert main(["export", str(tmp_path / name), str(tmp_path / f"{name}-hf")]) == 2
        assert message in capsys.readouterr().err


def test_exported_tokenizer_and_eos(tmp_path: Path) -> None:
    from dynamoe.data.tokenizer import train_tokenizer

    save_dynamoe(tiny(router="topk"), tmp_path / "ckpt")
    tokenizer = train_tokenizer(["hello world"] * 10, vocab_size=300)
    tokenizer.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == tokenizer.token_to_id("<|endoftext|>")
    load_model(tmp_path / "ckpt")  # the source checkpoint is untouched


def test_a_calibrated_dynamic_model_keeps_every_setting_through_export_and_import(tmp_path: Path) -> None:
    cfg = tiny(router="dynamic", target_k=2.5, threshold=0.6, temperature_max=5.0, layer_thresholds=[0.4, 0.7])
    model = save_dynamoe(cfg, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--allow-dynamic"]) == 0
    reimported, reimported_cfg = load_hf(tmp_path / "hf")
    assert reimported_cfg == cfg
    tokens_BT = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert max_diff(model, reimported, tokens_BT) <= 1e-6
