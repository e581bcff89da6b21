"""Inference copies of the weights in a kernel's own layout: faster batch-1 decoding on CPU.

Decoding one token is a chain of matrix-vector products whose speed is how fast the weights stream from
memory. torch's default CPU kernel (MKL) reads a large fp32 matrix at about 22 GB/s on this project's
machines whatever the thread count. Two layouts do better:

- `PanelWeight` / `PanelExperts`: the native kernel's panels of 16 output columns (dynamoe.model.native),
  fp32 or int8, for every fp32 matrix where the kernel is available;
- `PackedWeight`: oneDNN's blocked layout, 0.6-0.8x torch's time on one thread and 0.55-0.7x on two for
  matrices of 2 MiB and more (smaller ones gain nothing, see PACK_MIN_ELEMENTS), where it is not.

An inference copy has no autograd, and it belongs to one version of its source tensor. Any in-place change
of the source (an optimizer step, `load_state_dict`), new storage under it (`model.to(...)`) or a new
source tensor makes it stale, and callers then fall back to the plain matmul.

Which dtypes oneDNN can pack depends on the CPU: bf16 needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and a
build without oneDNN (or a CPU it does not support) packs nothing. `onednn_supports` answers by running
the op on a tiny matrix once per process, so every path falls back to the plain matmul instead of crashing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from dynamoe.model import native

logger = logging.getLogger(__name__)

# Below about 2 MiB of fp32 the two kernels are even (measured at 1 and 2 threads, one matvec on
# weights streamed from memory: 0.84-1.4x the plain time from 64k to 256k elements, 0.56-0.79x from
# 512k up); packing the small preset's 64k-256k matrices too gained nothing in whole decode steps.
PACK_MIN_ELEMENTS = 1 << 19

ONEDNN_SUPPORT: dict[torch.dtype, bool] = {}  # onednn_supports' answers: each dtype is probed once per process


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether this CPU and torch build can pack and multiply `dtype` weights with oneDNN (probed once per dtype)."""
    if dtype not in ONEDNN_SUPPORT:
        ONEDNN_SUPPORT[dtype] = _probe_onednn(dtype)
    return ONEDNN_SUPPORT[dtype]


def _probe_onednn(dtype: torch.dtype) -> bool:
    """Run both ops PackedWeight uses on a tiny matrix and check the answer; False on any refusal."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype), None)
            x = torch.ones(2, 8, dtype=dtype)
            product = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            total = torch.ops.mkldnn._linear_pointwise.binary(x, product, packed, None, "add")
    except (RuntimeError, NotImplementedError) as error:  # e.g. "bf16 path needs the cpu support avx_ne_convert or ..."
        logger.debug("oneDNN cannot pack %s weights here, using the plain matmul: %s", dtype, error)
        return False
    if not bool((total.float() == 16).all()):
        logger.debug("oneDNN's packed %s matmul gave a wrong result here, using the plain matmul", dtype)
        return False
    return True


def can_pack(weight: torch.Tensor) -> bool:
    """Whether packing can speed up products with this 2-D weight: a large CPU matrix of a dtype oneDNN packs here."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.numel() >= PACK_MIN_ELEMENTS
            and onednn_supports(weight.dtype))


def stamp(tensor: torch.Tensor) -> tuple[int, int]:
    """What changes when a tensor's values may have: its version (in-place writes) and its storage (`.data = ...`,
    which `model.to(...)` does while keeping the Parameter object)."""
    return tensor._version, tensor.data_ptr()


