"""Batch-1 decoding in native calls: a block's attention, then its router and experts; where the kernel
implements every block's both halves, the whole step in one call.

Through the modules, one decode step is some thirty small torch ops per block (norms, RoPE, the cache
write, the router's softmax and selection, ...), each paying a fixed cost per call that adds up to about
as much as streaming the weights. The native kernel (dynamoe.model.native) runs each half of a block
as one op on the block's packed weights:

    x = x + wo(attention(rms_norm(x)))          # attention_decode: RoPE, cache write, grouped-query heads
    x = x + experts(rms_norm(x), router(...))   # moe_decode: gate, top-k or threshold selection, experts
    logits = head(rms_norm(x))                  # linear with a norm weight, after the last block

computing what Block.forward computes for one token of a batch of one (tests hold the two within 1e-4).
The attention half is fused where the kernel implements it (no QK-norm, its weights in the native kernel's
panels: Transformer.pack_weights); a model with any other attention decodes through the modules. The
feed-forward half is fused for an MoE whose router is top-k, top-p, dynamic, DTop-p or need, without a
shared expert, on the local dispatcher, and for a dense SwiGLU (two native linears); any other (the ReLU
router, a shared expert) runs through its module on the same packed weights, so that every model of a
comparison gets the fused attention and head, not only the routers the kernel knows. When every block's
feed-forward half is fused, the kernel's Decoder runs the embedding row, the blocks and the head in one call
(the Python around a step, checks included, had grown to a tenth of an int8 step).

A `FusedBlock` keeps references to the block's tensors, taken when the model is packed: reading them
through the modules costs more per step than the two calls themselves. It is used only while every one
of them is unchanged (the same rule as the packed weights: no in-place write, no new storage), no
gradient is wanted, and its router has no hooks (they need the router's own forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe.model.dispatch import LocalDispatcher
from dynamoe.model.native import last_level_cache_bytes
from dynamoe.model.layers import DenseFFN, RMSNorm
from dynamoe.model.moe import MoE
from dynamoe.model.packed import InferenceWeight, PanelWeight, stamp
from dynamoe.model.router import DTopPRouter, DynamicRouter, NeedRouter, Routing, TopKRouter, TopPRouter

if TYPE_CHECKING:
    from dynamoe.model.transformer import Block

# Exactly these classes: a subclass may route otherwise.
FUSED_ROUTERS = (TopKRouter, TopPRouter, DynamicRouter, DTopPRouter, NeedRouter)


def attention_fusable(block: Block) -> bool:
    """Whether the native kernel implements this packed block's attention half."""
    attn = block.attn
    return attn.q_norm is None and all(isinstance(projection.packed, PanelWeight) for projection in (attn.wqkv, attn.wo))


def moe_fusable(block: Block) -> bool:
    """Whether the native kernel implements this packed block's feed-forward half (router and experts)."""
    moe = block.ffn
    return (isinstance(moe, MoE) and type(moe.router) in FUSED_ROUTERS and moe.shared_expert is None
            and type(moe.dispatcher) is LocalDispatcher and moe.experts.panels is not None
            and isinstance(moe.router.gate.packed, PanelWeight))


def dense_fusable(block: Block) -> bool:
    """Whether this packed block's feed-forward half is a dense SwiGLU on the native kernel's panels."""
    ffn = block.ffn
    return (isinstance(ffn, DenseFFN) and ffn.packed is not None
            and all(isinstance(weight, PanelWeight) for weight in ffn.packed))


