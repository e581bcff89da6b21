"""Warm-up from dense routing: the controller's target (or a static router's k) starts at k_max, holds, then falls
to target_k (top_k); DTop-p's controller on the threshold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynamoe.checkpoint import latest_checkpoint, load_model
from dynamoe.config import tiny, with_dense_warmup
from dynamoe.errors import DynamoeError
from dynamoe.model.router import MIN_THRESHOLD, build_router
from dynamoe.train import TrainConfig, train


def test_target_holds_at_k_max_then_falls_linearly_to_target_k() -> None:
    router = build_router(tiny(router="dynamic", k_max=8, target_k=3.0, target_k_hold_steps=2, target_k_decay_steps=4))
    aimed = []
    for _ in range(8):
        aimed.append(float(router.aimed_k()))
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
        assert (float(decaying.aimed_k()), float(holding.aimed_k())) == pytest.approx((expected_decaying, expected_holding))
        decaying.update_controller(3.0)
        holding.update_controller(3.0)


def test_only_a_scheduled_router_carries_a_step_count() -> None:
    assert "controller_steps" not in dict(build_router(tiny(router="dynamic")).named_buffers())
    assert build_router(tiny(router="dynamic")).aimed_k() == 3.0
    assert build_router(tiny(router="topk")).aimed_k() == 2.0  # a static router without a warm-up: its top_k
    assert float(build_router(tiny(router="topk", target_k_decay_steps=5)).aimed_k()) == 8.0  # warming up from k_max
    for router in ("relu", "topk", "dtopp"):
        assert "controller_steps" in dict(build_router(tiny(router=router, target_k_decay_steps=5)).named_buffers())
    assert "controller_steps" not in dict(build_router(tiny(router="topk")).named_buffers())


@pytest.mark.parametrize("field", ["target_k_hold_steps", "target_k_decay_steps"])
@pytest.mark.parametrize("value", [-1, 2.5])
def test_schedule_lengths_must_be_whole_and_non_negative(field: str, value: float) -> None:
    with pytest.raises(DynamoeError, match=f"{field}=.*must be (integers >= 0|an integer)"):
        tiny(**{field: value})


@pytest.mark.parametrize("router", ["dynamic", "topk", "dtopp"])
def test_schedule_survives_checkpoint_and_resume(router: str, tiny_corpus: Path, tmp_path: Path) -> None:
    # Stopped at step 3, in the middle of the fall (hold 2 steps, fall over 4), then resumed to step 6.
    cfg = tiny(router=router, target_k=2.0, top_k=2, target_k_hold_steps=2, target_k_decay_steps=4)

    def run(out: Path, steps: int, resume: bool = False) -> Path:
        settings = TrainConfig(data_dir=tiny_corpus, out_dir=out, steps=steps, batch_size=4, warmup_steps=1,
                               decay_steps=6, save_every=3, eval_batches=0, progress=False)
        train(cfg, settings, resume=resume)
        checkpoint = latest_checkpoint(out)
        assert checkpoint is not None
        return checkpoint

    halfway, _ = load_model(run(tmp_path / "resumed", 3), torch.device("cpu"))
    assert [int(r.controller_steps) for r in halfway.routers()] == [3, 3]
    assert float(halfway.routers()[0].aimed_k()) == pytest.approx(8.0 - (8.0 - 2.0) / 4)
    resumed, _ = load_model(run(tmp_path / "resumed", 6, resume=True), torch.device("cpu"))
    straight, _ = load_model(run(tmp_path / "straight", 6), torch.device("cpu"))
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [float(r.aimed_k()) for r in resumed.routers()] == [2.0, 2.0]


def test_static_router_steps_down_from_k_max_to_top_k_one_whole_expert_at_a_time() -> None:
    router = build_router(tiny(router="topk", top_k=2, k_max=8, target_k_hold_steps=2, target_k_decay_steps=4))
    h_TD = torch.randn(10, tiny().dim, generator=torch.Generator().manual_seed(0))
    ks = []
    for _ in range(8):
        routing = router(h_TD)
        assert routing.experts_TK.shape == (10, 8)  # k_max slots; those past k are padding
        assert torch.all(routing.weights_TK[~routing.mask_TK] == 0)
        torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(10))
        ks.append(int(routing.k_T[0]))
        router.update_controller(routing.stats["mean_k"])
    # Held at 8 for two steps, then 8 - 6 * (1, 2, 3, 4) / 4 = 6.5, 5, 3.5, 2, rounded half up.
    assert ks == [8, 8, 8, 7, 5, 4, 2, 2]
    router.update_controller(2.0, applied=torch.tensor(False))  # a skipped optimizer step does not count
    assert int(router.controller_steps) == 8


def test_warm_static_router_routes_as_the_cold_one_at_inference_and_in_training() -> None:
    cold = build_router(tiny(router="topk", top_k=2)).eval()
    warm = build_router(tiny(router="topk", top_k=2, target_k_decay_steps=3)).eval()
    warm.load_state_dict({**cold.state_dict(), "controller_steps": torch.tensor(3)})  # past its warm-up
    h_TD = torch.randn(10, tiny().dim)
    a, b = cold(h_TD), warm(h_TD)  # inference: the same operations once the warm-up's k is read
    assert all(torch.equal(x, y) for x, y in ((a.k_T, b.k_T), (a.experts_TK, b.experts_TK), (a.weights_TK, b.weights_TK)))
    trained = warm.train()(h_TD)  # training: k_max slots, the padding ones weighted 0
    assert trained.experts_TK.shape == (10, 8) and torch.equal(trained.experts_TK[:, :2], a.experts_TK)
    torch.testing.assert_close(trained.weights_TK[:, :2], a.weights_TK, rtol=0, atol=1e-7)
    assert torch.all(trained.weights_TK[:, 2:] == 0)


def test_dtopp_controller_moves_the_threshold_toward_the_target_and_keeps_it_in_range() -> None:
    router = build_router(tiny(router="dtopp", target_k=3.0, threshold=0.5, controller_kp=0.03, controller_ki=0.003))
    assert float(router.routing_threshold) == 0.5  # the configured threshold to start with
    router.update_controller(5.0)  # too many experts: the threshold falls
    assert float(router.routing_threshold) == pytest.approx(0.5 - 0.003 * 2 - 0.03 * 2)
    for _ in range(3):
        router.update_controller(3.0)  # on target: the integral holds, the proportional term is gone
    assert float(router.routing_threshold) == pytest.approx(0.5 - 0.003 * 2)
    router.update_controller(1.0)  # too few: it rises
    assert float(router.routing_threshold) > 0.5 - 0.003 * 2
    for _ in range(2000):
        router.update_controller(8.0)
    assert float(router.routing_threshold) == pytest.approx(MIN_THRESHOLD)  # never 0 or below
    for _ in range(2000):
        router.update_controller(1.0)
    assert float(router.routing_threshold) == 1.0  # never above 1
    # Anti-windup: after the long saturation at 1, one step on target leaves the threshold at the top of its range.
    router.update_controller(3.0)
    assert float(router.threshold_integral) == pytest.approx(0.5 - 1.0)


def test_dtopp_selects_by_its_threshold_on_normalised_logits_and_follows_the_model_mean() -> None:
    cfg = tiny(router="dtopp", target_k=3.0, n_experts=8, k_max=8)
    router = build_router(cfg)
    h_TD = torch.randn(50, cfg.dim)
    for threshold, expected_k in ((1.0, 8), (MIN_THRESHOLD, 1)):
        router.routing_threshold.fill_(threshold)
        assert torch.all(router(h_TD).k_T == expected_k)
    router.logit_norm.weight.data.fill_(3.0)  # a sharper layer runs fewer experts at the same threshold
    router.routing_threshold.fill_(0.5)
    sharp = router(h_TD).k_T.float().mean()
    router.logit_norm.weight.data.fill_(0.3)
    assert router(h_TD).k_T.float().mean() > sharp
    assert router.follows_model_mean and "k_penalty" not in dict(router.named_buffers())


def test_relu_penalty_never_becomes_a_reward_on_its_unbounded_cost() -> None:
    settings = dict(target_k=3.0, controller_kp=0.1, controller_ki=0.01, target_k_hold_steps=5)
    relu, dynamic = build_router(tiny(router="relu", **settings)), build_router(tiny(router="dynamic", **settings))
    for _ in range(5):  # below the k_max target: the soft-k routers' penalty turns into a reward, ReLU's stays at 0
        relu.update_controller(4.0)
        dynamic.update_controller(4.0)
    assert float(relu.k_penalty) == float(relu.k_penalty_integral) == 0.0 and float(dynamic.k_penalty) < 0
    relu.update_controller(5.0)  # the target is now 3: too many experts, penalised at once (no wound-up reward)
    assert float(relu.k_penalty) == pytest.approx(0.01 * 2 + 0.1 * 2)


def test_with_dense_warmup_splits_its_share_of_the_steps_and_leaves_dense_models_alone() -> None:
    for router in ("dynamic", "topp", "relu", "dtopp", "topk"):
        warmed = with_dense_warmup(tiny(router=router, target_k=3.0), steps=300, fraction=0.6)
        assert (warmed.target_k_hold_steps, warmed.target_k_decay_steps) == (90, 90)
    for unchanged in (tiny(ffn="dense"), tiny(router="dynamic", target_k=None)):
        assert with_dense_warmup(unchanged, steps=300, fraction=0.6) == unchanged
    with pytest.raises(DynamoeError, match="warming up from k_max=4 needs top_k=6 <= k_max"):
        tiny(router="topk", top_k=6, k_max=4, target_k_decay_steps=3)


def test_relu_router_goes_without_the_z_loss_that_would_switch_its_experts_off() -> None:
    h_TD = torch.randn(16, tiny().dim, generator=torch.Generator().manual_seed(0))
    for name, has_z_loss in (("relu", False), ("dynamic", True)):
        losses = []
        for z_loss_coef in (0.0, 1.0):
            torch.manual_seed(0)  # the same gate weights for both coefficients
            routing = build_router(tiny(router=name, target_k=3.0, z_loss_coef=z_loss_coef))(h_TD)
            losses.append(routing.aux_loss.item())
        assert (losses[0] != losses[1]) == has_z_loss and ("z_loss" in routing.stats) == has_z_loss
