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

Which dtypes oneDNN can pack depends on the CPU: bf16 needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and a
build without oneDNN (or a CPU it does not support) packs nothing. `onednn_supports` answers by running
the op on a tiny matrix once per process, so every path falls back to the plain matmul instead of crashing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

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


def packed_weights(value: Any) -> Iterator[PackedWeight]:
    """The PackedWeight objects in an attribute's value (one, or a list/tuple of them, nested)."""
    if isinstance(value, PackedWeight):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from packed_weights(item)


def count_packed(model: torch.nn.Module) -> int:
    """How many weight matrices of a model hold a packed copy."""
    return sum(1 for module in model.modules() for value in vars(module).values() for _ in packed_weights(value))
