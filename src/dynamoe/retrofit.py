"""Retrofit: make a static top-k checkpoint route dynamically without retraining its experts.

The static model's gate already ranks the experts for every token. Its dynamic twin keeps that gate,
the experts and everything else, and adds what decides *how many* experts run: a top-p rule (the
smallest set of top experts whose probability mass reaches a threshold, at most the static top_k)
and a per-token temperature head that starts at 1. Each kept expert keeps the weight the static model
gives it (dropped ones are simply left out), so at threshold 1 the twin computes exactly what the
static model does (`dynamic_twin` is tested for that).

- free mode: no training. Each layer's threshold is calibrated on held-out text, in depth order, so
  that the layer runs `target_k` experts per token on average.
- light mode: then only the temperature heads train (experts, attention and gates frozen), to match
  the static model's next-token distributions (KL), while the compute controller holds the mean k at
  the target; the thresholds are calibrated again at the end.

Shape legend: B batch, T tokens, N = B * T, V vocabulary, K k_max routing slots.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dynamoe.config import ModelConfig, requirement
from dynamoe.data import TokenDataset
from dynamoe.errors import DynamoeError
from dynamoe.model import Transformer
from dynamoe.model.router import DynamicRouter, TopPRouter, chosen_slots, mass_before

NEW_IN_TWIN = (".temperature_head.weight", ".temperature_head.bias", ".k_penalty", ".k_penalty_integral")
CALIBRATION_STEPS = 40  # bisection steps on a threshold: far below the resolution any k average needs


@dataclass(frozen=True)
class RetrofitConfig:
    """What to aim at, and the budget of the light mode."""

    target_k: float
    mode: Literal["free", "light"] = "light"
    tokens: int = 200_000  # light mode: distillation tokens (3x more did not help on the small top-8 model)
    batch_size: int = 8
    seq_len: int | None = None  # None: the model's max_seq_len
    lr: float = 3e-3
    calibration_tokens: int = 32_768  # validation tokens the thresholds are calibrated on
    straight_through: bool = True  # light mode: let the distillation loss reach the choice of k (see TopPRouter)
    seed: int = 0

    def __post_init__(self) -> None:
        need = requirement("retrofit config")
        need(self.mode in ("free", "light"), f"mode must be 'free' or 'light', got {self.mode!r}")
        need(min(self.tokens, self.batch_size, self.calibration_tokens) >= 1, "tokens, batch_size and calibration_tokens must be positive")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr} must be a positive number")


def dynamic_config(static: ModelConfig, target_k: float) -> ModelConfig:
    """The config of a static top-k model's dynamic twin: same weights plus temperature heads, at most top_k experts."""
    if static.ffn != "moe" or static.router != "topk":
        kind = "a dense model" if static.ffn != "moe" else f"a {static.router!r} router"
        raise DynamoeError(f"retrofit turns a static top-k MoE into a dynamic one, but this checkpoint has {kind}")
    if not 1 <= target_k < static.top_k:
        raise DynamoeError(f"--target-k={target_k} must be at least 1 and below the checkpoint's top_k={static.top_k}; "
                           "it is the mean number of experts per token the retrofitted model should run")
    # No balance or z-loss: the gate is frozen, and a balance loss on the temperature would fight the distillation.
    # Static weights: a chosen expert keeps the weight the static model gives it (measured on the small top-8
    # model: +1.4% perplexity at k 4.4, against +2.1% at k 4.5 when renormalising over the chosen experts).
    return dataclasses.replace(static, router="dynamic", k_min=1, k_max=static.top_k, threshold=1.0, layer_thresholds=None,
                               target_k=target_k, balance_coef=0.0, z_loss_coef=0.0, static_weights=True)


def dynamic_twin(static: Transformer, target_k: float) -> Transformer:
    """The dynamic twin of a static top-k model, sharing nothing with it; temperature 1, threshold 1."""
    twin = Transformer(dynamic_config(static.config, target_k)).to(static.tok_embeddings.weight.device)
    missing, unexpected = twin.load_state_dict(static.state_dict(), strict=False)
    new = [name for name in missing if not name.endswith(NEW_IN_TWIN)]
    if new or unexpected:  # only the temperature heads and the controller may be new
        raise DynamoeError(f"retrofit could not map the checkpoint's weights (missing {new}, unexpected {unexpected})")
    for router in twin.routers():
        assert isinstance(router, DynamicRouter)
        router.reset_temperature_head()
    return twin.eval()


