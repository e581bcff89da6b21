"""The MoE layer: router -> dispatch -> experts -> combine."""

from __future__ import annotations

import torch
from torch import nn

from dynamoe.config import ModelConfig
from dynamoe.model.dispatch import Dispatcher, LocalDispatcher
from dynamoe.model.experts import Experts
from dynamoe.model.router import Routing, build_router


class MoE(nn.Module):
    """A mixture of SwiGLU experts behind a router; the dispatcher is swappable (expert parallelism)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.router = build_router(cfg)
        self.experts = Experts(cfg.n_experts, cfg.dim, cfg.expert_dim)
        self.dispatcher: Dispatcher = LocalDispatcher()

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        B, T, D = x_BTD.shape
        h_ND = x_BTD.reshape(B * T, D)
        routing = self.router(h_ND)
        y_ND = self.dispatcher(h_ND, routing, self.experts)
        return y_ND.view(B, T, D), routing
