"""E SwiGLU experts stored as stacked tensors, so selecting an expert is a view, never a copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe.model.layers import PackedPair, fresh_pair, pack_pair, swiglu
from dynamoe.model.packed import PanelExperts, native_serves, round_to_int8_


class Experts(nn.Module):
    """Stacked expert weights: w_gate_up [E, D, 2F] and w_down [E, F, D]."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.n_experts, self.dim, self.hidden = n_experts, dim, hidden
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.packed: list[PackedPair | None] | None = None  # see pack_weights
        self.panels: PanelExperts | None = None  # ... with the native kernel
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal init; Transformer.reset_parameters rescales the output projections by depth."""
        nn.init.normal_(self.w_gate_up, std=std)
        nn.init.normal_(self.w_down, std=std)

    def pack_weights(self, int8: bool = False) -> None:
        """Keep packed copies of the experts for inference (dynamoe.model.packed): the native kernel's panels of
        every expert, else oneDNN's layout per expert. int8 rounds the weights to int8 per output column first."""
        quantized = (round_to_int8_(self.w_gate_up), round_to_int8_(self.w_down)) if int8 else None
        self.panels = PanelExperts(self.w_gate_up, self.w_down, quantized) if native_serves(self.w_gate_up) else None
        self.packed = None if self.panels is not None else [
            pack_pair(self.w_gate_up[e], self.w_down[e], self.w_gate_up, self.w_down) for e in range(self.n_experts)]

    def packed_expert(self, expert: int) -> PackedPair | None:
        """The expert's oneDNN-packed weights if they are usable now."""
        return None if self.packed is None else fresh_pair(self.packed[expert], self.w_gate_up, self.w_down)

    def fresh_panels(self) -> PanelExperts | None:
        """The native kernel's copy of the experts if it is usable now."""
        return self.panels if self.panels is not None and self.panels.is_fresh(self.w_gate_up, self.w_down) else None

    def forward_expert(self, expert: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Run one expert on the rows routed to it."""
        panels = self.fresh_panels()
        if panels is not None:
            return panels.expert(expert, x_ND)
        return swiglu(x_ND, self.w_gate_up[expert], self.w_down[expert], self.packed_expert(expert))

    def forward_grouped(self, x_SD: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert (expert e's rows end at ends_E[e], int32) through torch._grouped_mm in x's dtype:
        two grouped matmuls for all experts, the group sizes read on the device. Rows past the last group are not written."""
        gate, up = torch._grouped_mm(x_SD, self.w_gate_up.to(x_SD.dtype), offs=ends_E).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, self.w_down.to(x_SD.dtype), offs=ends_E)

    def add_weighted_expert(self, expert: int, x_ND: torch.Tensor, weight_N1: torch.Tensor,
                            out_ND: torch.Tensor | None) -> torch.Tensor:
        """out + weight * expert(x), with the weight folded into the down projection's input (fewer kernel calls)."""
        return swiglu(x_ND, self.w_gate_up[expert], self.w_down[expert], self.packed_expert(expert), weight_N1, out_ND)
