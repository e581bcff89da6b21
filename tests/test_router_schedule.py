"""Warm-up from dense routing: the controller's target starts at k_max, holds, then falls to target_k."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynamoe.checkpoint import latest_checkpoint, load_model
from dynamoe.config import tiny, with_dense_warmup
from dynamoe.errors import DynamoeError
from dynamoe.model.router import build_router
from dynamoe.train import TrainConfig, train


def test_target_holds_at_k_max_then_falls_linearly_to_target_k() -> None:
    router = build_router(tiny(router="dynamic", k_max=8, target_k=3.0, target_k_hold_steps=2, target_k_decay_steps=4))
    aimed = []
    for _ in range(8):
        aimed.append(router.aimed_k())
        router.update_controller(5.0)
    assert aimed == pytest.approx([8.0, 8.0, 8.0, 6.75, 5.5, 4.25, 3.0, 3.0])


def test_controller_aims_at_the_scheduled_target() -> None:
    settings = dict(router="dynamic", target_k=3.0, controller_kp=0.1, controller_ki=0.01)
    scheduled = build_router(tiny(**settings, target_k_decay_steps=10))
    plain = build_router(tiny(**settings))
    scheduled.update_controller(8.0)  # on the k_max target: no penalty
    assert float(scheduled.k_penalty) == 0.0
    scheduled.update_controller(6.0)  # the target is now 7.5: too few experts, so the penalty turns into a reward
    plain.update_controller(6.0)  # while the plain controller, aiming at 3, penalises the same k
    assert float(scheduled.k_penalty) == pytest.approx(0.01 * -1.5 + 0.1 * -1.5)
    assert float(plain.k_penalty) == pytest.approx(0.01 * 3 + 0.1 * 3)


def test_decay_without_hold_and_hold_without_decay() -> None:
    decaying = build_router(tiny(router="topp", k_max=8, target_k=3.0, target_k_decay_steps=2))
    holding = build_router(tiny(router="dynamic", k_max=8, target_k=3.0, target_k_hold_steps=2))
    for expected_decaying, expected_holding in [(8.0, 8.0), (5.5, 8.0), (3.0, 3.0), (3.0, 3.0)]:
        assert (decaying.aimed_k(), holding.aimed_k()) == pytest.approx((expected_decaying, expected_holding))
        decaying.update_controller(3.0)
        holding.update_controller(3.0)


def test_only_a_scheduled_router_carries_a_step_count() -> None:
    assert "controller_steps" not in dict(build_router(tiny(router="dynamic")).named_buffers())
    assert build_router(tiny(router="dynamic")).aimed_k() == 3.0
    assert build_router(tiny(router="topk", target_k_decay_steps=5)).aimed_k() is None  # no controller at all
    assert "controller_steps" in dict(build_router(tiny(router="relu", target_k_decay_steps=5)).named_buffers())


@pytest.mark.parametrize("field", ["target_k_hold_steps", "target_k_decay_steps"])
@pytest.mark.parametrize("value", [-1, 2.5])
def test_schedule_lengths_must_be_whole_and_non_negative(field: str, value: float) -> None:
    with pytest.raises(DynamoeError, match=f"{field}=.*must be (integers >= 0|an integer)"):
        tiny(**{field: value})


def test_schedule_survives_checkpoint_and_resume(tiny_corpus: Path, tmp_path: Path) -> None:
    cfg = tiny(router="dynamic", target_k=2.0, target_k_hold_steps=2, target_k_decay_steps=4)

    def run(out: Path, steps: int, resume: bool = False) -> Path:
        settings = TrainConfig(data_dir=tiny_corpus, out_dir=out, steps=steps, batch_size=4, warmup_steps=1,
                               decay_steps=6, save_every=3, eval_batches=0, progress=False)
        train(cfg, settings, resume=resume)
        checkpoint = latest_checkpoint(out)
        assert checkpoint is not None
        return checkpoint

    halfway, _ = load_model(run(tmp_path / "resumed", 3), torch.device("cpu"))
    assert [int(r.controller_steps) for r in halfway.routers()] == [3, 3]
    assert halfway.routers()[0].aimed_k() == pytest.approx(8.0 - (8.0 - 2.0) / 4)
    resumed, _ = load_model(run(tmp_path / "resumed", 6, resume=True), torch.device("cpu"))
    straight, _ = load_model(run(tmp_path / "straight", 6), torch.device("cpu"))
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [r.aimed_k() for r in resumed.routers()] == [2.0, 2.0]


def test_relu_penalty_never_becomes_a_reward_on_its_unbounded_cost() -> None:
    settings = dict(target_k=3.0, controller_kp=0.1, controller_ki=0.01, target_k_hold_steps=5)
    relu, dynamic = build_router(tiny(router="relu", **settings)), build_router(tiny(router="dynamic", **settings))
    for _ in range(5):  # below the k_max target: the soft-k routers' penalty turns into a reward, ReLU's stays at 0
        relu.update_controller(4.0)
        dynamic.update_controller(4.0)
    assert float(relu.k_penalty) == float(relu.k_penalty_integral) == 0.0 and float(dynamic.k_penalty) < 0
    relu.update_controller(5.0)  # the target is now 3: too many experts, penalised at once (no wound-up reward)
    assert float(relu.k_penalty) == pytest.approx(0.01 * 2 + 0.1 * 2)


def test_with_dense_warmup_splits_its_share_of_the_steps_and_leaves_static_models_alone() -> None:
    for router in ("dynamic", "topp", "relu"):
        warmed = with_dense_warmup(tiny(router=router, target_k=3.0), steps=300, fraction=0.6)
        assert (warmed.target_k_hold_steps, warmed.target_k_decay_steps) == (90, 90)
    for static in (tiny(router="topk"), tiny(ffn="dense"), tiny(router="dynamic", target_k=None)):
        assert with_dense_warmup(static, steps=300, fraction=0.6) == static


def test_relu_router_goes_without_the_z_loss_that_would_switch_its_experts_off() -> None:
    h_TD = torch.randn(16, tiny().dim, generator=torch.Generator().manual_seed(0))
    for name, has_z_loss in (("relu", False), ("dynamic", True)):
        losses = []
        for z_loss_coef in (0.0, 1.0):
            torch.manual_seed(0)  # the same gate weights for both coefficients
            routing = build_router(tiny(router=name, target_k=3.0, z_loss_coef=z_loss_coef))(h_TD)
            losses.append(routing.aux_loss.item())
        assert (losses[0] != losses[1]) == has_z_loss and ("z_loss" in routing.stats) == has_z_loss