class InferenceWeight:
    """A frozen inference copy of one weight, in a kernel's own layout: x @ W (input-major W) or F.linear(x, W)
    (output-major W).

    `source` is the parameter whose version decides freshness: the weight itself, or the stacked
    parameter it is a slice of (an expert's matrix).
    """

    def __init__(self, weight: torch.Tensor, source: torch.Tensor | None) -> None:
        self.source = weight if source is None else source
        self.stamp = stamp(self.source)

    def __deepcopy__(self, memo: dict) -> None:
        # oneDNN's opaque tensors cannot be copied, nor should copies share the originals' stamps: a copied model
        # starts unpacked (pack it again).
        return None

    def is_fresh(self, source: torch.Tensor) -> bool:
        """True while `source` is the very tensor packed, unchanged since, and no gradient is wanted."""
        return source is self.source and self.unchanged() and not torch.is_grad_enabled()

    def unchanged(self) -> bool:
        """True while the packed tensor has seen no in-place write and no new storage."""
        return stamp(self.source) == self.stamp

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W (+ bias) over the last dimension of x."""
        raise NotImplementedError

    def addmm(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + x @ W in one call."""
        raise NotImplementedError


class PackedWeight(InferenceWeight):
    """oneDNN's blocked layout (a 2-D fp32 or bf16 weight)."""

    def __init__(self, weight: torch.Tensor, input_major: bool, source: torch.Tensor | None = None) -> None:
        super().__init__(weight, source)
        out_by_in = weight.detach().t() if input_major else weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(out_by_in.contiguous(), None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    def addmm(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise.binary(x, out, self.packed, None, "add")


class PanelWeight(InferenceWeight):
    """The native kernel's panels of 16 output columns (dynamoe.model.native), fp32 or int8 with per-column scales."""

    def __init__(self, weight: torch.Tensor, input_major: bool, source: torch.Tensor | None = None,
                 quantized: Quantized | None = None) -> None:
        super().__init__(weight, source)
        w_DO = weight.detach() if input_major else weight.detach().t()
        self.out_features = w_DO.shape[1]
        self.panels = native.to_panels(w_DO if quantized is None else quantized[0])
        self.scale = None if quantized is None else native.pad_columns(quantized[1])

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x, bias, None)

    def addmm(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, None, out)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
        """x @ W (+ bias) (+ residual) through the kernel, on x's rows flattened."""
        x_ND = x.reshape(-1, x.shape[-1]).contiguous()
        residual_NO = None if residual is None else residual.reshape(-1, self.out_features).contiguous()
        out_NO = torch.ops.dynamoe.linear(x_ND, self.panels, self.scale, bias, residual_NO, self.out_features)
        return out_NO.view(*x.shape[:-1], self.out_features)


Quantized = tuple[torch.Tensor, torch.Tensor]  # int8 weights [..., D, O] and their per-column scales [..., O]


@torch.no_grad()
def round_to_int8_(weight: torch.Tensor, input_major: bool = True) -> Quantized:
    """Quantize a weight to int8 per output column and write the rounded values back into it, so that every
    kernel (native int8, oneDNN, plain) computes the same model; the int8 values and scales."""
    w_DO = weight if input_major else weight.t()
    q_DO, scale_O = native.quantize_columns(w_DO)
    w_DO.copy_(q_DO * scale_O.unsqueeze(-2))
    return q_DO, scale_O


def native_serves(weight: torch.Tensor) -> bool:
    """Whether the native kernel can hold this weight: fp32 on CPU, where the kernel is available."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and native.native_available()


def fresh(packed: InferenceWeight | None, source: torch.Tensor) -> InferenceWeight | None:
    """The packed copy if it is usable now for `source` (see InferenceWeight.is_fresh), else None."""
    return packed if packed is not None and packed.is_fresh(source) else None


def pack(weight: torch.Tensor, input_major: bool = True, source: torch.Tensor | None = None,
         int8: bool = False) -> InferenceWeight | None:
    """The fastest inference copy of a 2-D weight here: native panels, else oneDNN's layout if packing helps it
    (see can_pack), else None. int8 first rounds the weight itself to int8 per output column (round_to_int8_)."""
    quantized = round_to_int8_(weight, input_major) if int8 else None
    if weight.dim() == 2 and native_serves(weight):
        return PanelWeight(weight, input_major, source, quantized)
    return PackedWeight(weight, input_major, source) if can_pack(weight) else None


def packed_weights(value: Any) -> Iterator[InferenceWeight]:
    """The InferenceWeight objects in an attribute's value (one, or a list/tuple of them, nested)."""
    if isinstance(value, InferenceWeight):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from packed_weights(item)


def count_packed(model: torch.nn.Module, kind: type[InferenceWeight] = InferenceWeight) -> int:
    """How many weight matrices of a model hold a packed copy of this kind."""
    return sum(1 for module in model.modules() for value in vars(module).values()
               for weight in packed_weights(value) if isinstance(weight, kind))


def count_panel_experts(model: torch.nn.Module) -> int:
    """How many expert stacks of a model hold a copy in the native kernel's panels."""
    return sum(1 for module in model.modules() if isinstance(getattr(module, "panels", None), PanelExperts))


class PanelExperts:
    """A layer's stacked experts in the native kernel's panels: a token's selected experts run in one op.

    gate_up [E, 2 * FP, D, 16] (each expert's FP gate panels, then its FP up panels), down [E, DP, F, 16];
    int8 panels come with per-column scales. Fresh under the same rule as InferenceWeight, for both stacks.
    """

    def __init__(self, w_gate_up_EDF2: torch.Tensor, w_down_EFD: torch.Tensor,
                 quantized: tuple[Quantized, Quantized] | None = None) -> None:
        gate_up, down = w_gate_up_EDF2.detach(), w_down_EFD.detach()
        gate_up_scale = down_scale = None
        if quantized is not None:  # int8 values and scales of both stacks (see round_to_int8_)
            (gate_up, gate_up_scale), (down, down_scale) = quantized
            gate_up_scale = native.pad_columns(gate_up_scale.unflatten(-1, (2, -1))).flatten(1)
            down_scale = native.pad_columns(down_scale)
        # Gate and up panels apart, so that panel p of the gate and of the up projection cover the same columns.
        self.gate_up = native.to_panels(gate_up.unflatten(-1, (2, -1)).movedim(-2, 1)).flatten(1, 2)
        self.down = native.to_panels(down)
        self.gate_up_scale, self.down_scale = gate_up_scale, down_scale
        self.sources = (w_gate_up_EDF2, w_down_EFD)
        self.stamps = (stamp(w_gate_up_EDF2), stamp(w_down_EFD))

    def __deepcopy__(self, memo: dict) -> None:
        return None  # as InferenceWeight: a copied model starts unpacked

    def is_fresh(self, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> bool:
        """True while both stacks are the very tensors packed, unchanged since, and no gradient is wanted."""
        return (w_gate_up is self.sources[0] and w_down is self.sources[1] and not torch.is_grad_enabled()
                and self.unchanged())

    def unchanged(self) -> bool:
        """True while neither stack has seen an in-place write or new storage."""
        return (stamp(self.sources[0]), stamp(self.sources[1])) == self.stamps

    def expert(self, expert: int, x_ND: torch.Tensor) -> torch.Tensor:
        """One expert's SwiGLU on the rows routed to it (prefill, batches): its gate-up product, then its down one."""
        padded = self.gate_up.shape[1] // 2 * native.PANEL  # F rounded up to whole panels
        hidden = self.down.shape[2]  # F: the down projection's rows
        scale = None if self.gate_up_scale is None else self.gate_up_scale[expert]
        gate_up_N2H = torch.ops.dynamoe.linear(x_ND.contiguous(), self.gate_up[expert], scale, None, None,
                                               2 * padded).view(-1, 2, padded)[..., :hidden]
        hidden_NF = (F.silu(gate_up_N2H[:, 0]) * gate_up_N2H[:, 1]).contiguous()
        scale = None if self.down_scale is None else self.down_scale[expert]
        return torch.ops.dynamoe.linear(hidden_NF, self.down[expert], scale, None, None, x_ND.shape[-1])

    def run(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor, k_T: torch.Tensor) -> torch.Tensor:
        """Sum over each token's first k_T experts of weight * expert(x), in one call."""
        return torch.ops.dynamoe.moe(x_TD.contiguous(), experts_TK, weights_TK, k_T, self.gate_up, self.gate_up_scale,
                                     self.down, self.down_scale)
