"""Routers: each decides, per token, which experts run, with what weight, and how many.

All routers return one `Routing`. Shape legend: T tokens, D model dim, E experts, K routing slots
(k_max for variable-k routers, top_k for the static one); slots j >= k_T[t] are padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe.config import ModelConfig
from dynamoe.model.layers import Projection
from dynamoe.errors import DynamoeError

SOFT_K_SHARPNESS = 0.05  # width of the sigmoid that turns "mass before expert j < threshold" into a soft count


@dataclass
class Routing:
    """What a router decided for a flat batch of tokens."""

    experts_TK: torch.Tensor  # int64 expert ids, most probable first
    weights_TK: torch.Tensor  # combine weights, 0 in padding slots
    k_T: torch.Tensor  # int64 experts used per token
    aux_loss: torch.Tensor  # scalar: balance + z-loss + compute penalty, added to the LM loss
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging

    @property
    def mask_TK(self) -> torch.Tensor:
        """True where a slot holds a selected expert."""
        slots = torch.arange(self.experts_TK.shape[1], device=self.k_T.device)
        return slots[None, :] < self.k_T[:, None]


Selection = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 if it is in a narrower float type (a Python check: no kernel call on the fp32 path)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Router(nn.Module):
    """Shared machinery: the gate, balance and z losses, the compute controller and the warm-up schedule."""

    uses_controller = True
    # Whether the controller may turn the penalty into a reward (below target). Only for a bounded cost:
    # a reward on an unbounded one (ReLU's sum of gates) would grow the gates without limit.
    penalty_may_reward = True
    # The z-loss keeps softmax logits small. On ReLU gates it would push every logit below zero and switch
    # experts off whatever the controller aims at, so that router goes without it, as ReMoE does.
    uses_z_loss = True
    # Whether the controller follows the whole model's mean k (one global budget) rather than its layer's.
    follows_model_mean = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.k_min, self.k_max = cfg.n_experts, cfg.k_min, cfg.k_max
        self.threshold = cfg.threshold
        self.balance_coef, self.z_loss_coef = cfg.balance_coef, cfg.z_loss_coef
        self.gate = Projection(cfg.dim, cfg.n_experts)
        # Under data parallelism, dynamoe.parallel sets this to sum the per-expert counts over every rank,
        # so that the balance loss sees the global batch, as one process training on it would.
        self.reduce_expert_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.target_k = cfg.target_k if self.uses_controller else None
        # Where the warm-up from dense routing ends: the controller's target, or the static router's top_k.
        self.final_k = self.target_k if self.uses_controller else float(cfg.top_k)
        if self.target_k is not None:
            self.controller_kp, self.controller_ki, self.controller_limit = cfg.controller_kp, cfg.controller_ki, cfg.controller_limit
            self.register_controller_state(cfg)
        self.target_k_hold_steps, self.target_k_decay_steps = cfg.target_k_hold_steps, cfg.target_k_decay_steps
        if self.has_target_schedule:  # only then: the state dicts of models without a schedule stay as they were
            # Optimizer steps applied so far, counted on the device so that no step waits for the host.
            self.register_buffer("controller_steps", torch.zeros((), dtype=torch.long))

    def register_controller_state(self, cfg: ModelConfig) -> None:
        """The penalty on the differentiable measure of k and its integral; buffers, so checkpoints carry the controller."""
        self.register_buffer("k_penalty", torch.zeros(()))
        self.register_buffer("k_penalty_integral", torch.zeros(()))

    @property
    def has_target_schedule(self) -> bool:
        """True when the router warms up from dense routing (its k, or its controller's target, starts at k_max)."""
        return self.final_k is not None and self.target_k_hold_steps + self.target_k_decay_steps > 0

    def aimed_k(self) -> torch.Tensor | float | None:
        """The mean k the next step aims at: k_max during the hold, then linearly down to final_k.

        Scheduled, it is a float64 tensor computed on the device from the step count, in the same operations
        Python's floats would take, so a training reads nothing back to the host for it.
        """
        if not self.has_target_schedule:
            return self.final_k
        assert self.final_k is not None
        past_hold = (self.controller_steps - self.target_k_hold_steps).double()
        decay = self.target_k_decay_steps
        fraction = (past_hold / decay).clamp(max=1.0) if decay else torch.ones_like(past_hold)
        return torch.where(past_hold < 0, float(self.k_max), self.k_max + fraction * (self.final_k - self.k_max))

    def select(self, h_TD: torch.Tensor, logits_TE: torch.Tensor, threshold_T: torch.Tensor | None) -> Selection:
        """Return experts_TK, weights_TK, k_T, the probabilities used for balancing, and the soft cost.

        threshold_T: each token's routing threshold (the compute dial), for the routers that have one;
        None routes every token with the router's own (trained) threshold.
        """
        raise NotImplementedError

    def forward(self, h_TD: torch.Tensor, threshold_T: torch.Tensor | None = None) -> Routing:
        # At least fp32: the softmax and the cumulative sums decide k and are precision-sensitive.
        logits_TE = at_least_fp32(self.gate(h_TD))
        experts_TK, weights_TK, k_T, probs_TE, cost_T = self.select(h_TD, logits_TE, threshold_T)
        routing = Routing(experts_TK, weights_TK.type_as(h_TD), k_T, torch.zeros((), device=h_TD.device))
        if torch.is_grad_enabled():  # losses and statistics only matter for training; decoding skips their cost
            routing.stats["mean_k"] = k_T.float().mean().detach()
            routing.aux_loss = self.aux_loss(routing, logits_TE, probs_TE, cost_T)
        return routing

    def aux_loss(self, routing: Routing, logits_TE: torch.Tensor, probs_TE: torch.Tensor, cost_T: torch.Tensor | None) -> torch.Tensor:
        """Balance loss + z-loss (if used) + the controller's penalty on the soft cost; records each in routing.stats."""
        balance = self.balance_loss(routing, probs_TE)
        routing.stats["balance_loss"] = balance.detach()
        aux = self.balance_coef * balance
        if self.uses_z_loss:
            z_loss = torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
            routing.stats["z_loss"] = z_loss.detach()
            aux = aux + self.z_loss_coef * z_loss
        if cost_T is not None:
            cost = cost_T.mean()
            routing.stats["soft_k"] = cost.detach()
            if self.target_k is not None:
                aux = aux + self.k_penalty * cost
        return aux

    def balance_loss(self, routing: Routing, probs_TE: torch.Tensor) -> torch.Tensor:
        """Switch-style loss over the selected pairs, so it stays meaningful when k varies per token."""
        # scatter_add_ on the mask rather than bincount of the selected ids: no host synchronisation.
        counts_E = torch.zeros(self.n_experts, device=probs_TE.device, dtype=probs_TE.dtype).scatter_add_(
            0, routing.experts_TK.flatten(), routing.mask_TK.flatten().to(probs_TE.dtype))
        if self.reduce_expert_counts is not None:
            counts_E = self.reduce_expert_counts(counts_E)
        share_E = counts_E / counts_E.sum().clamp(min=1.0)
        return self.n_experts * (share_E * probs_TE.mean(0)).sum()

    @torch.no_grad()
    def update_controller(self, mean_k: torch.Tensor | float, applied: torch.Tensor | bool = True) -> None:
        """One step of the controller and of the warm-up schedule, from the step's measured mean k; nothing
        changes when `applied` is false (a skipped optimizer step). Tensors in, tensors out: no host sync."""
        device = self.gate.weight.device
        applied = torch.as_tensor(applied, device=device)
        if self.target_k is not None:
            aimed_k = self.aimed_k()
            assert aimed_k is not None
            self.step_controller(torch.as_tensor(mean_k, dtype=torch.float64, device=device) - aimed_k, applied)
        if self.has_target_schedule:
            self.controller_steps += applied

    def step_controller(self, error: torch.Tensor, applied: torch.Tensor) -> None:
        """The PI controller on the k penalty: up while too many experts run, down while too few.

        Under Adam the router moves at about the same speed whatever the penalty's size, so k responds
        to the penalty like an integrator; an integral term alone then oscillates, and the proportional
        term damps it. The integral is bounded, so an unreachable target cannot wind it up. The terms are
        rounded to float32 before they meet the buffers, exactly as Python floats added to them would be.
        """
        limit, floor = self.controller_limit, -self.controller_limit if self.penalty_may_reward else 0.0
        integral = (self.k_penalty_integral + (self.controller_ki * error).float()).clamp(floor, limit)
        penalty = (integral + (self.controller_kp * error).float()).clamp(min=floor)
        self.k_penalty_integral.copy_(torch.where(applied, integral, self.k_penalty_integral))
        self.k_penalty.copy_(torch.where(applied, penalty, self.k_penalty))


class TopKRouter(Router):
    """Static top-k softmax routing, renormalised over the chosen experts (Mixtral) or not (Qwen-MoE, OLMoE default).

    Renormalising the top-k probabilities equals a softmax over the chosen experts' logits. Warmed up from
    dense routing (target_k_hold_steps, target_k_decay_steps), it runs k_max experts, then steps down to top_k
    along the adaptive routers' schedule, rounded to whole experts.
    """

    uses_controller = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.top_k, self.renormalize = cfg.top_k, cfg.renormalize_topk

    def current_k(self) -> torch.Tensor | int:
        """Experts per token now: top_k, or the warm-up's k (a tensor on the device)."""
        aimed_k = self.aimed_k()
        return torch.floor(aimed_k + 0.5).long() if isinstance(aimed_k, torch.Tensor) else self.top_k

    def select(self, h_TD: torch.Tensor, logits_TE: torch.Tensor, threshold_T: torch.Tensor | None) -> Selection:
        probs_TE = logits_TE.softmax(dim=-1)
        T, k = h_TD.shape[0], self.current_k()
        if isinstance(k, torch.Tensor) and not self.training:
            k = int(k)  # inference reads the warm-up's k once: then the static router's own operations
        if isinstance(k, int):
            weights_TK, experts_TK = probs_TE.topk(k, dim=-1)
            k_T = torch.full((T,), k, dtype=torch.long, device=h_TD.device)
        else:  # training: k_max slots, those past k padding, so that no step waits for the host
            weights_TK, experts_TK = probs_TE.topk(self.k_max, dim=-1)
            weights_TK = weights_TK * (torch.arange(self.k_max, device=k.device) < k)
            k_T = k.expand(T)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return experts_TK, weights_TK, k_T, probs_TE, None


def check_threshold(threshold: float) -> None:
    """Raise DynamoeError unless threshold is a probability mass in (0, 1]."""
    # `not 0 < x <= 1` rather than `x <= 0 or x > 1`, so that NaN is rejected too.
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise DynamoeError(f"routing threshold must be in (0, 1] (the probability mass the selected experts "
                           f"must reach; lower runs fewer experts), got {threshold!r}")


def mass_before(sorted_TK: torch.Tensor) -> torch.Tensor:
    """The probability mass ranked above each slot: an exclusive cumsum, which never decreases along the slots."""
    return F.pad(sorted_TK.cumsum(-1)[:, :-1], (1, 0))


def chosen_slots(mass_before_TK: torch.Tensor, threshold: float | torch.Tensor, k_min: int) -> torch.Tensor:
    """The slots a threshold router keeps: those whose mass before is below the threshold, and the first k_min.

    threshold: one for every token, or a (T, 1) column with each token's own.
    """
    chosen_TK = mass_before_TK < threshold
    if k_min > 1:
        chosen_TK[:, :k_min] = True
    return chosen_TK


def nucleus(probs_TE: torch.Tensor, k_max: int, threshold: float | torch.Tensor, k_min: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-p selection: the k_max most probable experts (sorted_TK, experts_TK), the mass ranked above each, and
    the chosen slots, a prefix of each row: the smallest set whose mass reaches the threshold, within [k_min, k_max]."""
    sorted_TK, experts_TK = probs_TE.topk(k_max, dim=-1)
    # An expert is needed while the mass before it is still below the threshold. The exclusive cumsum
    # never decreases (unlike cumsum - sorted, after rounding), so the needed slots are a prefix of
    # length k: the first always (a threshold is > 0), at most k_max, and no clamp or second mask to
    # compute, which counts when decoding pays per kernel call.
    mass_before_TK = mass_before(sorted_TK)
    return sorted_TK, experts_TK, mass_before_TK, chosen_slots(mass_before_TK, threshold, k_min)


class TopPRouter(Router):
    """Smallest set of top experts whose probability mass reaches the threshold (Huang et al. 2024)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        # Straight-through selection (off by default; retrofit turns it on): the forward pass keeps the
        # hard choice, the backward pass takes the gradient of the soft one, so a loss that needs a
        # chosen expert can push its token towards keeping it (a flatter temperature).
        self.straight_through = False
        self.static_weights, self.renormalize = cfg.static_weights, cfg.renormalize_topk

    def temperature(self, h_TD: torch.Tensor) -> torch.Tensor | float:
        """Softmax temperature per token; fixed at 1 here."""
        return 1.0

    def select(self, h_TD: torch.Tensor, logits_TE: torch.Tensor, threshold_T: torch.Tensor | None) -> Selection:
        probs_TE = (logits_TE / self.temperature(h_TD)).softmax(dim=-1)
        threshold = self.threshold if threshold_T is None else threshold_T[:, None].to(probs_TE.dtype)
        sorted_TK, experts_TK, mass_before_TK, chosen_TK = nucleus(probs_TE, self.k_max, threshold, self.k_min)
        k_T = chosen_TK.sum(-1)
        soft_k_T = None
        if torch.is_grad_enabled():  # only the training loss uses it
            soft_chosen_TK = torch.sigmoid((threshold - mass_before_TK) / SOFT_K_SHARPNESS)
            soft_k_T = soft_chosen_TK.sum(-1)
            if self.straight_through:
                chosen_TK = chosen_TK + (soft_chosen_TK - soft_chosen_TK.detach())
        kept_TK = sorted_TK * chosen_TK
        if not self.static_weights:
            weights_TK = kept_TK / kept_TK.sum(-1, keepdim=True)
        else:  # what a static top-k_max model gives these experts: a retrofitted model then changes only k
            weights_TK = kept_TK / sorted_TK.sum(-1, keepdim=True) if self.renormalize else kept_TK
        return experts_TK, weights_TK, k_T, probs_TE, soft_k_T


class DynamicRouter(TopPRouter):
    """Top-p routing with a learned per-token temperature: sharp means 1-2 experts, flat up to k_max."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.temperature_min, self.temperature_max = cfg.temperature_min, cfg.temperature_max
        self.temperature_head = nn.Linear(cfg.dim, 1)
        # Adam moves every weight by about lr per step whatever the gradient's size, so a plain linear
        # head would shift the temperature by ~lr * sqrt(dim) * |h| per step and k would swing between
        # 1 and k_max. Scaling the head's input by 1/sqrt(dim) makes that shift ~lr * |h_i|.
        self.temperature_input_scale = cfg.dim ** -0.5
        self.temperature_scale = 1.0  # inference-time dial: >1 flattens (more experts), <1 sharpens

    def reset_temperature_head(self) -> None:
        """Start at temperature 1 for every token."""
        nn.init.zeros_(self.temperature_head.weight)
        nn.init.constant_(self.temperature_head.bias, math.log(math.expm1(1.0 - self.temperature_min)))

    def temperature(self, h_TD: torch.Tensor) -> torch.Tensor:
        head = self.temperature_head
        # bias + scale * (h @ w): the input scaling and the head in one kernel call.
        raw_T1 = at_least_fp32(torch.addmm(head.bias, h_TD, head.weight.t(), alpha=self.temperature_input_scale))
        temperature_T1 = (F.softplus(raw_T1) + self.temperature_min).clamp(max=self.temperature_max)
        return temperature_T1 if self.temperature_scale == 1.0 else temperature_T1 * self.temperature_scale


class ReLURouter(Router):
    """ReLU gates with an L1 penalty (ReMoE): every expert with a positive gate runs, up to k_max.

    A token whose gates are all zero uses no expert (k = 0), as in ReMoE; k_min does not apply. The L1
    penalty's coefficient stays >= 0, as in ReMoE: below target the controller only relaxes it. No router
    z-loss either (see Router.uses_z_loss).
    """

    penalty_may_reward = False
    uses_z_loss = False

    def select(self, h_TD: torch.Tensor, logits_TE: torch.Tensor, threshold_T: torch.Tensor | None) -> Selection:
        gates_TE = F.relu(logits_TE)
        weights_TK, experts_TK = gates_TE.topk(self.k_max, dim=-1)
        k_T = (weights_TK > 0).sum(-1)
        probs_TE = gates_TE / gates_TE.sum(-1, keepdim=True).clamp(min=1e-9)
        return experts_TK, weights_TK, k_T, probs_TE, gates_TE.sum(-1)


MIN_THRESHOLD = 1e-3  # DTop-p's threshold stays in [MIN_THRESHOLD, 1]: at the floor every token runs k_min experts


class LogitNorm(nn.Module):
    """Routing logits standardised over the experts, times a learned gain: one sharpness per layer."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))  # named like a norm's gain, so that it starts at 1

    def forward(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(logits_TE, logits_TE.shape[-1:]) * self.weight


class DTopPRouter(Router):
    """DTop-p (Jin et al. 2025, arXiv 2512.13996): top-p routing whose threshold a PI controller sets toward the
    target mean k, on routing logits normalised per layer.

    One threshold serves every layer, steered by the whole model's mean k (a global budget); each layer's
    LogitNorm gain lets it learn its own sharpness under it. No penalty and no temperature head: the
    threshold alone moves k, and it is state (a buffer), not a dial. The warm-up schedule aims it at k_max
    first, as for the other adaptive routers.
    """

    follows_model_mean = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.logit_norm = LogitNorm()
        # The threshold in use, starting at the configured one: a buffer, so checkpoints carry what the controller set.
        self.register_buffer("routing_threshold", torch.tensor(float(cfg.threshold)))

    def register_controller_state(self, cfg: ModelConfig) -> None:
        """The controller's integral term; its output is the threshold itself."""
        self.register_buffer("threshold_integral", torch.zeros(()))

    def select(self, h_TD: torch.Tensor, logits_TE: torch.Tensor, threshold_T: torch.Tensor | None) -> Selection:
        # threshold_T is not read: the controller's threshold is this router's state, not a dial.
        probs_TE = self.logit_norm(logits_TE).softmax(dim=-1)
        sorted_TK, experts_TK, _, chosen_TK = nucleus(probs_TE, self.k_max, self.routing_threshold, self.k_min)
        kept_TK = sorted_TK * chosen_TK
        return experts_TK, kept_TK / kept_TK.sum(-1, keepdim=True), chosen_TK.sum(-1), probs_TE, None

    def step_controller(self, error: torch.Tensor, applied: torch.Tensor) -> None:
        """The PI controller on the threshold: down while too many experts run, up while too few, from the
        configured threshold. The integral stays within what the threshold can express (anti-windup), so a
        target it cannot reach (k_max during the hold) does not delay the fall that follows."""
        start = self.threshold
        integral = (self.threshold_integral + (self.controller_ki * error).float()).clamp(start - 1.0, start - MIN_THRESHOLD)
        threshold = (start - integral - (self.controller_kp * error).float()).clamp(MIN_THRESHOLD, 1.0)
        self.threshold_integral.copy_(torch.where(applied, integral, self.threshold_integral))
        self.routing_threshold.copy_(torch.where(applied, threshold, self.routing_threshold))


class PricedRouter(Router):
    """A router whose controller sets the price of an expert directly (k_penalty), k answering at once.

    The penalty routers' controller acts through the optimizer on a differentiable cost; here the price
    enters the choice of k itself, so a pure integral step (price_gain per expert of error) settles it
    within a few steps and no proportional term is needed.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        if self.target_k is not None:
            self.controller_kp, self.controller_ki, self.controller_limit = 0.0, cfg.price_gain, cfg.price_limit
        else:  # no controller: a fixed price of 0
            self.register_buffer("k_penalty", torch.zeros(()))


NEED_MOMENTUM = 0.1  # weight of each training step in the running mean and variance of the need scores
NEED_MEMORY = 0.98  # per step, the weight the need head's regression keeps on the tokens measured before
NEED_RIDGE = 1e-3  # the regression's ridge, relative to the mean squared feature


class NeedRouter(PricedRouter):
    """Experts by need: the gate ranks the experts, a need head decides how many.

    The head scores a token's benefit from experts (its loss at k=1 minus at k_max, measured by forced
    routing during training: dynamoe.model.need). It is a linear regression on the layer's input of the
    normal score of each benefit's rank among the tokens measured together, refit by least squares after
    every training step on all the tokens measured so far, the older ones weighted down (NEED_MEMORY): the
    benefit of one token is mostly noise (it depends on the token that comes next), which per-step
    gradient steps follow far worse than a fit on thousands of tokens. Standardised by the running mean and
    variance of the scores, a score z sets k = need_spread * z - price, rounded and clamped to
    [k_min, k_max]: one standard deviation more need, need_spread more experts, and the controller's price
    keeps the mean on target. The chosen experts' softmax weights are renormalised.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.need_spread = cfg.need_spread
        self.register_buffer("need_weight_D1", torch.zeros(cfg.dim, 1))
        self.register_buffer("need_bias", torch.zeros(1))
        # The regression's weighted sums over the measured tokens: features [h, 1] times themselves, and times
        # the target.
        self.register_buffer("need_gram", torch.zeros(cfg.dim + 1, cfg.dim + 1, dtype=torch.float64))
        self.register_buffer("need_cross", torch.zeros(cfg.dim + 1, dtype=torch.float64))
        self.register_buffer("need_moments", torch.tensor([0.0, 1.0]))  # running mean and variance of the scores
        # Slot j runs when the token's extra experts exceed j + 1/2 (k rounded), the first k_min always.
        bars_K = torch.arange(cfg.k_max, dtype=torch.float32) + 0.5
        self.register_buffer("slot_bars_K", bars_K.masked_fill(bars_K < cfg.k_min, -math.inf), persistent=False)
        self.need_target_N: torch.Tensor | None = None  # the next training forward's targets, for its first tokens
        # The last training forward's sums (of a step's last micro-batch), folded in by update_controller.
        self.batch_sums: torch.Tensor | None = None

    def need(self, h_TD: torch.Tensor) -> torch.Tensor:
        """The need score of each token, (T, 1)."""
        bias, weight_D1 = self.need_bias.type_as(h_TD), self.need_weight_D1.type_as(h_TD)
        return at_least_fp32(torch.addmm(bias, h_TD.detach(), weight_D1))

    def select(self, h_TD: torch.Tensor, logits_TE: torch.Tensor, threshold_T: torch.Tensor | None) -> Selection:
        probs_TE = logits_TE.softmax(dim=-1)  # threshold_T is not read: the need head and the price decide k
        sorted_TK, experts_TK = probs_TE.topk(self.k_max, dim=-1)
        need_T1 = self.need(h_TD)
        # k = need_spread * (need - mean) / std - price, as one multiply-add per token.
        mean, variance = self.need_moments
        scale = self.need_spread * variance.clamp(min=1e-12).rsqrt()
        extra_T1 = torch.addcmul(torch.addcmul(self.k_penalty, mean, scale).neg(), need_T1, scale)
        chosen_TK = extra_T1 > self.slot_bars_K
        kept_TK = sorted_TK * chosen_TK
        return experts_TK, kept_TK / kept_TK.sum(-1, keepdim=True), chosen_TK.sum(-1), probs_TE, None

    def forward(self, h_TD: torch.Tensor, threshold_T: torch.Tensor | None = None) -> Routing:
        routing = super().forward(h_TD, threshold_T)
        if torch.is_grad_enabled():  # training: what update_controller folds in after the step
            routing.stats.update(self.collect_sums(h_TD.detach()))
        return routing

    def collect_sums(self, h_TD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keep the batch's sums for the moments of the scores and, on a measured step, for the regression; return
        the head's loss on the measured tokens (its squared error before this step's refit)."""
        need_T = self.need(h_TD)[:, 0].double()
        count = torch.tensor(float(need_T.numel()), dtype=torch.float64, device=need_T.device)
        sums = [torch.stack([need_T.sum(), need_T.square().sum(), count])]
        target_N, self.need_target_N = self.need_target_N, None
        stats = {}
        if target_N is not None:  # a step whose benefit was measured, on its first tokens
            features_NF = F.pad(h_TD[:target_N.numel()].double(), (0, 1), value=1.0)
            sums += [(features_NF.t() @ features_NF).flatten(), features_NF.t() @ target_N.double()]
            stats["need_loss"] = (need_T[:target_N.numel()] - target_N).square().mean().float()
        self.batch_sums = torch.cat(sums)
        if self.reduce_expert_counts is not None:  # data parallel: the sums over every rank's part of the batch
            self.batch_sums = self.reduce_expert_counts(self.batch_sums)
        return stats

    @torch.no_grad()
    def update_controller(self, mean_k: torch.Tensor | float, applied: torch.Tensor | bool = True) -> None:
        """The price step; then the last training step's scores folded into the running moments and, if it was
        measured, its tokens into the regression, which is solved again. A skipped step (`applied` false) changes
        nothing; tensors in, tensors out, so no host sync."""
        super().update_controller(mean_k, applied)
        sums, self.batch_sums = self.batch_sums, None
        if sums is None:
            return
        applied = torch.as_tensor(applied, device=sums.device)
        mean, mean_square = sums[0] / sums[2], sums[1] / sums[2]
        moments = self.need_moments.lerp(torch.stack([mean, mean_square - mean ** 2]).float(), NEED_MOMENTUM)
        self.need_moments.copy_(torch.where(applied, moments, self.need_moments))
        if sums.numel() > 3:
            features = self.need_gram.shape[0]
            memory = torch.where(applied, torch.tensor(NEED_MEMORY, dtype=torch.float64, device=sums.device), 1.0)
            self.need_gram.mul_(memory).add_(sums[3:3 + features * features].view(features, features) * applied)
            self.need_cross.mul_(memory).add_(sums[3 + features * features:] * applied)
            ridge = NEED_RIDGE * self.need_gram.diagonal().mean() * torch.eye(features, dtype=torch.float64,
                                                                              device=sums.device)
            solution = torch.linalg.solve(self.need_gram + ridge, self.need_cross)
            self.need_weight_D1.copy_(solution[:-1, None])
            self.need_bias.copy_(solution[-1:])


class NullRouter(PricedRouter):
    """Null (zero-computation) experts, as AdaMoE: k_max slots, each filled by a real expert or by "no expert".

    The null experts share one learned logit per token, so a real expert runs when its logit beats the
    null's plus the price (in units of the token's logit spread, which keeps the controller's gain
    meaningful however sharp the gate is); k can fall to 0. The weights are a softmax over the slots, null
    ones included: a null slot computes nothing and scales the output down, which is how the LM loss
    tells the null logit whether a token wants more of the experts.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.null_head = nn.Linear(cfg.dim, 1)
        self.null_input_scale = cfg.dim ** -0.5  # as the dynamic router's temperature head, for the same reason

    def select(self, h_TD: torch.Tensor, logits_TE: torch.Tensor, threshold_T: torch.Tensor | None) -> Selection:
        sorted_TK, experts_TK = logits_TE.topk(self.k_max, dim=-1)
        head = self.null_head
        null_T1 = at_least_fp32(torch.addmm(head.bias, h_TD, head.weight.t(), alpha=self.null_input_scale))
        bar_T1 = null_T1.detach() + self.k_penalty * logits_TE.detach().std(dim=-1, correction=0, keepdim=True)
        chosen_TK = sorted_TK > bar_T1  # a prefix: the logits are sorted
        k_T = chosen_TK.sum(-1)
        top_T1 = torch.maximum(sorted_TK[:, :1], null_T1)  # subtracted before exp, for stability
        real_TK = (sorted_TK - top_T1).exp() * chosen_TK
        null_mass_T1 = (self.k_max - k_T[:, None]) * (null_T1 - top_T1).exp()
        weights_TK = real_TK / (real_TK.sum(-1, keepdim=True) + null_mass_T1)
        return experts_TK, weights_TK, k_T, logits_TE.softmax(dim=-1), None


ROUTER_CLASSES: dict[str, type[Router]] = {
    "topk": TopKRouter, "topp": TopPRouter, "dynamic": DynamicRouter, "relu": ReLURouter, "dtopp": DTopPRouter,
    "need": NeedRouter, "null": NullRouter,
}


def build_router(cfg: ModelConfig) -> Router:
    """The router named by cfg.router."""
    return ROUTER_CLASSES[cfg.router](cfg)
