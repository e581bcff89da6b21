"""Batch-1 decoding of a block in two native calls: attention, then router and experts.

Through the modules, one decode step is some thirty small torch ops per block (norms, RoPE, the cache
write, the router's softmax and selection, ...), each paying a fixed cost per call that adds up to about
as much as streaming the weights. The native kernel (dynamoe.model.native) runs each half of a block
as one op on the block's packed weights:

    x = x + wo(attention(rms_norm(x)))          # attention_decode: RoPE, cache write, grouped-query heads
    x = x + experts(rms_norm(x), router(...))   # moe_decode: gate, top-k or threshold selection, experts

computing what Block.forward computes for one token of a batch of one (tests hold the two within 1e-4).
A block is fused only where the kernel implements all of it: attention without QK-norm, an MoE whose
router is top-k, top-p or dynamic, without a shared expert, on the local dispatcher, every weight in the
native kernel's panels (Transformer.pack_weights). Anything else decodes through the modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

from dynamoe.model.dispatch import LocalDispatcher
from dynamoe.model.moe import MoE
from dynamoe.model.packed import PanelWeight
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


def fresh_block(block: Block) -> bool:
    """Whether every packed weight of a fusable block is still usable (see InferenceWeight.is_fresh)."""
    attn, moe = block.attn, block.ffn
    assert isinstance(moe, MoE)
    return (moe.experts.fresh_panels() is not None
            and all(p.packed is not None and p.packed.is_fresh(p.weight) for p in (attn.wqkv, attn.wo, moe.router.gate)))


def decode_block(block: Block, x_1D: torch.Tensor, position: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, Routing]:
    """Block.forward for one token of a batch of one, at `position` of its KV cache, in two native calls."""
    attn, moe = block.attn, block.ffn
    assert isinstance(moe, MoE) and attn.kv_cache is not None
    wqkv, wo = cast(PanelWeight, attn.wqkv.packed), cast(PanelWeight, attn.wo.packed)  # fresh: see fresh_block
    x_1D = torch.ops.dynamoe.attention_decode(
        x_1D, block.attn_norm.weight, block.attn_norm.eps, wqkv.panels, wqkv.scale, attn.wqkv.bias, wo.panels, wo.scale,
        attn.wo.bias, attn.kv_cache.k_BHSd, attn.kv_cache.v_BHSd, position, cos, sin, attn.n_heads, attn.clip_qkv)
    router, experts = moe.router, moe.experts.panels
    assert experts is not None
    gate = cast(PanelWeight, router.gate.packed)
    threshold = isinstance(router, TopPRouter)
    head = router.temperature_head if isinstance(router, DynamicRouter) else None
    x_1D, experts_1K, weights_1K, k_1 = torch.ops.dynamoe.moe_decode(
        x_1D, block.ffn_norm.weight, block.ffn_norm.eps, gate.panels, router.n_experts,
        router.k_max if threshold else router.top_k, router.k_min, router.threshold if threshold else 0.0,
        router.renormalize, threshold and router.static_weights,
        None if head is None else head.weight, None if head is None else head.bias,
        getattr(router, "temperature_input_scale", 1.0), getattr(router, "temperature_min", 0.0),
        getattr(router, "temperature_max", 0.0), getattr(router, "temperature_scale", 1.0),
        experts.gate_up, experts.gate_up_scale, experts.down, experts.down_scale)
    return x_1D, Routing(experts_1K, weights_1K, k_1, x_1D.new_zeros(()))
