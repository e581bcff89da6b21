"""Transformer building blocks: RMSNorm, RoPE, attention with an optional KV cache, dense SwiGLU.

Shape legend: B batch, T tokens in this call, S cached positions, H heads, D model dim, d head dim,
F feed-forward hidden dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe.config import ModelConfig
from dynamoe.model.packed import InferenceWeight, fresh, pack


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 for stability under low-precision activations."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel instead of six small ones: at batch-1 decode each call costs mostly its launch.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rope_tables(max_len: int, head_dim: int, theta: float, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables (max_len, head_dim) for the half-split layout transformers uses.

    The sin table's first half is negated, so that rotating is x * cos + roll(x, half) * sin: one
    `roll` instead of slicing, negating and concatenating (fewer kernel calls per decode step).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)


def apply_rope(x_BTHd: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate query/key features (B, T, heads, d) by their positions; the tables broadcast over the heads."""
    x = x_BTHd.float()
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin).type_as(x_BTHd)


class KVCache(nn.Module):
    """Preallocated keys and values for incremental decoding."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k_BHSd", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_BHSd", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos_BT: torch.Tensor, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor,
               rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's new positions into cache rows `rows` (default: the first B) and return those rows."""
        B = k_BHTd.shape[0]
        # A slice of rows is a view: the write lands in the cache and nothing is copied.
        k_BHSd, v_BHSd = (self.k_BHSd[:B], self.v_BHSd[:B]) if rows is None else (self.k_BHSd[rows], self.v_BHSd[rows])
        rows_B1 = torch.arange(B, device=k_BHTd.device)[:, None]
        # Rows and positions indexed together come first, so the new entries go in as (B, T, H, d).
        k_BHSd[rows_B1, :, input_pos_BT] = k_BHTd.transpose(1, 2)
        v_BHSd[rows_B1, :, input_pos_BT] = v_BHTd.transpose(1, 2)
        return k_BHSd, v_BHSd

    def grow(self, max_len: int) -> None:
        """Room for max_len positions per row, the positions held so far kept."""
        held = self.k_BHSd.shape[2]
        for name in ("k_BHSd", "v_BHSd"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], max_len, old.shape[3])
            new[:, :, :held] = old
            setattr(self, name, new)

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source` onto row `target`."""
        self.k_BHSd[target] = self.k_BHSd[source]
        self.v_BHSd[target] = self.v_BHSd[source]


class Projection(nn.Module):
    """y = x @ W with W stored input-major, (in, out).

    Batch-1 decoding is a matrix-vector product per weight, and reading W (in, out) row by row is
    about twice as fast on CPU as nn.Linear's (out, in) layout (measured: 325 us against 640 us for
    an 8192 x 256 head, one thread).
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None
        self.packed: InferenceWeight | None = None  # see pack_weights
        nn.init.normal_(self.weight, std=0.02)

    def pack_weights(self, int8: bool = False) -> None:
        """Keep a packed copy of the weight for inference (dynamoe.model.packed); int8 rounds the weight to int8 first."""
        self.packed = pack(self.weight, int8=int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = fresh(self.packed, self.weight)
        if packed is not None:
            return packed.matmul(x, self.bias)
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def cache_mask(input_pos_BT: torch.Tensor, cache_len: int) -> torch.Tensor:
    """(B, 1, T, S): a query at position p sees every cached key of its own row at position <= p."""
    return (torch.arange(cache_len, device=input_pos_BT.device) <= input_pos_BT[..., None])[:, None]


class Attention(nn.Module):
    """Causal multi-head attention (grouped-query when n_kv_heads < n_heads) through SDPA."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # Queries, keys and values from one fused projection (columns: q heads, k heads, v heads):
        # batch-1 decoding then reads one matrix per layer in one matvec instead of three.
        self.qkv_sizes = (cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)
        self.wqkv = Projection(cfg.dim, sum(self.qkv_sizes), bias=cfg.qkv_bias)
        self.wo = Projection(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)
        # Optional RMSNorm of queries and keys: over each head's features ("head", shared by the heads)
        # or over the whole query and key projections ("proj").
        q_norm_dim, k_norm_dim = {"none": (0, 0), "head": (cfg.head_dim, cfg.head_dim), "proj": self.qkv_sizes[:2]}[cfg.qk_norm]
        self.q_norm = RMSNorm(q_norm_dim, cfg.norm_eps) if q_norm_dim else None
        self.k_norm = RMSNorm(k_norm_dim, cfg.norm_eps) if k_norm_dim else None
        self.norm_per_head = cfg.qk_norm == "head"
        self.clip_qkv = cfg.clip_qkv
        self.kv_cache: KVCache | None = None

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos_BT: torch.Tensor | None = None, cache_mask_B1TS: torch.Tensor | None = None,
                cache_rows: slice | None = None) -> torch.Tensor:
        """cos and sin: RoPE tables at this call's positions, (T, 1, d) or (B, T, 1, d) (see rope_tables).
        Without input positions: causal attention over x. With them: write to and read from the KV cache
        (its rows `cache_rows`, default the first B), where cache_mask_B1TS (see cache_mask) says which
        cached positions each query sees."""
        B, T, _ = x_BTD.shape
        q_width, kv_width, _ = self.qkv_sizes
        qk, v = self.wqkv(x_BTD).split([q_width + kv_width, kv_width], dim=-1)
        qk = qk.view(B, T, self.n_heads + self.n_kv_heads, self.head_dim)  # queries then keys: rotated together
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            qk = self.normalize_qk(qk)
        if self.clip_qkv is not None:
            qk, v = qk.clamp(-self.clip_qkv, self.clip_qkv), v.clamp(-self.clip_qkv, self.clip_qkv)
        q, k = apply_rope(qk, cos, sin).transpose(1, 2).split([self.n_heads, self.n_kv_heads], dim=1)
        v = v.transpose(1, 2)
        if self.kv_cache is None or input_pos_BT is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            k, v = self.kv_cache.update(input_pos_BT, k, v, cache_rows)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache_mask_B1TS, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def normalize_qk(self, qk_BTHd: torch.Tensor) -> torch.Tensor:
        """QK-norm of the stacked query and key heads: RMSNorm per head, or over all heads of each projection at once."""
        assert self.q_norm is not None and self.k_norm is not None
        q, k = qk_BTHd.split([self.n_heads, self.n_kv_heads], dim=2)
        if self.norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        else:
            q, k = self.q_norm(q.flatten(2)).view_as(q), self.k_norm(k.flatten(2)).view_as(k)
        return torch.cat([q, k], dim=2)


PackedPair = tuple[InferenceWeight, InferenceWeight]  # a SwiGLU's packed gate-up and down projections


def swiglu(x_ND: torch.Tensor, w_gate_up_DF2: torch.Tensor, w_down_FD: torch.Tensor, packed: PackedPair | None = None,
           scale_N1: torch.Tensor | None = None, out_ND: torch.Tensor | None = None) -> torch.Tensor:
    """[out +] SwiGLU(x) [* scale], on weights stored input-major ([D, 2F] then [F, D]) for fast x @ W.

    `packed`, when given, replaces both matmuls; the scale is folded into the down projection's input
    and the sum into its call, which saves kernel calls at batch-1 decoding.
    """
    gate, up = (x_ND @ w_gate_up_DF2 if packed is None else packed[0].matmul(x_ND)).chunk(2, dim=-1)
    hidden_NF = F.silu(gate) * up
    if scale_N1 is not None:
        hidden_NF = hidden_NF * scale_N1
    if packed is not None:
        return packed[1].matmul(hidden_NF) if out_ND is None else packed[1].addmm(out_ND, hidden_NF)
    return hidden_NF @ w_down_FD if out_ND is None else torch.addmm(out_ND, hidden_NF, w_down_FD)


def pack_pair(w_gate_up_DF2: torch.Tensor, w_down_FD: torch.Tensor, source_gate_up: torch.Tensor,
              source_down: torch.Tensor, int8: bool = False) -> PackedPair | None:
    """Packed copies of a SwiGLU's two weights, or None if either is too small to gain from packing."""
    gate_up, down = pack(w_gate_up_DF2, source=source_gate_up, int8=int8), pack(w_down_FD, source=source_down, int8=int8)
    return (gate_up, down) if gate_up is not None and down is not None else None


def fresh_pair(packed: PackedPair | None, source_gate_up: torch.Tensor, source_down: torch.Tensor) -> PackedPair | None:
    """The packed pair if both copies are usable now, else None."""
    if packed is None or fresh(packed[0], source_gate_up) is None or fresh(packed[1], source_down) is None:
        return None
    return packed


class DenseFFN(nn.Module):
    """A dense SwiGLU feed-forward layer: the baseline with the active size of a top-k MoE."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(dim, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(hidden, dim))
        self.packed: PackedPair | None = None  # see pack_weights
        self.reset_parameters()

    def pack_weights(self, int8: bool = False) -> None:
        """Keep packed copies of both weights for inference (dynamoe.model.packed); int8 rounds them to int8 first."""
        self.packed = pack_pair(self.w_gate_up, self.w_down, self.w_gate_up, self.w_down, int8)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal init; Transformer.reset_parameters rescales the output projection by depth."""
        nn.init.normal_(self.w_gate_up, std=std)
        nn.init.normal_(self.w_down, std=std)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return swiglu(x_BTD, self.w_gate_up, self.w_down, fresh_pair(self.packed, self.w_gate_up, self.w_down))
