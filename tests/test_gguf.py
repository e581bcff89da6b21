"""GGUF export: written, read back and compared tensor by tensor; llama.cpp's RoPE order and metadata; Q8_0 within
its rounding; dynamic models only as static top-K; and, where llama-cpp-python is installed, llama.cpp's logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dynamoe.checkpoint import save_model
from dynamoe.cli import main
from dynamoe.config import tiny
from dynamoe.data import load_tokenizer
from dynamoe.errors import DynamoeError
from dynamoe.hf.exporter import static_topk
from dynamoe.model import Transformer
from dynamoe.model.layers import apply_rope, rope_tables

gguf = pytest.importorskip("gguf")
from dynamoe.gguf_export import adjacent_pair_rows, export_gguf, gguf_tensors  # noqa: E402  (needs gguf)


def save_tiny(folder: Path, tokenizer: Path, **overrides) -> Transformer:
    """A random checkpoint with the tiny corpus's tokenizer and a vocabulary a little larger than it (padding)."""
    vocab_size = load_tokenizer(tokenizer).get_vocab_size() + 16
    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=vocab_size, n_kv_heads=2, **overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    save_model(folder, model, tokenizer)
    return model


def read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, gguf.ReaderTensor], gguf.GGUFReader]:
    """Every tensor of a GGUF file as float32 (dequantized), the raw tensors, and the reader (metadata)."""
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    arrays = {name: gguf.quants.dequantize(t.data, t.tensor_type) for name, t in tensors.items()}
    return arrays, tensors, reader


def field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.get_field(key).contents()


def test_an_f32_export_reads_back_tensor_for_tensor_with_llama_metadata(tiny_corpus: Path, tmp_path: Path) -> None:
    model = save_tiny(tmp_path / "ckpt", tiny_corpus / "tokenizer.json", router="topk", top_k=2)
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "model.gguf"), "--format", "gguf"]) == 0
    arrays, tensors, reader = read(tmp_path / "model.gguf")
    expected, cfg = gguf_tensors(model), model.config
    assert set(arrays) == set(expected) and len(arrays) == 3 + 10 * model.config.n_layers
    for name, array in expected.items():
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(arrays[name].reshape(array.shape), array, err_msg=name)
    down = arrays["blk.1.ffn_down_exps.weight"].reshape(cfg.n_experts, cfg.dim, cfg.expert_dim)
    np.testing.assert_array_equal(down[3], model.layers[1].ffn.experts.w_down[3].t().detach().numpy())
    assert field(reader, "general.architecture") == "llama"
    assert (field(reader, "llama.expert_count"), field(reader, "llama.expert_used_count")) == (cfg.n_experts, 2)
    assert (field(reader, "llama.attention.head_count"), field(reader, "llama.attention.head_count_kv")) == (4, 2)
    assert field(reader, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    tokenizer = load_tokenizer(tiny_corpus / "tokenizer.json")
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[:tokenizer.get_vocab_size()] == [
        tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "smollm"
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.token_to_id("<|endoftext|>")
    assert len(field(reader, "tokenizer.ggml.merges")) > 0


def test_reordered_query_and_key_rows_rotate_as_llama_cpp_does() -> None:
    heads, head_dim, dim, position = 3, 8, 16, 5
    w_OD, x_D = torch.randn(heads * head_dim, dim), torch.randn(dim)
    cos, sin = rope_tables(position + 1, head_dim, 10000.0)
    ours_Hd = apply_rope((w_OD @ x_D).view(1, 1, heads, head_dim), cos[position], sin[position]).view(heads, head_dim)
    # llama.cpp's `llama` RoPE: adjacent values (2i, 2i+1) rotate together by the angle of frequency i.
    theirs_Hd = (adjacent_pair_rows(w_OD, heads) @ x_D).view(heads, head_dim // 2, 2)
    angle = position * 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim)
    even, odd = theirs_Hd[..., 0], theirs_Hd[..., 1]
    rotated_Hd = torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], dim=-1)
    # Same rotated values, in llama.cpp's order: the attention scores (dot products of queries and keys) are equal.
    torch.testing.assert_close(rotated_Hd.view(heads, head_dim), adjacent_pair_rows(ours_Hd.reshape(-1, 1), heads).view(heads, head_dim))


