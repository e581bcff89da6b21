"""The benefit of experts per token, by forced routing, and the training signal of the need router.

A token's benefit b_t is its loss with one expert per layer minus its loss with k_max, under the same
model and the same ranking of the experts: every router keeps its own ranking and its own weighting,
only the number of experts is forced. A token whose loss does not move with more experts gains nothing
from them, however hard it is. Shape legend: B batch, T tokens per row, N = B * T tokens, K slots.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe.model.router import NeedRouter, Router, Routing, at_least_fp32
from dynamoe.model.transformer import Transformer


def forced_routing(router: Router, h_TD: torch.Tensor, k: int) -> Routing:
    """The router's own choice cut or extended to its top k experts, with its weights renormalised over them."""
    logits_TE = at_least_fp32(router.gate(h_TD))
    probs_TE = router.select(h_TD, logits_TE, None)[3]  # the router's ranking (and weighting) of the experts
    weights_TK, experts_TK = probs_TE.topk(k, dim=-1)
    weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp(min=torch.finfo(weights_TK.dtype).tiny)
    k_T = torch.full((h_TD.shape[0],), k, dtype=torch.long, device=h_TD.device)
    return Routing(experts_TK, weights_TK.type_as(h_TD), k_T, torch.zeros((), device=h_TD.device))


@contextmanager
def forced_experts(model: Transformer, k: int) -> Iterator[Transformer]:
    """Inside the block, every MoE layer of the model runs exactly k experts per token (forward passes only)."""
    def force(router: nn.Module, args: tuple[torch.Tensor, ...], routing: Routing) -> Routing:
        assert isinstance(router, Router)
        return forced_routing(router, args[0], k)

    handles = [router.register_forward_hook(force) for router in model.routers()]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def token_losses(model: Transformer, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every prediction, (N,)."""
    logits_BTV = model(x_BT).logits
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), y_BT.flatten(), reduction="none")


@torch.no_grad()
def token_benefit(model: Transformer, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    """b_t = loss at k=1 minus loss at k=k_max per prediction, (N,): what the experts beyond the first buy."""
    with forced_experts(model, 1):
        low_N = token_losses(model, x_BT, y_BT)
    with forced_experts(model, model.config.k_max):
        high_N = token_losses(model, x_BT, y_BT)
    return low_N - high_N


@torch.no_grad()
def benefit_and_expectation(model: Transformer, x_BT: torch.Tensor, y_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """b_t (token_benefit) and its expectation under the model's own k_max prediction, KL(p_kmax || p_1), per prediction.

    The expectation is what the experts beyond the first are worth to a token before its next token is known, from
    both forced passes' full outputs: more than any router sees. How well it ranks b_t says how far the benefit can
    be told in advance at all, for a model calibrated at k_max (one trained at small k is not: a head trained on the
    benefit can then rank it better)."""
    log_probs = []
    for k in (1, model.config.k_max):
        with forced_experts(model, k):
            log_probs.append(F.log_softmax(model(x_BT).logits.flatten(0, 1).float(), dim=-1))
    low_NV, high_NV = log_probs
    gain_NV = high_NV - low_NV  # log p_kmax - log p_1 of every possible next token
    return gain_NV.gather(1, y_BT.flatten()[:, None])[:, 0], (high_NV.exp() * gain_NV).sum(-1)


def need_of(benefit_N: torch.Tensor) -> torch.Tensor:
    """The need head's target: the normal score of each benefit's rank among the tokens measured together.

    Ranks, because a token's benefit is noisy and heavy-tailed (the experts can as well hurt a token they
    were not trained to serve together); normal scores, so that the regression sees a bell, not a box.
    """
    ranks_N = benefit_N.argsort().argsort().to(torch.float64)
    return torch.special.ndtri((ranks_N + 0.5) / benefit_N.numel()).to(benefit_N.dtype)


def need_routers(model: Transformer) -> list[NeedRouter]:
    """The model's need routers, in depth order (empty for every other router)."""
    return [router for router in model.routers() if isinstance(router, NeedRouter)]


def supervise_need(model: Transformer, x_BT: torch.Tensor, y_BT: torch.Tensor, step: int) -> None:
    """Before a training forward: every need_every steps, measure the benefit on the batch's first rows and
    hand it to each need head as the target of that forward (the rest of the batch trains as usual)."""
    routers = need_routers(model)
    cfg = model.config
    if not routers or (step - 1) % cfg.need_every:
        return
    rows = max(1, math.ceil(cfg.need_fraction * x_BT.shape[0]))
    target_N = need_of(token_benefit(model, x_BT[:rows], y_BT[:rows]))
    for router in routers:
        router.need_target_N = target_N
