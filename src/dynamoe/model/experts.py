"""E SwiGLU experts stored as stacked tensors, so selecting an expert is a view, never a copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe.model.layers import swiglu


class Experts(nn.Module):
    """Stacked expert weights: w_gate_up [E, D, 2F] and w_down [E, F, D]."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.n_experts, self.dim, self.hidden = n_experts, dim, hidden
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal init; Transformer.reset_parameters rescales the output projections by depth."""
        nn.init.normal_(self.w_gate_up, std=std)
        nn.init.normal_(self.w_down, std=std)

    def forward_expert(self, expert: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Run one expert on the rows routed to it."""
        return swiglu(x_ND, self.w_gate_up[expert], self.w_down[expert])

    def add_weighted_expert(self, expert: int, x_ND: torch.Tensor, weight_N1: torch.Tensor,
                            out_ND: torch.Tensor | None) -> torch.Tensor:
        """out + weight * expert(x), with the weight folded into the down projection's input (fewer kernel calls)."""
        gate, up = (x_ND @ self.w_gate_up[expert]).chunk(2, dim=-1)
        hidden_NF = F.silu(gate) * up * weight_N1
        if out_ND is None:
            return hidden_NF @ self.w_down[expert]
        return torch.addmm(out_ND, hidden_NF, self.w_down[expert])