class FusedBlock:
    """One block's decode step: its attention in one native call, then its feed-forward half in another where the
    kernel implements it (moe_fusable), else through its module; on references to its tensors taken at packing."""

    def __init__(self, block: Block) -> None:
        attn = block.attn
        assert attention_fusable(block)
        wqkv, wo = self.packed = [cast(PanelWeight, p.packed) for p in (attn.wqkv, attn.wo)]
        self.attention, self.block = attn, block
        self.is_moe = isinstance(block.ffn, MoE)  # routes, and takes one of the model's per-MoE-layer thresholds
        self.attention_args = (block.attn_norm.weight, block.attn_norm.eps, wqkv.panels, wqkv.scale, attn.wqkv.bias,
                               wo.panels, wo.scale, attn.wo.bias)
        self.attention_settings = (attn.n_heads, attn.clip_qkv)
        self.tensors = [t for t in self.attention_args if isinstance(t, nn.Parameter)]
        self.moe_args: tuple | None = None
        self.dense_args: tuple | None = None
        if moe_fusable(block):
            self.fuse_moe(block.ffn_norm, cast(MoE, block.ffn))
        elif dense_fusable(block):
            self.fuse_dense(block.ffn_norm, cast(DenseFFN, block.ffn))
        self.stamps = [stamp(t) for t in self.tensors]
        self.no_aux_loss = torch.zeros(())  # decoding computes no auxiliary loss

    def fuse_moe(self, norm: RMSNorm, moe: MoE) -> None:
        """Take the references moe_decode reads (the feed-forward half in one native call)."""
        router, experts = moe.router, moe.experts.panels
        assert experts is not None
        gate = cast(PanelWeight, router.gate.packed)
        self.packed.append(gate)
        self.router, self.experts = router, experts
        dynamic = router if isinstance(router, DynamicRouter) else None
        dtopp = router if isinstance(router, DTopPRouter) else None
        need = router if isinstance(router, NeedRouter) else None
        # Everything moe_decode reads but the compute dial (`settings`), in its order: weights, and the router's state
        # tensors (the need head's, the controller's), which the kernel reads at each call.
        self.moe_args = (
            norm.weight, norm.eps, gate.panels, router.n_experts,
            router.top_k if isinstance(router, TopKRouter) else router.k_max, router.k_min,
            getattr(router, "renormalize", True),  # DTop-p and need renormalise what they keep
            isinstance(router, TopPRouter) and router.static_weights,
            None if dynamic is None else dynamic.temperature_head.weight, None if dynamic is None else dynamic.temperature_head.bias,
            1.0 if dynamic is None else dynamic.temperature_input_scale, 0.0 if dynamic is None else dynamic.temperature_min,
            0.0 if dynamic is None else dynamic.temperature_max,
            None if dtopp is None else dtopp.logit_norm.weight,
            *((None, None, None, None, 0.0) if need is None else
              (need.need_weight_D1, need.need_bias, need.need_moments, need.k_penalty, need.need_spread)),
            None if dtopp is None else dtopp.routing_threshold,
            experts.gate_up, experts.gate_up_scale, experts.down, experts.down_scale)
        self.tensors += [t for t in self.moe_args if isinstance(t, nn.Parameter)]

    def fuse_dense(self, norm: RMSNorm, ffn: DenseFFN) -> None:
        """Take the references of a dense SwiGLU: two native linears (the first with the norm) around silu * up."""
        assert ffn.packed is not None
        gate_up, down = cast(tuple[PanelWeight, PanelWeight], ffn.packed)
        self.packed += [gate_up, down]
        self.dense_args = (norm.weight, norm.eps, gate_up, down)
        self.tensors += [norm.weight, ffn.w_gate_up, ffn.w_down]

    def dense(self, x_1D: torch.Tensor) -> torch.Tensor:
        """x + SwiGLU(rms_norm(x)) of a dense block, in two native calls and three small torch ops."""
        assert self.dense_args is not None
        norm_weight, eps, gate_up, down = self.dense_args
        gate, up = torch.ops.dynamoe.linear(x_1D, gate_up.panels, gate_up.scale, None, None, gate_up.out_features,
                                            norm_weight, eps).chunk(2, dim=-1)
        return torch.ops.dynamoe.linear(F.silu(gate) * up, down.panels, down.scale, None, x_1D, down.out_features)

    def hooked(self) -> bool:
        """Whether its router has hooks (they need the router's own forward: bench's probe)."""
        return self.moe_args is not None and bool(self.router._forward_hooks or self.router._forward_pre_hooks)

    def watched(self) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Every tensor the step reads, and every source of its packed weights, with its stamp at packing."""
        pairs = list(zip(self.tensors, self.stamps)) + [(packed.source, packed.stamp) for packed in self.packed]
        if self.moe_args is not None:
            pairs += list(zip(self.experts.sources, self.experts.stamps))
        return pairs

    def settings(self, threshold: float | None) -> tuple[float, float]:
        """The compute dial moe_decode takes at each call: the threshold asked for, else a top-p router's own (0 for
        the others: top-k, need, and DTop-p, whose threshold the kernel reads from its controller's state), and the
        temperature scale."""
        router = self.router
        if not isinstance(router, TopPRouter):
            threshold = 0.0
        elif threshold is None:
            threshold = router.threshold
        return threshold, getattr(router, "temperature_scale", 1.0)

    def __call__(self, x_1D: torch.Tensor, position: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 threshold: float | None = None) -> tuple[torch.Tensor, Routing | None]:
        """Block.forward for one token of a batch of one, at `position` of its KV cache, at a routing threshold
        (None: as trained); the routing is None for a dense block."""
        cache = self.attention.kv_cache
        assert cache is not None  # see ready
        x_1D = torch.ops.dynamoe.attention_decode(x_1D, *self.attention_args, cache.k_BHSd, cache.v_BHSd, position, cos,
                                                  sin, *self.attention_settings)
        if self.moe_args is not None:
            x_1D, experts_1K, weights_1K, k_1 = torch.ops.dynamoe.moe_decode(x_1D, *self.moe_args, *self.settings(threshold))
            return x_1D, Routing(experts_1K, weights_1K, k_1, self.no_aux_loss)
        if self.dense_args is not None:
            return self.dense(x_1D), None
        return self.feed_forward(x_1D, threshold)

    def feed_forward(self, x_1D: torch.Tensor, threshold: float | None) -> tuple[torch.Tensor, Routing | None]:
        """The feed-forward half through the block's modules (they read the packed weights themselves)."""
        block = self.block
        h_11D = block.ffn_norm(x_1D)[None]
        if isinstance(block.ffn, MoE):
            y_11D, routing = block.ffn(h_11D, None if threshold is None else torch.tensor([threshold], dtype=torch.float64))
            return x_1D + y_11D[0], routing
        return x_1D + block.ffn(h_11D)[0], None