def test_q8_0_quantizes_matrices_within_half_a_step_and_keeps_gates_and_norms_f32(tiny_corpus: Path, tmp_path: Path) -> None:
    model = save_tiny(tmp_path / "ckpt", tiny_corpus / "tokenizer.json", router="topk", top_k=2)
    export_gguf(tmp_path / "ckpt", tmp_path / "q8.gguf", gguf_type="q8_0")
    arrays, tensors, _ = read(tmp_path / "q8.gguf")
    for name, array in gguf_tensors(model).items():
        quantized = tensors[name].tensor_type == gguf.GGMLQuantizationType.Q8_0
        assert quantized == (array.ndim >= 2 and "ffn_gate_inp" not in name), name
        blocks = array.reshape(-1, 32) if quantized else array
        step = np.abs(blocks).max(axis=-1, keepdims=True) / 127 if quantized else 0
        # Half a step, plus the fp16 rounding of the block's scale (2^-11 relative) over up to 127 steps.
        bound = step * (0.5 + 127 * 2.0 ** -11) + 1e-7
        assert np.all(np.abs(arrays[name].reshape(blocks.shape) - blocks) <= bound), name


def test_a_dynamic_model_exports_only_as_static_topk_of_its_gate(tiny_corpus: Path, tmp_path: Path) -> None:
    dynamic = save_tiny(tmp_path / "ckpt", tiny_corpus / "tokenizer.json", router="dynamic")
    with pytest.raises(DynamoeError, match="--as-topk"):
        export_gguf(tmp_path / "ckpt", tmp_path / "dynamic.gguf")
    written = export_gguf(tmp_path / "ckpt", tmp_path / "top3.gguf", as_topk=3)
    assert written.top_k == 3 and gguf.GGUFReader(str(tmp_path / "top3.gguf")).get_field("llama.expert_used_count").contents() == 3
    static, _ = static_topk(dynamic, 3)
    h_TD = torch.randn(7, dynamic.config.dim)
    with torch.no_grad():  # the three most probable experts under the same gate, weights renormalised over them
        routing = static.layers[0].ffn.router(h_TD)
        top_TK = dynamic.layers[0].ffn.router.gate(h_TD).topk(3).indices
    assert torch.equal(routing.experts_TK, top_TK) and torch.equal(routing.k_T, torch.full((7,), 3))
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(7))
    with pytest.raises(DynamoeError, match="relu"):
        static_topk(Transformer(tiny(router="relu")), 2)


def test_as_topk_of_a_topk_model_at_its_own_k_is_the_same_model() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny(router="topk", top_k=2)).eval()
    static, _ = static_topk(model, 2)
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(static(idx).logits, model(idx).logits, rtol=0, atol=0)


def test_what_llama_cpp_cannot_run_is_refused_with_one_line(tiny_corpus: Path, tmp_path: Path, capsys) -> None:
    save_tiny(tmp_path / "biased", tiny_corpus / "tokenizer.json", router="topk", qkv_bias=True)
    assert main(["export", str(tmp_path / "biased"), str(tmp_path / "b.gguf"), "--format", "gguf"]) == 2
    assert "llama.cpp's Mixtral layout" in capsys.readouterr().err
    save_tiny(tmp_path / "plain", tiny_corpus / "tokenizer.json", router="topk")
    (tmp_path / "taken.gguf").write_text("something")
    assert main(["export", str(tmp_path / "plain"), str(tmp_path / "taken.gguf"), "--format", "gguf"]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "taken.gguf").read_text() == "something"
    (tmp_path / "plain" / "tokenizer.json").unlink()
    assert main(["export", str(tmp_path / "plain"), str(tmp_path / "t.gguf"), "--format", "gguf"]) == 2
    assert "tokenizer" in capsys.readouterr().err and not (tmp_path / "t.gguf").exists()


def test_llama_cpp_computes_the_same_logits_from_the_export(tiny_corpus: Path, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    model = save_tiny(tmp_path / "ckpt", tiny_corpus / "tokenizer.json", router="topk", top_k=2)
    export_gguf(tmp_path / "ckpt", tmp_path / "model.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), n_ctx=32, logits_all=True, verbose=False, n_threads=1)
    tokens = [5, 17, 200, 33, 9, 71]
    llm.eval(tokens)
    theirs = torch.tensor(np.asarray(llm.scores[:len(tokens)]))
    with torch.no_grad():
        ours = model(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3)
