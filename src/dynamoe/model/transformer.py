"""Decoder-only transformer with an MoE (or dense) feed-forward layer in every block."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe.config import ModelConfig
from dynamoe.errors import DynamoeError
from dynamoe.model.layers import Attention, DenseFFN, KVCache, Projection, RMSNorm, cache_mask, rope_tables
from dynamoe.model.fused import FusedDecoder, fused_decoder
from dynamoe.model.moe import MoE
from dynamoe.model.native import NATIVE_STATE, native_isa
from dynamoe.model.packed import (InferenceWeight, PackedWeight, PanelWeight, count_packed, count_panel_experts, fresh,
                                  onednn_supports, pack)
from dynamoe.model.router import DynamicRouter, Router, Routing, TopPRouter, check_threshold

INIT_STD = 0.02

# The compute dial of one row: None routes as trained, a number is every MoE layer's threshold, a list one per layer.
Dial = Union[float, Sequence[float], None]


@dataclass
class ModelOutput:
    """Logits plus, when targets are given, the losses; one Routing per MoE layer."""

    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # lm_loss + aux_loss: what training minimises
    lm_loss: torch.Tensor | None = None  # mean next-token cross-entropy
    aux_loss: torch.Tensor | None = None  # sum of the routers' auxiliary losses
    routings: list[Routing] = field(default_factory=list)
    experts_BT: torch.Tensor | None = None  # mean experts per token over the MoE layers, where the step counted them


class Block(nn.Module):
    """Pre-norm attention then pre-norm feed-forward, each on a residual."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        sparse = cfg.ffn == "moe" and index not in cfg.dense_layers
        self.ffn: MoE | DenseFFN = MoE(cfg) if sparse else DenseFFN(cfg.dim, cfg.dense_hidden)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos_BT: torch.Tensor | None,
                cache_mask_B1TS: torch.Tensor | None, cache_rows: slice | None = None,
                threshold_B: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing | None]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, input_pos_BT, cache_mask_B1TS, cache_rows)
        if isinstance(self.ffn, MoE):
            y_BTD, routing = self.ffn(self.ffn_norm(x_BTD), threshold_B)
            return x_BTD + y_BTD, routing
        return x_BTD + self.ffn(self.ffn_norm(x_BTD)), None


