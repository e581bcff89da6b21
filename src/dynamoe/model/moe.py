"""The MoE layer: router -> dispatch -> experts -> combine."""

from __future__ import annotations

import torch
from torch import nn

from dynamoe.config import ModelConfig
from dynamoe.model.dispatch import Dispatcher, LocalDispatcher
from dynamoe.model.experts import Experts
from dynamoe.model.layers import DenseFFN, Projection
from dynamoe.model.router import Routing, build_router


class SharedExpert(nn.Module):
    """An expert every token uses, scaled per token by a sigmoid gate (Qwen2-MoE)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.ffn = DenseFFN(dim, hidden)
        self.gate = Projection(dim, 1)

    def forward(self, h_ND: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(h_ND)) * self.ffn(h_ND)


class MoE(nn.Module):
    """A mixture of SwiGLU experts behind a router; the dispatcher is swappable (expert parallelism)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.router = build_router(cfg)
        self.experts = Experts(cfg.n_experts, cfg.dim, cfg.expert_dim)
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.shared_expert = SharedExpert(cfg.dim, cfg.shared_expert_dim) if cfg.shared_expert_dim else None

    def forward(self, x_BTD: torch.Tensor, threshold_B: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """threshold_B: each row's routing threshold (the compute dial); None routes as trained."""
        B, T, D = x_BTD.shape
        h_ND = x_BTD.reshape(B * T, D)
        threshold_N = None if threshold_B is None else threshold_B[:, None].expand(B, T).reshape(B * T)
        routing = self.router(h_ND, threshold_N)
        y_ND = self.dispatcher(h_ND, routing, self.experts)
        if self.shared_expert is not None:
            y_ND = y_ND + self.shared_expert(h_ND)
        return y_ND.view(B, T, D), routing
