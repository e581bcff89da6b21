"""Batch-1 decoding of a block in two native calls: attention, then router and experts.

Through the modules, one decode step is some thirty small torch ops per block (norms, RoPE, the cache
write, the router's softmax and selection, ...), each paying a fixed cost per call that adds up to about
as much as streaming the weights. The native kernel (dynamoe.model.native) runs each half of a block
as one op on the block's packed weights:

    x = x + wo(attention(rms_norm(x)))          # attention_decode: RoPE, cache write, grouped-query heads
    x = x + experts(rms_norm(x), router(...))   # moe_decode: gate, top-k or threshold selection, experts
    logits = head(rms_norm(x))                  # linear with a norm weight, after the last block

computing what Block.forward computes for one token of a batch of one (tests hold the two within 1e-4).
A block is fused only where the kernel implements all of it: attention without QK-norm, an MoE whose
router is top-k, top-p or dynamic, without a shared expert, on the local dispatcher, every weight in the
native kernel's panels (Transformer.pack_weights). Anything else decodes through the modules.

A `FusedBlock` keeps references to the block's tensors, taken when the model is packed: reading them
through the modules costs more per step than the two calls themselves. It is used only while every one
of them is unchanged (the same rule as the packed weights: no in-place write, no new storage), no
gradient is wanted, and its router has no hooks (they need the router's own forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from dynamoe.model.dispatch import LocalDispatcher
from dynamoe.model.layers import RMSNorm
from dynamoe.model.moe import MoE
from dynamoe.model.packed import InferenceWeight, PanelWeight, stamp
from dynamoe.model.router import DynamicRouter, Routing, TopKRouter, TopPRouter

if TYPE_CHECKING:
    from dynamoe.model.transformer import Block

FUSED_ROUTERS = (TopKRouter, TopPRouter, DynamicRouter)  # exactly these classes: a subclass may route otherwise


def fusable(block: Block) -> bool:
    """Whether the native kernel implements this packed block's decode step."""
    attn, moe = block.attn, block.ffn
    return (isinstance(moe, MoE) and type(moe.router) in FUSED_ROUTERS and moe.shared_expert is None
            and type(moe.dispatcher) is LocalDispatcher and attn.q_norm is None and moe.experts.panels is not None
            and all(isinstance(projection.packed, PanelWeight) for projection in (attn.wqkv, attn.wo, moe.router.gate)))


