"""Dispatch: send each selected (token, expert) pair to its expert, run it, and combine.

This is the seam where expert parallelism plugs in: any object with the `Dispatcher` call signature
can replace `LocalDispatcher` on a built model. Shape legend: T tokens, K routing slots, P selected
pairs, D model dim, E experts.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch

from dynamoe.model.experts import Experts
from dynamoe.model.router import Routing


class Dispatcher(Protocol):
    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor: ...


def sort_pairs_by_expert(routing: Routing, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Selected pairs grouped by expert: token index and combine weight of each pair, and pairs per expert.

    Padding slots get the id n_experts so that sorting puts them last; a single bincount then gives
    every group size with one host synchronisation.
    """
    T, K = routing.experts_TK.shape
    slot_ids_S = torch.where(routing.mask_TK, routing.experts_TK, n_experts).flatten()
    order_S = torch.argsort(slot_ids_S, stable=True)
    tokens_per_expert = torch.bincount(slot_ids_S, minlength=n_experts + 1).tolist()[:n_experts]
    order_P = order_S[: sum(tokens_per_expert)]
    return order_P // K, routing.weights_TK.flatten()[order_P], tokens_per_expert


DECODE_MAX_TOKENS = 1  # up to this many tokens, the per-token decode path beats grouping by expert


def decode_dispatch(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    """Few tokens (decoding): loop over each token's selected experts only, on views of the stacked weights.

    Expert ids and counts come to the host in one transfer; nothing is sorted or gathered. With the native
    kernel (dynamoe.model.native) every token's experts run in one call that reads the routing itself.
    """
    panels = experts.fresh_panels()
    if panels is not None:
        return panels.run(x_TD, routing.experts_TK, routing.weights_TK, routing.k_T)
    host = torch.cat([routing.k_T[:, None], routing.experts_TK], dim=1).tolist()  # the one host sync
    rows = []
    for t, (k, *expert_ids) in enumerate(host):
        x_1D, weights_K1 = x_TD[t:t + 1], routing.weights_TK[t, :, None]
        y_1D = None
        for j in range(k):
            y_1D = experts.add_weighted_expert(expert_ids[j], x_1D, weights_K1[j], y_1D)
        rows.append(torch.zeros_like(x_1D) if y_1D is None else y_1D)
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def grouped_dispatch(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    """Many tokens (training, prefill): pairs sorted by expert, one contiguous matmul chain per non-empty expert."""
    token_P, weight_P, tokens_per_expert = sort_pairs_by_expert(routing, experts.n_experts)
    # index_select, not x_TD[token_P]: its backward adds repeated rows in a fixed order, so
    # training is bit-reproducible (and resumes exactly) on CPU.
    x_PD = x_TD.index_select(0, token_P)
    outputs = []
    start = 0
    for expert, count in enumerate(tokens_per_expert):
        if count:
            outputs.append(experts.forward_expert(expert, x_PD[start:start + count]))
            start += count
    if not outputs:
        return torch.zeros_like(x_TD)
    y_PD = torch.cat(outputs) * weight_P[:, None]
    return torch.zeros_like(x_TD).index_add_(0, token_P, y_PD)


def grouped_mm_dispatch(x_TD: torch.Tensor, routing: Routing, experts: Experts, dtype: torch.dtype) -> torch.Tensor:
    """Many tokens on a GPU: every routing slot sorted by expert, all experts in two torch._grouped_mm calls whose
    group ends are computed on the device, so nothing waits for the host (unlike grouped_dispatch's counts).

    The shapes are static: padding slots sort last, past the last group, where the grouped matmuls write
    nothing. They are masked on the way in and out (by selection, never by a product, so that the unwritten
    rows reach neither the output nor any gradient).
    """
    T, K = routing.experts_TK.shape
    E = experts.n_experts
    slot_ids_S = torch.where(routing.mask_TK, routing.experts_TK, E).flatten()
    sorted_ids_S, order_S = torch.sort(slot_ids_S, stable=True)
    ends_E = torch.searchsorted(sorted_ids_S, torch.arange(E, device=x_TD.device), right=True).to(torch.int32)
    used_S1 = (sorted_ids_S < E)[:, None]
    token_S = order_S // K
    # In `dtype` from the start: the slot tensors are k_max times the tokens, and their traffic is the cost.
    x_SD = torch.where(used_S1, x_TD.to(dtype).index_select(0, token_S), 0.0)
    y_SD = torch.where(used_S1, experts.forward_grouped(x_SD, ends_E), 0.0)
    weight_S1 = routing.weights_TK.flatten()[order_S][:, None].to(dtype)
    return torch.zeros_like(x_TD, dtype=dtype).index_add_(0, token_S, y_SD * weight_S1).type_as(x_TD)


@functools.cache
def grouped_mm_works(device: torch.device) -> bool:
    """Whether torch._grouped_mm runs forward and backward in bf16 on this device (on CUDA it needs a recent GPU), on
    groups as training makes them: of any size, rows left past the last one. Probed once per device."""
    a = torch.ones(13, 16, dtype=torch.bfloat16, device=device, requires_grad=True)
    b = torch.ones(2, 16, 16, dtype=torch.bfloat16, device=device, requires_grad=True)
    try:
        with torch.enable_grad():  # the first call may come from an evaluation
            torch._grouped_mm(a, b, offs=torch.tensor([5, 11], dtype=torch.int32, device=device))[:11].sum().backward()
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def grouped_mm_dtype(x_TD: torch.Tensor) -> torch.dtype | None:
    """bf16 when x is on a CUDA GPU under bf16 autocast and torch._grouped_mm runs there (training), else None."""
    if not (x_TD.is_cuda and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16):
        return None
    return torch.bfloat16 if grouped_mm_works(x_TD.device) else None


class LocalDispatcher:
    """Runs only the selected pairs, by the path that suits the number of tokens and the device."""

    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
        if x_TD.shape[0] <= DECODE_MAX_TOKENS:
            return decode_dispatch(x_TD, routing, experts)
        dtype = grouped_mm_dtype(x_TD)
        if dtype is not None:
            return grouped_mm_dispatch(x_TD, routing, experts, dtype)
        return grouped_dispatch(x_TD, routing, experts)


def reference_dispatch(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    """Plain per-token loop, the ground truth the fast paths are tested against."""
    rows = []
    for t in range(x_TD.shape[0]):
        y_D = torch.zeros_like(x_TD[t])
        for j in range(int(routing.k_T[t])):
            expert = int(routing.experts_TK[t, j])
            y_D = y_D + routing.weights_TK[t, j] * experts.forward_expert(expert, x_TD[t:t + 1])[0]
        rows.append(y_D)
    return torch.stack(rows)