class Transformer(nn.Module):
    """The language model: embeddings, blocks, final norm, output head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, index) for index in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied embeddings reuse the (V, D) embedding as the head; untied, the head is input-major (fast decoding).
        self.output = None if cfg.tie_embeddings else Projection(cfg.dim, cfg.vocab_size)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.compiled_decode: Callable[..., ModelOutput] | None = None  # see compile_decode
        self.tied_head_packed: InferenceWeight | None = None  # see pack_weights
        self.int8_weights = False  # see pack_weights
        self.fused: FusedDecoder | None = None  # every block's decode step in native calls; see pack_weights
        if cfg.layer_thresholds is not None:
            self.set_trained_thresholds(cfg.layer_thresholds)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: normal(0.02), residual outputs scaled down by depth."""
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(".bias"):
                nn.init.zeros_(param)
            elif name.endswith(("wo.weight", "w_down")):  # residual outputs (shared expert included)
                nn.init.normal_(param, std=residual_std)
            else:
                nn.init.normal_(param, std=INIT_STD)
        for router in self.routers():
            if isinstance(router, DynamicRouter):
                router.reset_temperature_head()

    def routers(self) -> list[Router]:
        """The router of every MoE layer, in depth order."""
        return [block.ffn.router for block in self.layers if isinstance(block.ffn, MoE)]

    def threshold_routers(self) -> list[TopPRouter]:
        """The routers a routing threshold applies to (topp, dynamic); empty for topk, relu and dense models."""
        return [router for router in self.routers() if isinstance(router, TopPRouter)]

    @property
    def dialable(self) -> bool:
        """Whether this model's compute can be dialled: its routers route by a probability-mass threshold."""
        return bool(self.threshold_routers())

    def trained_thresholds(self) -> list[float]:
        """The routing threshold of each MoE layer as trained (or calibrated); empty for a model without a dial."""
        return [router.threshold for router in self.threshold_routers()]

    def set_trained_thresholds(self, per_layer: list[float]) -> None:
        """Make these per-layer thresholds the model's trained routing (retrofit's calibration); saved with it."""
        per_layer = self.layer_thresholds(per_layer)
        self.config = dataclasses.replace(self.config, layer_thresholds=per_layer)
        for router, value in zip(self.threshold_routers(), per_layer):
            router.threshold = value

    def layer_thresholds(self, dial: Dial) -> list[float]:
        """The threshold of every MoE layer at this dial setting: the trained ones for None, a number for every
        layer, or a list with one per layer; DynamoeError for a model without a dial or a value out of range."""
        if dial is None:
            return self.trained_thresholds()
        if not self.dialable:
            kind = f"the {self.config.router} router" if self.routers() else "a dense feed-forward"
            raise DynamoeError(f"the routing threshold only applies to the topp and dynamic routers, but this model "
                               f"has {kind}; its compute cannot be dialled")
        n_layers = len(self.threshold_routers())
        per_layer = list(dial) if isinstance(dial, (list, tuple)) else [dial] * n_layers
        if len(per_layer) != n_layers:
            raise DynamoeError(f"got {len(per_layer)} routing thresholds for {n_layers} MoE layers")
        for value in per_layer:
            check_threshold(value)
        return [float(value) for value in per_layer]

    def routing_thresholds(self, dials: Sequence[Dial]) -> torch.Tensor | None:
        """(B, L) thresholds for rows at these dial settings (None: as trained), the forward pass's `thresholds_BL`;
        None when every row routes as trained, which is also the fastest path."""
        if all(dial is None for dial in dials):
            return None
        rows = [self.layer_thresholds(dial) for dial in dials]
        return torch.tensor(rows, dtype=torch.float64, device=self.tok_embeddings.weight.device)

    def setup_caches(self, batch_size: int, max_len: int) -> None:
        """Preallocate KV caches for incremental decoding."""
        cfg = self.config
        if self.compiled_decode is not None:  # one cache length for every request: no recompilation per length
            max_len = cfg.max_seq_len
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        for block in self.layers:
            block.attn.kv_cache = KVCache(batch_size, max_len, cfg.kv_heads, cfg.head_dim, dtype, device)

    def compile_decode(self) -> None:
        """Decode steps through torch.compile: per layer, attention, norms and router fuse into one compiled graph.

        The MoE dispatch stays eager (a graph break): how many experts run is data-dependent and read on
        the host once per layer, which a static graph cannot express without running every expert.
        Prefill and training keep the eager forward.
        """
        for block in self.layers:
            if isinstance(block.ffn, MoE):
                block.ffn.dispatcher = torch.compiler.disable(block.ffn.dispatcher)
        for module in self.modules():  # compiled graphs read the plain weights (see pack_weights)
            if hasattr(module, "packed"):
                module.packed = None
        self.tied_head_packed = None
        self.fused = None
        self.compiled_decode = torch.compile(self.forward, dynamic=False)

    def pack_weights(self, int8: bool = False) -> None:
        """Inference on CPU: keep packed copies of the weight matrices, which decode 1.5-3x faster.

        fp32 weights go into the native kernel's panels (dynamoe.model.native) where it is available, else
        the large matrices into oneDNN's layout. The copies double the memory of those weights. They are
        used only while no gradient is wanted and the weights are unchanged (dynamoe.model.packed); a no-op
        off CPU, without either kernel, or once compile_decode has run (inductor cannot lower oneDNN's
        opaque tensors).

        int8: weight-only quantization of every matrix but the router gates (which decide the experts):
        each output column rounded to 127 levels of its largest magnitude, written back into the weights
        themselves (so every path, prefill and evaluation included, computes the same int8 model), and
        decoded from int8 panels, a quarter of fp32's bytes, where the native kernel is available.
        """
        if int8:
            self.int8_weights = True
        if self.compiled_decode is not None:
            return
        gates = {id(router.gate) for router in self.routers()}
        for module in self.modules():
            if module is not self and hasattr(module, "pack_weights"):
                module.pack_weights(int8=int8 and id(module) not in gates)
        if self.output is None:
            self.tied_head_packed = pack(self.tok_embeddings.weight, input_major=False, int8=int8)
        head = self.tied_head_packed if self.output is None else self.output.packed
        self.fused = fused_decoder(self.layers, self.norm, head, self.tok_embeddings.weight)

    def kernel_summary(self) -> str:
        """Which kernels decoding runs on: weight dtype, device, native, packed or plain matmuls, compiled or not."""
        weight = self.tok_embeddings.weight
        dtype = str(weight.dtype).removeprefix("torch.")
        if weight.device.type != "cpu":
            matmuls = "torch matmuls"
        elif (panels := count_packed(self, PanelWeight)) + (stacks := count_panel_experts(self)):
            matmuls = f"native kernel, {native_isa()} ({panels} matrices, {stacks} expert stacks)"
            if self.fused is not None:
                matmuls += f"; {self.fused.summary()}"
        elif (packed := count_packed(self, PackedWeight)):
            matmuls = f"oneDNN-packed matmuls ({packed} matrices)"
        elif not onednn_supports(weight.dtype):
            matmuls = f"plain torch matmuls (oneDNN cannot pack {dtype} on this CPU or build)"
        else:
            matmuls = "plain torch matmuls (not packed)"
        if NATIVE_STATE.get("available") is False and weight.dtype == torch.float32:
            matmuls += "; native kernel unavailable"
        int8 = " with int8 weights" if self.int8_weights else ""
        compiled = ", torch.compile" if self.compiled_decode is not None else ""
        capability = f", CPU {torch.backends.cpu.get_cpu_capability()}" if weight.device.type == "cpu" else ""
        return f"{dtype}{int8} on {weight.device}: {matmuls}{compiled}{capability}"

    def grow_caches(self, max_len: int) -> None:
        """Lengthen the KV caches to max_len positions, keeping what they hold (a running batch needs more room)."""
        for block in self.layers:
            assert block.attn.kv_cache is not None
            block.attn.kv_cache.grow(max_len)

    def move_cache_row(self, source: int, target: int) -> None:
        """Copy one row of every KV cache onto another (a running batch closing the gap a finished row left)."""
        for block in self.layers:
            assert block.attn.kv_cache is not None
            block.attn.kv_cache.move_row(source, target)

    def cache_length(self) -> int:
        """Positions the KV caches hold (0 without caches)."""
        cache = self.layers[0].attn.kv_cache
        return 0 if cache is None else cache.k_BHSd.shape[2]

    def clear_caches(self) -> None:
        """Drop KV caches (full-sequence forward passes again)."""
        for block in self.layers:
            block.attn.kv_cache = None

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, input_pos_T: torch.Tensor | None = None,
                thresholds_BL: torch.Tensor | None = None, cache_rows: slice | None = None) -> ModelOutput:
        """input_pos_T: positions of this call's tokens, (T,) shared by every row or (B, T) one row each.
        thresholds_BL: each row's routing threshold per MoE layer (see routing_thresholds); None routes as trained.
        cache_rows: the rows of the KV cache this call's rows are (default: the first B)."""
        B, T = idx_BT.shape
        if input_pos_T is not None and B == T == 1 and cache_rows in (None, slice(0, 1)) and self.fused_step_ready():
            return self.fused_step(idx_BT, input_pos_T, thresholds_BL)
        input_pos_BT, cache_mask_B1TS = None, None
        # RoPE tables at this call's positions, with a unit axis that broadcasts over the heads of (B, T, H, d).
        if input_pos_T is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]  # (T, 1, d)
        else:
            # Rows at their own positions let prompts of different lengths decode as one batch.
            input_pos_BT = input_pos_T.expand(B, T)
            cos, sin = self.rope_cos[input_pos_BT][:, :, None], self.rope_sin[input_pos_BT][:, :, None]  # (B, T, 1, d)
            cache = self.layers[0].attn.kv_cache
            if cache is not None:  # one mask for every layer: they share the cache length and positions
                cache_mask_B1TS = cache_mask(input_pos_BT, cache.k_BHSd.shape[2])
        # One (B,) column of thresholds per MoE layer, in depth order.
        layer_thresholds = iter(thresholds_BL.unbind(1)) if thresholds_BL is not None else None
        x_BTD = self.tok_embeddings(idx_BT)
        routings: list[Routing] = []
        for block in self.layers:
            threshold_B = next(layer_thresholds) if layer_thresholds is not None and isinstance(block.ffn, MoE) else None
            x_BTD, routing = block(x_BTD, cos, sin, input_pos_BT, cache_mask_B1TS, cache_rows, threshold_B)
            if routing is not None:
                routings.append(routing)
        logits_BTV = self.head(self.norm(x_BTD))
        if targets_BT is None:
            return ModelOutput(logits_BTV, routings=routings)
        lm_loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=-100)
        aux_loss = sum((r.aux_loss for r in routings), torch.zeros((), device=idx_BT.device))
        return ModelOutput(logits_BTV, lm_loss + aux_loss, lm_loss, aux_loss, routings)

    def fused_step_ready(self) -> bool:
        """Whether a decode step of one token can run fused (dynamoe.model.fused): every block packed for it and ready,
        and no gradient wanted."""
        return self.fused is not None and not torch.is_grad_enabled() and self.fused.ready()

    def fused_step(self, idx_11: torch.Tensor, input_pos_11: torch.Tensor,
                   thresholds_1L: torch.Tensor | None = None) -> ModelOutput:
        """forward for one token of a batch of one in native calls (dynamoe.model.fused: one for the whole step where
        the kernel implements every block)."""
        assert self.fused is not None
        thresholds_L = None if thresholds_1L is None else thresholds_1L[0].tolist()
        logits_1V, routings, experts_11 = self.fused(idx_11[0], input_pos_11, self.rope_cos, self.rope_sin, thresholds_L)
        return ModelOutput(logits_1V[None], routings=routings, experts_BT=experts_11)

    def head(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states."""
        if self.output is not None:
            return self.output(x_BTD)
        packed = fresh(self.tied_head_packed, self.tok_embeddings.weight)
        return F.linear(x_BTD, self.tok_embeddings.weight) if packed is None else packed.matmul(x_BTD)

    def update_controllers(self, mean_k_per_layer: Sequence[float] | torch.Tensor, applied: torch.Tensor | bool = True
                           ) -> None:
        """One controller step per MoE layer, from that layer's measured mean experts/token (or the model's, for a
        router with a global budget); none where `applied` is false. A tensor on the model's device syncs nothing."""
        mean_k_L = torch.as_tensor(mean_k_per_layer, dtype=torch.float32)
        model_mean_k = mean_k_L.mean()
        for router, mean_k in zip(self.routers(), mean_k_L):
            router.update_controller(model_mean_k if router.follows_model_mean else mean_k, applied)

    def num_params(self) -> int:
        """All parameters (tied weights once)."""
        return sum(p.numel() for p in self.parameters())