class FusedBlock:
    """One block's decode step in two native calls, on references to its tensors taken at packing."""

    def __init__(self, block: Block) -> None:
        attn, moe = block.attn, block.ffn
        assert isinstance(moe, MoE) and fusable(block) and moe.experts.panels is not None
        router, experts = moe.router, moe.experts.panels
        wqkv, wo, gate = self.packed = [cast(PanelWeight, p.packed) for p in (attn.wqkv, attn.wo, router.gate)]
        self.attention, self.router, self.experts = attn, router, experts
        self.attention_args = (block.attn_norm.weight, block.attn_norm.eps, wqkv.panels, wqkv.scale, attn.wqkv.bias,
                               wo.panels, wo.scale, attn.wo.bias)
        self.attention_settings = (attn.n_heads, attn.clip_qkv)
        threshold = isinstance(router, TopPRouter)
        dynamic = router if isinstance(router, DynamicRouter) else None
        # Everything moe_decode reads but the compute dial (see dial), in its order.
        self.moe_args = (
            block.ffn_norm.weight, block.ffn_norm.eps, gate.panels, router.n_experts,
            router.k_max if threshold else router.top_k, router.k_min, router.renormalize, threshold and router.static_weights,
            None if dynamic is None else dynamic.temperature_head.weight, None if dynamic is None else dynamic.temperature_head.bias,
            1.0 if dynamic is None else dynamic.temperature_input_scale, 0.0 if dynamic is None else dynamic.temperature_min,
            0.0 if dynamic is None else dynamic.temperature_max,
            experts.gate_up, experts.gate_up_scale, experts.down, experts.down_scale)
        self.tensors = [t for t in (*self.attention_args, *self.moe_args) if isinstance(t, nn.Parameter)]
        self.stamps = [stamp(t) for t in self.tensors]
        self.no_aux_loss = torch.zeros(())  # decoding computes no auxiliary loss

    def ready(self) -> bool:
        """Whether the step may run fused now: a KV cache of one row, every tensor unchanged, no router hooks (see the
        module)."""
        cache = self.attention.kv_cache
        return (cache is not None and cache.k_BHSd.shape[0] == 1 and self.experts.unchanged()
                and all(packed.unchanged() for packed in self.packed)
                and all(stamp(t) == s for t, s in zip(self.tensors, self.stamps))
                and not self.router._forward_hooks and not self.router._forward_pre_hooks)

    def dial(self, threshold: float | None) -> tuple[float, float]:
        """The compute dial of this step: the threshold asked for, else the router's trained one (0: top-k), and the
        router's temperature scale."""
        router = self.router
        if not isinstance(router, TopPRouter):
            threshold = 0.0
        elif threshold is None:
            threshold = router.threshold
        return threshold, getattr(router, "temperature_scale", 1.0)

    def __call__(self, x_1D: torch.Tensor, position: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 threshold: float | None = None) -> tuple[torch.Tensor, Routing]:
        """Block.forward for one token of a batch of one, at `position` of its KV cache, at a routing threshold
        (None: as trained)."""
        cache = self.attention.kv_cache
        assert cache is not None  # see ready
        x_1D = torch.ops.dynamoe.attention_decode(x_1D, *self.attention_args, cache.k_BHSd, cache.v_BHSd, position, cos,
                                                  sin, *self.attention_settings)
        x_1D, experts_1K, weights_1K, k_1 = torch.ops.dynamoe.moe_decode(x_1D, *self.moe_args, *self.dial(threshold))
        return x_1D, Routing(experts_1K, weights_1K, k_1, self.no_aux_loss)


class FusedDecoder:
    """Every block of a packed model as a FusedBlock, then the final norm and the output head in one call: a decode
    step of one token in two native calls per block and one more."""

    def __init__(self, layers: Sequence[Block], norm: RMSNorm, head: PanelWeight) -> None:
        self.blocks = [FusedBlock(block) for block in layers]
        self.norm, self.head = (norm.weight, norm.eps), head
        self.norm_stamp = stamp(norm.weight)

    def __deepcopy__(self, memo: dict) -> None:
        return None  # as the packed weights it reads: a copied model starts unpacked

    def ready(self) -> bool:
        """Whether every block may run fused now (see FusedBlock.ready), the head and final norm unchanged."""
        return (all(block.ready() for block in self.blocks) and self.head.unchanged()
                and stamp(self.norm[0]) == self.norm_stamp)

    def __call__(self, x_1D: torch.Tensor, position: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 thresholds_L: Sequence[float] | None = None) -> tuple[torch.Tensor, list[Routing]]:
        """The blocks in turn on one token (embedded) at `position`, each at its layer's routing threshold (None: as
        trained); its logits (1, V) and each block's routing."""
        routings = []
        for index, block in enumerate(self.blocks):
            x_1D, routing = block(x_1D, position, cos, sin, None if thresholds_L is None else thresholds_L[index])
            routings.append(routing)
        head = self.head
        return torch.ops.dynamoe.linear(x_1D, head.panels, head.scale, None, None, head.out_features, *self.norm), routings


def fused_decoder(layers: Sequence[Block], norm: RMSNorm, head: InferenceWeight | None) -> FusedDecoder | None:
    """The fused decoder of a packed model, or None unless the kernel implements every block (see fusable) and holds
    the output head."""
    if not isinstance(head, PanelWeight) or not all(fusable(block) for block in layers):
        return None
    return FusedDecoder(layers, norm, head)