@torch.no_grad()
def router_inputs(model: Transformer, tokens_BT: torch.Tensor, layer: int, batch_size: int) -> torch.Tensor:
    """(N, D) inputs of one MoE layer's router over the given text, with the thresholds now set."""
    captured: list[torch.Tensor] = []
    handle = model.routers()[layer].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        for start in range(0, tokens_BT.shape[0], batch_size):
            model(tokens_BT[start:start + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured)


@torch.no_grad()
def threshold_for_mean_k(router: TopPRouter, h_ND: torch.Tensor, target_k: float) -> float:
    """The threshold at which this router's mean k over h_ND is closest to target_k (bisection)."""
    probs_NE = (router.gate(h_ND).float() / router.temperature(h_ND)).softmax(-1)
    sorted_NK = probs_NE.topk(router.k_max, dim=-1).values
    mass_before_NK = mass_before(sorted_NK)

    def mean_k(threshold: float) -> float:  # the router's own rule
        return chosen_slots(mass_before_NK, threshold, router.k_min).sum(-1).float().mean().item()

    low, high = 0.0, 1.0  # mean_k grows with the threshold: keep mean_k(low) < target <= mean_k(high)
    for _ in range(CALIBRATION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_k(middle) < target_k else (low, middle)
    # k is a step function of the threshold: take the closer side of the step (a threshold must be > 0).
    return min([t for t in (high, low) if t > 0], key=lambda t: abs(mean_k(t) - target_k))


def calibrate_thresholds(model: Transformer, tokens_BT: torch.Tensor, target_k: float, batch_size: int = 8) -> list[float]:
    """Set each MoE layer's threshold, in depth order, so that it runs target_k experts per token on this text."""
    thresholds = []
    for layer, router in enumerate(model.threshold_routers()):
        h_ND = router_inputs(model, tokens_BT, layer, batch_size)  # earlier layers already calibrated
        threshold = threshold_for_mean_k(router, h_ND, target_k)
        router.threshold = threshold
        thresholds.append(threshold)
    return thresholds


def distill_temperature_heads(student: Transformer, teacher: Transformer, data: TokenDataset, cfg: RetrofitConfig,
                              seq_len: int, progress: bool = True) -> list[dict[str, float]]:
    """Light mode: train only the temperature heads to match the teacher's distributions (KL) at the target mean k."""
    device = student.tok_embeddings.weight.device
    heads = [p for name, p in student.named_parameters() if ".temperature_head." in name]
    for param in student.parameters():
        param.requires_grad_(False)
    for param in heads:
        param.requires_grad_(True)
    for router in student.threshold_routers():
        router.straight_through = cfg.straight_through
    optimizer = torch.optim.AdamW(heads, lr=cfg.lr, weight_decay=0.0)
    steps = max(1, cfg.tokens // (cfg.batch_size * seq_len))
    history = []
    student.train()
    for step in tqdm(range(steps), desc="retrofit", disable=not progress):
        x_BT, _ = data.batch(step, cfg.batch_size, seq_len, cfg.seed)
        x_BT = x_BT.to(device)
        with torch.no_grad():
            teacher_logp_NV = F.log_softmax(teacher(x_BT).logits.flatten(0, 1).float(), dim=-1)
        out = student(x_BT)
        student_logp_NV = F.log_softmax(out.logits.flatten(0, 1).float(), dim=-1)
        kl = F.kl_div(student_logp_NV, teacher_logp_NV, log_target=True, reduction="batchmean")
        (kl + sum(r.aux_loss for r in out.routings)).backward()  # aux: the controller's penalty on the soft k
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean_k = torch.stack([r.stats["mean_k"] for r in out.routings]).tolist()
        student.update_controllers(mean_k)
        history.append({"step": step + 1, "kl": kl.item(), "mean_k": sum(mean_k) / len(mean_k)})
    student.eval()
    for param in student.parameters():
        param.requires_grad_(True)
    for router in student.threshold_routers():
        router.straight_through = False
    return history


def calibration_windows(data: TokenDataset, cfg: RetrofitConfig, seq_len: int) -> torch.Tensor:
    """(B, T) validation windows: the same text for every calibration."""
    rows = max(1, cfg.calibration_tokens // seq_len)
    x_BT, _ = data.batch(0, rows, seq_len, cfg.seed)
    return x_BT


def retrofit(static: Transformer, data_dir: Path, cfg: RetrofitConfig, progress: bool = True) -> tuple[Transformer, dict]:
    """The dynamic twin of `static`, calibrated (and in light mode distilled) on a built corpus; plus a log of what ran."""
    seq_len = cfg.seq_len or static.config.max_seq_len
    if seq_len > static.config.max_seq_len:
        raise DynamoeError(f"--seq-len={seq_len} exceeds the checkpoint's max_seq_len={static.config.max_seq_len}")
    val = TokenDataset(Path(data_dir), "val")
    val.check_window(seq_len)
    device = static.tok_embeddings.weight.device
    calibration_BT = calibration_windows(val, cfg, seq_len).to(device)
    student = dynamic_twin(static, cfg.target_k)
    thresholds = calibrate_thresholds(student, calibration_BT, cfg.target_k, cfg.batch_size)
    log: dict = {"mode": cfg.mode, "target_k": cfg.target_k, "free_thresholds": thresholds}
    if cfg.mode == "light":
        train = TokenDataset(Path(data_dir), "train")
        train.check_window(seq_len)
        log["history"] = distill_temperature_heads(student, static.eval(), train, cfg, seq_len, progress)
        thresholds = calibrate_thresholds(student, calibration_BT, cfg.target_k, cfg.batch_size)
    student.set_trained_thresholds(thresholds)
    log["thresholds"] = thresholds
    return student, log