class FusedDecoder:
    """Every block of a packed model as a FusedBlock, then the final norm and the output head in one call: a decode
    step of one token in two native calls per block and one more; and where the kernel implements every block's both
    halves, the whole step in one call (the kernel's Decoder, built from the same references), which saves the
    Python and the dispatch of those calls: a tenth of an int8 step."""

    def __init__(self, layers: Sequence[Block], norm: RMSNorm, head: PanelWeight, embedding: torch.Tensor) -> None:
        self.blocks = [FusedBlock(block) for block in layers]
        self.norm, self.head, self.embedding = (norm.weight, norm.eps), head, embedding
        self.stamps = [stamp(norm.weight), stamp(embedding)]
        self.caches: list[torch.Tensor] = []  # the KV caches `runnable` last found to hold one row
        self.native = self.native_decoder() if embedding.dtype == torch.float32 and embedding.is_contiguous() else None

    def native_decoder(self) -> torch.ScriptObject | None:
        """The kernel's Decoder over every block, or None unless the kernel implements both halves of each."""
        if any(block.moe_args is None and block.dense_args is None for block in self.blocks):
            return None
        decoder = torch.classes.dynamoe.Decoder()
        for block in self.blocks:
            decoder.add_attention(*block.attention_args, *block.attention_settings)
            if block.moe_args is not None:
                decoder.add_moe(*block.moe_args)
            else:
                norm_weight, eps, gate_up, down = cast(tuple, block.dense_args)
                decoder.add_dense(norm_weight, eps, gate_up.panels, gate_up.scale, gate_up.out_features // 2, down.panels,
                                  down.scale, down.out_features)
        decoder.set_head(self.embedding, self.head.panels, self.head.scale, self.head.out_features, *self.norm,
                         last_level_cache_bytes())
        for tensor, (version, data) in self.watched():
            decoder.watch(tensor, version, data)
        return decoder

    def watched(self) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Every tensor a step depends on, with its stamp at packing (see FusedBlock.watched)."""
        pairs = [pair for block in self.blocks for pair in block.watched()]
        return pairs + [(self.head.source, self.head.stamp), *zip((self.norm[0], self.embedding), self.stamps)]

    def __deepcopy__(self, memo: dict) -> None:
        return None  # as the packed weights it reads: a copied model starts unpacked

    def __reduce__(self) -> tuple:
        return type(None), ()  # pickled as copied (torch.save of a whole model): the loaded one starts unpacked

    def summary(self) -> str:
        """What a batch-1 step runs in the kernel, for kernel summaries next to timings."""
        through_modules = sum(block.moe_args is None and block.dense_args is None for block in self.blocks)
        if not through_modules:
            return "batch-1 step fused"
        return f"batch-1 step fused but {through_modules} of {len(self.blocks)} feed-forward halves (router not in the kernel)"

    def ready(self) -> bool:
        """Whether the step may run fused now: runnable, and every tensor it depends on unchanged since packing (the
        kernel's Decoder checks the stamps itself, in a fraction of the time)."""
        if not self.runnable():
            return False
        if self.native is not None:
            return self.native.unchanged()
        return all(stamp(tensor) == packed for tensor, packed in self.watched())

    def runnable(self) -> bool:
        """Every block with a KV cache of one row and no router hooks; the caches checked only when they are not the
        ones last found to hold one row (a step runs in a fraction of a millisecond: Python's checks show)."""
        caches = []
        for block in self.blocks:
            cache = block.attention.kv_cache
            if cache is None or block.hooked():
                return False
            caches += [cache.k_BHSd, cache.v_BHSd]
        if len(caches) != len(self.caches) or any(a is not b for a, b in zip(caches, self.caches)):
            if any(cache.shape[0] != 1 for cache in caches):
                return False
            self.caches = caches
        return True

    def __call__(self, idx_1: torch.Tensor, position: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 thresholds_L: Sequence[float] | None = None) -> tuple[torch.Tensor, list[Routing], torch.Tensor | None]:
        """The blocks in turn on one token (its id) at `position`, each at its layer's routing threshold (None: as
        trained); its logits (1, V), each block's routing, and the mean experts over them (1, 1) where the kernel
        counted them (None: from the routings)."""
        if self.native is not None:
            return self.native_step(int(idx_1), int(position), cos, sin, thresholds_L)
        x_1D = F.embedding(idx_1, self.embedding)
        routings = []
        for block, threshold in zip(self.blocks, self.block_thresholds(thresholds_L)):
            x_1D, routing = block(x_1D, position, cos, sin, threshold)
            if routing is not None:  # as Transformer.forward: dense blocks have none
                routings.append(routing)
        head = self.head
        logits_1V = torch.ops.dynamoe.linear(x_1D, head.panels, head.scale, None, None, head.out_features, *self.norm)
        return logits_1V, routings, None

    def block_thresholds(self, thresholds_L: Sequence[float] | None) -> list[float | None]:
        """Each block's routing threshold from the model's, one per MoE layer in depth order (None: as trained)."""
        per_moe_layer = iter(thresholds_L or ())
        return [next(per_moe_layer) if thresholds_L is not None and block.is_moe else None for block in self.blocks]

    def native_step(self, token: int, position: int, cos: torch.Tensor, sin: torch.Tensor,
                    thresholds_L: Sequence[float] | None) -> tuple[torch.Tensor, list[Routing], torch.Tensor | None]:
        """__call__ in one call of the kernel's Decoder, on the caches `runnable` found."""
        settings = []
        for block, threshold in zip(self.blocks, self.block_thresholds(thresholds_L)):
            if block.moe_args is not None:
                settings += block.settings(threshold)
        assert self.native is not None and self.caches
        logits_1V, experts, weights, ks, mean_k_11 = self.native.step(token, position, cos, sin, self.caches, settings)
        no_aux_loss = self.blocks[0].no_aux_loss
        routings = [Routing(*routing, no_aux_loss) for routing in zip(experts, weights, ks)]
        return logits_1V, routings, mean_k_11 if routings else None


def fused_decoder(layers: Sequence[Block], norm: RMSNorm, head: InferenceWeight | None,
                  embedding: torch.Tensor) -> FusedDecoder | None:
    """The fused decoder of a packed model, or None unless the kernel implements every block's attention (see
    attention_fusable) and holds the output head."""
    if not isinstance(head, PanelWeight) or not all(attention_fusable(block) for block in layers):
        return None
    return FusedDecoder(layers, norm, head, embedding)
