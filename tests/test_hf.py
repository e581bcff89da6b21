"""Hugging Face import: logits equal transformers' on tiny random models of each family, both weight layouts,
prefill and cached decode; clear errors for checkpoints dynamoe cannot read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM,
                          PreTrainedModel, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from dynamoe import load_hf
from dynamoe.checkpoint import load_model
from dynamoe.cli import main
from dynamoe.data.tokenizer import train_tokenizer
from dynamoe.generate import GREEDY, decode_one_token, prefill
from dynamoe.hf.families import FAMILIES

TOLERANCE = 1e-4  # max |logit difference| in fp32
VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, eos_token_id=0,
              bos_token_id=None, pad_token_id=None)

# Each family with the features that set it apart switched on.
FAMILY_MODELS: dict[str, Callable[[], PreTrainedModel]] = {
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**COMMON, num_hidden_layers=2, intermediate_size=32,
                                                        num_local_experts=8, num_experts_per_tok=2)),
    # Shared expert with its sigmoid gate, q/k/v bias, a dense block, top-k weights not renormalised.
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        **COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1], qkv_bias=True, norm_topk_prob=False)),
    # QK-norm per head, head_dim != hidden/heads, biases everywhere in attention, dense blocks by decoder_sparse_step,
    # renormalised top-3, tied embeddings.
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(
        **{**COMMON, "num_attention_heads": 2, "num_key_value_heads": 1}, head_dim=48, num_hidden_layers=3,
        intermediate_size=80, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3, decoder_sparse_step=2,
        attention_bias=True, norm_topk_prob=True, tie_word_embeddings=True)),
    # QK-norm over the whole projection, clipped q/k/v.
    "olmoe": lambda: OlmoeForCausalLM(OlmoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=32, num_experts=8,
                                                  num_experts_per_tok=2, clip_qkv=0.6, norm_topk_prob=False)),
}


def build_hf_model(family: str) -> PreTrainedModel:
    """A seeded tiny fp32 model whose norms and biases are random too (not trivially 1 and 0)."""
    torch.manual_seed(0)
    model = FAMILY_MODELS[family]().float().eval()
    randomise(model)
    return model


@torch.no_grad()
def randomise(model: torch.nn.Module) -> None:
    """Norm weights near 1, biases near 0, router gates sharp enough that no two experts tie, logits of std ~3."""
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "norm" in name:
            param.copy_(1 + 0.3 * noise)
        elif name.endswith("bias"):
            param.copy_(0.1 * noise)
        elif name.endswith(("mlp.gate.weight", "router.gate.weight")):
            param.copy_(0.3 * noise)
        elif "embed_tokens" in name or "lm_head" in name:  # logits of a realistic size, so 1e-4 is a tight bound
            param.copy_(0.5 * noise)


def save_both_layouts(family: str, root: Path) -> tuple[str, PreTrainedModel, Path, Path]:
    """(family, model, per-expert folder as save_pretrained writes it, fused 3-D layout in several shards)."""
    model = build_hf_model(family)
    model.save_pretrained(root / "per_expert")
    model.save_pretrained(root / "fused", save_original_format=False, max_shard_size="100KB")
    return family, model, root / "per_expert", root / "fused"


@pytest.fixture(scope="module", params=list(FAMILY_MODELS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, PreTrainedModel, Path, Path]:
    return save_both_layouts(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def mixtral_saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, PreTrainedModel, Path, Path]:
    return save_both_layouts("mixtral", tmp_path_factory.mktemp("mixtral"))


def test_the_layouts_are_what_transformers_writes(saved: tuple[str, PreTrainedModel, Path, Path]) -> None:
    family, _, per_expert, fused = saved
    per_expert_keys = json.dumps(list(safetensors_keys(per_expert)))
    assert ".experts.0." in per_expert_keys and "gate_up_proj" not in per_expert_keys
    assert (fused / "model.safetensors.index.json").is_file()
    assert "mlp.experts.gate_up_proj" in (fused / "model.safetensors.index.json").read_text()


def safetensors_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_logits_equal_transformers_in_prefill_and_cached_decode(saved: tuple[str, PreTrainedModel, Path, Path], layout: str,
                                                              tmp_path: Path) -> None:
    family, hf_model, per_expert, fused = saved
    if layout == "per_expert":  # through the command line and a checkpoint folder
        assert main(["import", str(per_expert), str(tmp_path / "imported")]) == 0
        model, cfg = load_model(tmp_path / "imported")
    else:  # straight into a model
        model, cfg = load_hf(fused)
    tokens_BT = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected_BTV = hf_model(tokens_BT).logits
        assert (model(tokens_BT).logits - expected_BTV).abs().max() <= TOLERANCE

    prompt = 6
    model.setup_caches(batch_size=2, max_len=tokens_BT.shape[1])
    last_BV, _ = prefill(model, tokens_BT[:, :prompt], torch.full((2,), prompt))
    assert (last_BV - expected_BTV[:, prompt - 1]).abs().max() <= TOLERANCE
    for t in range(prompt, tokens_BT.shape[1]):
        position_B1 = torch.full((2, 1), t)
        with torch.no_grad():
            step_BV = model(tokens_BT[:, t:t + 1], input_pos_T=position_B1).logits[:, -1]
        assert (step_BV - expected_BTV[:, t]).abs().max() <= TOLERANCE, f"decode step at position {t}"
    next_B, _ = decode_one_token(model, tokens_BT[:, -1:], torch.full((2, 1), tokens_BT.shape[1] - 1), GREEDY)
    with torch.no_grad():
        assert torch.equal(next_B, expected_BTV[:, -1].argmax(-1))
    assert cfg.router == "topk" and hf_model.config.architectures[0] in FAMILIES


def test_imported_folder_generates_with_its_tokenizer(mixtral_saved: tuple[str, PreTrainedModel, Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, _, per_expert, _ = mixtral_saved
    source = tmp_path / "source"
    shutil.copytree(per_expert, source)
    train_tokenizer(["the cat sat on the mat", "def f(x): return x + 1"] * 20, vocab_size=VOCAB).save(str(source / "tokenizer.json"))
    assert main(["import", str(source), str(tmp_path / "out")]) == 0
    assert "tokenizer.json copied" in capsys.readouterr().out
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert main(["generate", str(tmp_path / "out"), "--prompt", "the cat", "--max-new-tokens", "4", "--temperature", "0",
                 "--device", "cpu"]) == 0
    (tmp_path / "held_out.txt").write_text("the cat sat on the mat. " * 20)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--data", str(tmp_path / "held_out.txt"), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["mean_k"] == 2.0


# Errors: every one a single line naming what is wrong.

def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error of a failing command."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynamoe: error: ") and "\n" not in err
    return err


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def mixtral_copy(mixtral_saved: tuple[str, PreTrainedModel, Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """Writable copies of a Mixtral checkpoint: (per-expert, fused sharded)."""
    _, _, per_expert, fused = mixtral_saved
    return Path(shutil.copytree(per_expert, tmp_path / "per_expert")), Path(shutil.copytree(fused, tmp_path / "fused"))


def test_unsupported_architecture(mixtral_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = mixtral_copy
    edit_config(folder, architectures=["LlamaForCausalLM"], model_type="llama")
    err = error_of(["import", str(folder), str(folder.parent / "out")], capsys)
    assert "unsupported architecture LlamaForCausalLM" in err and "MixtralForCausalLM" in err


def test_missing_shard(mixtral_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, folder = mixtral_copy
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert f"shard {shard.name} listed in" in error_of(["import", str(folder), str(folder.parent / "out")], capsys)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_names_are_confined_to_the_checkpoint_folder(where: str, mixtral_copy: tuple[Path, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _, folder = mixtral_copy
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = folder.parent / "elsewhere.safetensors"  # a readable tensor file the index must not lead to
    shutil.move(folder / shard, outside)
    name = "../elsewhere.safetensors" if where == "parent" else str(outside)
    index["weight_map"] = {key: name if value == shard else value for key, value in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    err = error_of(["import", str(folder), str(folder.parent / "out")], capsys)
    assert f"names shard {name!r} outside {folder}" in err
    assert not (folder.parent / "out").exists()


def test_mismatched_shapes(mixtral_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = mixtral_copy
    edit_config(folder, intermediate_size=40)
    err = error_of(["import", str(folder), str(folder.parent / "out")], capsys)
    assert "weight model.layers.0.block_sparse_moe.experts.0.w1.weight has shape [32, 64]" in err and "[40, 64]" in err


def test_config_without_moe_fields(mixtral_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = mixtral_copy
    edit_config(folder, num_local_experts=None)
    assert "config.json has no num_local_experts" in error_of(["import", str(folder), str(folder.parent / "out")], capsys)


def test_weights_the_config_does_not_explain(mixtral_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = mixtral_copy
    edit_config(folder, num_hidden_layers=1)  # the second block's weights are left over
    err = error_of(["import", str(folder), str(folder.parent / "out")], capsys)
    assert "weight model.layers.1." in err and "has no place in a MixtralForCausalLM" in err


def test_pickled_weights_are_refused(mixtral_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = mixtral_copy
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    err = error_of(["import", str(folder), str(folder.parent / "out")], capsys)
    assert "has no model.safetensors" in err and "pytorch_model.bin is a pickle" in err


def test_output_folder_must_be_new(mixtral_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = mixtral_copy
    out = folder.parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty" in error_of(["import", str(folder), str(out)], capsys)
    assert main(["import", str(folder), str(out), "--force"]) == 0


def test_sliding_window_caps_the_context(mixtral_copy: tuple[Path, Path]) -> None:
    folder, _ = mixtral_copy
    edit_config(folder, sliding_window=16)  # within 16 tokens, sliding-window attention is full attention
    model, cfg = load_hf(folder)
    assert cfg.max_seq_len == 16
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_scaled_rope_is_refused(mixtral_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = mixtral_copy
    edit_config(folder, rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0})
    assert "RoPE type yarn is not supported" in error_of(["import", str(folder), str(folder.parent / "out")], capsys)


def test_load_hf_leaves_the_global_rng_alone(mixtral_copy: tuple[Path, Path]) -> None:
    folder, _ = mixtral_copy
    torch.manual_seed(5)
    load_hf(folder)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))



def test_config_fields_for_imports_keep_old_configs_loading_and_are_validated() -> None:
    from dynamoe.config import ModelConfig, tiny
    from dynamoe.errors import DynamoeError

    old = {k: v for k, v in tiny().to_dict().items()
           if k not in ("attn_head_dim", "qkv_bias", "out_bias", "qk_norm", "clip_qkv", "dense_layers", "shared_expert_dim",
                        "renormalize_topk")}
    assert ModelConfig.from_dict(old) == tiny()  # a config.json written before these fields existed
    for bad, message in ((dict(dense_layers=[2]), "dense_layers"), (dict(qk_norm="layer"), "qk_norm"),
                         (dict(clip_qkv=0.0), "clip_qkv"), (dict(shared_expert_dim=-1), "shared_expert_dim"),
                         (dict(dim=60, n_heads=8), "set attn_head_dim")):
        with pytest.raises(DynamoeError, match=message):
            tiny(**bad)
    assert tiny(dim=60, n_heads=4, attn_head_dim=16).head_dim == 16


def test_an_imported_checkpoint_benches_beside_its_corpus(tiny_corpus: Path, tmp_path: Path) -> None:
    """A Hugging Face model sharing a corpus's tokenizer imports into a folder `dynamoe bench` accepts."""
    torch.manual_seed(0)
    config = MixtralConfig(**{**COMMON, "vocab_size": 512}, num_hidden_layers=1, intermediate_size=32, num_local_experts=4,
                           num_experts_per_tok=2)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "hf")
    shutil.copyfile(tiny_corpus / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    assert main(["bench", str(tmp_path / "imported"), "--corpus", str(tiny_corpus), "--out", str(tmp_path / "bench"),
                 "--decode-tokens", "2", "--repeats", "1", "--eval-tokens", "32", "--batch-sizes", "2", "--device", "cpu",
                 "--threads", "1", "--no-progress"]) == 0
    assert (tmp_path / "bench" / "results.json").is_file()
