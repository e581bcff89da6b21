"""Export a static top-k checkpoint as a GGUF file that llama.cpp runs (its Mixtral layout: architecture `llama`
with experts), tokenizer included, in f32 or Q8_0.

How the weights map (numpy shapes; GGUF lists them reversed):

    token_embd [V, D]   output [V, D] (absent when tied)   output_norm [D]
    blk.i.attn_norm [D]   blk.i.attn_q [H*d, D]   blk.i.attn_k / attn_v [Hkv*d, D]   blk.i.attn_output [D, H*d]
    blk.i.ffn_norm [D]   blk.i.ffn_gate_inp [E, D]   blk.i.ffn_gate_exps / ffn_up_exps [E, F, D]   blk.i.ffn_down_exps [E, D, F]

dynamoe (like transformers) rotates each head's first half against its second half; llama.cpp's `llama`
architecture rotates adjacent pairs. So the rows of each query and key head are reordered (row i of the
first half, then row i of the second half, for every i): the same rotation in llama.cpp's order.

The tokenizer must be a byte-level BPE (dynamoe's own, or GPT-2's): its vocabulary (padded with unused
entries up to the model's vocabulary), merges and special tokens go in as `tokenizer.ggml.*`. llama.cpp
pre-splits text by a named rule rather than by tokenizer.json's pre-tokenizer, so ours is mapped
explicitly: digits one by one, then GPT-2's regex, no clean-up of spaces is llama.cpp's `smollm` rule;
GPT-2's alone is `gpt-2`. Any other pre-tokenizer is refused rather than silently tokenized differently.

Q8_0 quantizes every matrix but the router gates (which decide the experts) in blocks of 32 with one
fp16 scale, as llama.cpp's own converter does; vectors (norms), and matrices whose rows are not whole
blocks, stay f32.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch

from dynamoe.checkpoint import load_model, resolve_checkpoint
from dynamoe.config import ModelConfig
from dynamoe.data.tokenizer import TOKENIZER_FILE, eos_id, load_tokenizer
from dynamoe.errors import DynamoeError
from dynamoe.hf.exporter import fits, static_topk
from dynamoe.hf.families import MIXTRAL
from dynamoe.model import Transformer

GGUFType = Literal["f32", "q8_0"]
ARCHITECTURE = "llama"  # llama.cpp runs Mixtral as `llama` with experts
Q8_0_BLOCK = 32  # values per Q8_0 block (one fp16 scale each)
# tokenizer.json pre-tokenizers (normalised by `pre_tokenizer_signature`) and llama.cpp's rule of the same splits.
PRE_TOKENIZERS = {
    (("Digits", True), ("ByteLevel", True)): "smollm",  # dynamoe's: digits one by one, then GPT-2's regex
    (("ByteLevel", True),): "gpt-2",
}


@dataclass(frozen=True)
class ExportedGGUF:
    """What `export_gguf` wrote."""

    out: Path
    gguf_type: GGUFType
    top_k: int
    pre_tokenizer: str  # llama.cpp's name of the rule that splits text as the tokenizer does


def export_gguf(checkpoint: Path, out: Path, gguf_type: GGUFType = "f32", as_topk: int | None = None,
                force: bool = False) -> ExportedGGUF:
    """Write a static top-k checkpoint (or any topk/topp/dynamic one as static top-`as_topk`) as a llama.cpp GGUF file."""
    if gguf_type not in ("f32", "q8_0"):
        raise DynamoeError(f"GGUF type must be f32 or q8_0, got {gguf_type!r}")
    out = Path(out)
    if out.exists() and not force:
        raise DynamoeError(f"{out} exists; choose a new file or pass --force")
    ckpt = resolve_checkpoint(checkpoint)
    model, cfg = load_model(ckpt)
    if as_topk is not None:
        model, cfg = static_topk(model, as_topk)
    elif cfg.router != "topk":
        raise DynamoeError(f"{ckpt} uses the {cfg.router} router (a variable number of experts per token), which llama.cpp "
                           "cannot run; pass --as-topk K to export it as static top-K")
    if cfg.ffn != "moe" or not fits(MIXTRAL, cfg):
        raise DynamoeError("llama.cpp's Mixtral layout needs plain attention (no QK-norm, biases or clipping), renormalised "
                           f"top-k and MoE in every block; this model has qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias}, "
                           f"out_bias={cfg.out_bias}, clip_qkv={cfg.clip_qkv}, renormalize_topk={cfg.renormalize_topk}, "
                           f"shared_expert_dim={cfg.shared_expert_dim}, dense_layers={cfg.dense_layers}, ffn={cfg.ffn}")
    tokenizer = tokenizer_metadata(ckpt / TOKENIZER_FILE, cfg.vocab_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.ALL_F32
    writer = gguf.GGUFWriter(str(tmp), ARCHITECTURE)
    try:
        write_hyperparameters(writer, cfg, ckpt.name, file_type)
        write_tokenizer(writer, tokenizer)
        for name, array in gguf_tensors(model).items():
            if gguf_type == "q8_0" and quantizable(name, array):
                writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                                  raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportedGGUF(out, gguf_type, cfg.top_k, tokenizer["pre"])


def gguf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """Every weight under its llama.cpp name, as the float32 numpy array GGUF stores (see the module's docstring)."""
    cfg = model.config
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim

    def array(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().float().contiguous().numpy()

    tensors = {"token_embd.weight": array(model.tok_embeddings.weight), "output_norm.weight": array(model.norm.weight)}
    if model.output is not None:
        tensors["output.weight"] = array(model.output.weight.t())
    for i, block in enumerate(model.layers):
        q_DQ, k_DK, v_DK = block.attn.wqkv.weight.split([q_width, kv_width, kv_width], dim=1)
        experts = block.ffn.experts
        gate_EDF, up_EDF = experts.w_gate_up.chunk(2, dim=-1)
        tensors.update({
            f"blk.{i}.attn_norm.weight": array(block.attn_norm.weight),
            f"blk.{i}.attn_q.weight": array(adjacent_pair_rows(q_DQ.t(), cfg.n_heads)),
            f"blk.{i}.attn_k.weight": array(adjacent_pair_rows(k_DK.t(), cfg.kv_heads)),
            f"blk.{i}.attn_v.weight": array(v_DK.t()),
            f"blk.{i}.attn_output.weight": array(block.attn.wo.weight.t()),
            f"blk.{i}.ffn_norm.weight": array(block.ffn_norm.weight),
            f"blk.{i}.ffn_gate_inp.weight": array(block.ffn.router.gate.weight.t()),
            f"blk.{i}.ffn_gate_exps.weight": array(gate_EDF.transpose(1, 2)),
            f"blk.{i}.ffn_up_exps.weight": array(up_EDF.transpose(1, 2)),
            f"blk.{i}.ffn_down_exps.weight": array(experts.w_down.transpose(1, 2)),
        })
    return tensors


def quantizable(name: str, array: np.ndarray) -> bool:
    """Whether Q8_0 applies: a matrix other than a router gate, with rows of whole 32-value blocks (else it stays f32)."""
    return array.ndim >= 2 and ".ffn_gate_inp." not in name and array.shape[-1] % Q8_0_BLOCK == 0


def adjacent_pair_rows(w_OD: torch.Tensor, heads: int) -> torch.Tensor:
    """Query or key rows [heads * d, D] reordered per head from half-split RoPE pairs (i, i + d/2) to adjacent ones (2i, 2i+1)."""
    return w_OD.unflatten(0, (heads, 2, -1)).transpose(1, 2).reshape(w_OD.shape)


def tokenizer_metadata(file: Path, vocab_size: int) -> dict[str, Any]:
    """The GGUF tokenizer fields of a byte-level BPE tokenizer.json, its vocabulary padded to vocab_size entries."""
    if not file.is_file():
        raise DynamoeError(f"{file.parent} has no {TOKENIZER_FILE}: llama.cpp needs the tokenizer inside the GGUF file")
    tokenizer = load_tokenizer(file)
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not any(step == ("ByteLevel", True) for step in pre_tokenizer_signature(spec)):
        raise DynamoeError(f"{file} is not a byte-level BPE tokenizer; the GGUF export writes byte-level BPE (GPT-2 style) only")
    signature = pre_tokenizer_signature(spec)
    if signature not in PRE_TOKENIZERS:
        raise DynamoeError(f"{file}'s pre-tokenizer {signature} has no llama.cpp equivalent known to dynamoe "
                           f"(known: {', '.join(PRE_TOKENIZERS.values())})")
    vocabulary = tokenizer.get_vocab(with_added_tokens=True)
    if len(vocabulary) > vocab_size or max(vocabulary.values()) >= vocab_size:
        raise DynamoeError(f"the tokenizer has {len(vocabulary)} tokens, more than the model's vocabulary of {vocab_size}")
    tokens = [f"[UNUSED_{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    special = {added["content"] for added in spec.get("added_tokens", []) if added.get("special")}
    for token, index in vocabulary.items():
        tokens[index], types[index] = token, gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": PRE_TOKENIZERS[signature], "eos": eos_id(tokenizer)}


def pre_tokenizer_signature(spec: dict[str, Any]) -> tuple[tuple[str, bool], ...]:
    """tokenizer.json's pre-tokenizer steps as (type, option): the digits rule splits one by one, ByteLevel uses its regex."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    option = {"Digits": "individual_digits", "ByteLevel": "use_regex"}
    return tuple((step.get("type", ""), bool(step.get(option.get(step.get("type", ""), ""), True))) for step in steps)


def write_hyperparameters(writer: Any, cfg: ModelConfig, name: str, file_type: int) -> None:
    """The `llama.*` keys llama.cpp reads for a Mixtral."""
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.expert_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_expert_count(cfg.n_experts)
    writer.add_expert_used_count(cfg.top_k)


def write_tokenizer(writer: Any, tokenizer: dict[str, Any]) -> None:
    """The `tokenizer.ggml.*` keys of a byte-level BPE (llama.cpp's "gpt2" model), without a beginning-of-text token."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    writer.add_token_merges(tokenizer["merges"])
    writer.add_eos_token_id(tokenizer["eos"])
    writer.add_add_bos_token(False)
