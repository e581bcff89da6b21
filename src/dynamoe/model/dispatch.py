"""Dispatch: send each selected (token, expert) pair to its expert, run it, and combine.

This is the seam where expert parallelism plugs in: any object with the `Dispatcher` call signature
can replace `LocalDispatcher` on a built model. Shape legend: T tokens, K routing slots, P selected
pairs, D model dim, E experts.
"""

from __future__ import annotations

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


class LocalDispatcher:
    """Runs only the selected pairs, by the path that suits the number of tokens."""

    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
        if x_TD.shape[0] <= DECODE_MAX_TOKENS:
            return decode_dispatch(x_TD, routing, experts)
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
