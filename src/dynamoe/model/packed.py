"""Weights prepacked for oneDNN's matmul: faster batch-1 decoding on CPU.

Decoding one token is a chain of matrix-vector products whose speed is how fast the weights stream from
memory. torch's default CPU kernel (MKL) reads a large fp32 matrix at about 22 GB/s on this project's
machines whatever the thread count; oneDNN's matmul on a weight reordered once into its blocked layout
takes 0.6-0.8x the time on one thread and 0.55-0.7x on two, for matrices of 2 MiB and more (smaller
ones gain nothing, see PACK_MIN_ELEMENTS).

A `PackedWeight` is an inference-only copy: it has no autograd, and it belongs to one version of its
source tensor. Any in-place change of the source (an optimizer step, `load_state_dict`), new storage
under it (`model.to(...)`) or a new source tensor makes it stale, and callers then fall back to the
plain matmul.
"""

from __future__ import annotations

import torch

# Below about 2 MiB of fp32 the two kernels are even (measured at 1 and 2 threads, one matvec on
# weights streamed from memory: 0.84-1.4x the plain time from 64k to 256k elements, 0.56-0.79x from
# 512k up); packing the small preset's 64k-256k matrices too gained nothing in whole decode steps.
PACK_MIN_ELEMENTS = 1 << 19


def can_pack(weight: torch.Tensor) -> bool:
    """Whether packing can speed up products with this 2-D weight: a large fp32/bf16 CPU matrix, with oneDNN built in."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and weight.numel() >= PACK_MIN_ELEMENTS and torch.backends.mkldnn.is_available())


def stamp(tensor: torch.Tensor) -> tuple[int, int]:
    """What changes when a tensor's values may have: its version (in-place writes) and its storage (`.data = ...`,
    which `model.to(...)` does while keeping the Parameter object)."""
    return tensor._version, tensor.data_ptr()


class PackedWeight:
    """A frozen copy of one weight in oneDNN's layout: x @ W (input-major W) or F.linear(x, W) (output-major W).

    `source` is the parameter whose version decides freshness: the weight itself, or the stacked
    parameter it is a slice of (an expert's matrix).
    """

    def __init__(self, weight: torch.Tensor, input_major: bool, source: torch.Tensor | None = None) -> None:
        self.source = weight if source is None else source
        self.stamp = stamp(self.source)
        out_by_in = weight.detach().t() if input_major else weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(out_by_in.contiguous(), None)

    def __deepcopy__(self, memo: dict) -> None:
        # oneDNN's opaque tensors cannot be copied; a copied model starts unpacked (pack it again).
        return None

    def is_fresh(self, source: torch.Tensor) -> bool:
        """True while `source` is the very tensor packed, unchanged since, and no gradient is wanted."""
        return source is self.source and stamp(source) == self.stamp and not torch.is_grad_enabled()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W (+ bias) over the last dimension of x."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    def addmm(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + x @ W in one call (oneDNN's sum post-op)."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, out, self.packed, None, "add")


def fresh(packed: PackedWeight | None, source: torch.Tensor) -> PackedWeight | None:
    """The packed copy if it is usable now for `source` (see PackedWeight.is_fresh), else None."""
    return packed if packed is not None and packed.is_fresh(source) else None


def pack(weight: torch.Tensor, input_major: bool = True, source: torch.Tensor | None = None) -> PackedWeight | None:
    """A packed copy of the weight if packing helps it (see can_pack), else None."""
    return PackedWeight(weight, input_major, source) if can_pack(weight) else None
