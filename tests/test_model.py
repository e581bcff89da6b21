"""Model parity and routing behaviour on tiny configs."""

from __future__ import annotations

import pytest
import torch

from dynamoe.config import ModelConfig, preset, tiny
from dynamoe.errors import DynamoeError
from dynamoe.model import MoE, Transformer, reference_dispatch
from dynamoe.model.dispatch import (decode_dispatch, grouped_dispatch, grouped_mm_dispatch, grouped_mm_works,
                                    sort_pairs_by_expert)
from dynamoe.model.layers import DenseFFN
from dynamoe.model.router import DynamicRouter, build_router

ROUTERS = ["topk", "dynamic", "topp", "relu", "dtopp"]


def test_one_expert_moe_equals_dense_ffn() -> None:
    cfg = tiny(n_experts=1, top_k=1, k_max=1, router="topk")
    torch.manual_seed(0)
    moe, dense = MoE(cfg), DenseFFN(cfg.dim, cfg.expert_dim)
    torch.nn.init.normal_(moe.experts.w_gate_up, std=0.1)
    torch.nn.init.normal_(moe.experts.w_down, std=0.1)
    dense.w_gate_up.data.copy_(moe.experts.w_gate_up[0])
    dense.w_down.data.copy_(moe.experts.w_down[0])
    x = torch.randn(2, 5, cfg.dim)
    y_moe, routing = moe(x)
    assert torch.equal(routing.k_T, torch.ones(10, dtype=torch.long))
    torch.testing.assert_close(y_moe, dense(x), rtol=1e-5, atol=1e-6)


def test_threshold_one_with_full_k_max_selects_every_expert() -> None:
    cfg = tiny(router="dynamic", n_experts=8, k_max=8, threshold=1.0, target_k=4.0)
    router = build_router(cfg)
    routing = router(torch.randn(50, cfg.dim))
    assert torch.equal(routing.k_T, torch.full((50,), 8))
    assert torch.equal(routing.experts_TK.sort(-1).values, torch.arange(8).expand(50, 8))


@pytest.mark.parametrize("k_min", [1, 2])
def test_near_zero_temperature_selects_exactly_k_min(k_min: int) -> None:
    cfg = tiny(router="dynamic", k_min=k_min, temperature_min=1e-4, target_k=3.0)
    router: DynamicRouter = build_router(cfg)  # type: ignore[assignment]
    router.temperature_scale = 1e-3  # drives the softmax to one-hot
    torch.nn.init.normal_(router.gate.weight, std=1.0)
    routing = router(torch.randn(64, cfg.dim))
    assert torch.equal(routing.k_T, torch.full((64,), k_min))


def test_high_temperature_gives_many_experts_and_low_gives_few() -> None:
    cfg = tiny(router="dynamic", target_k=4.0, threshold=0.9)
    router: DynamicRouter = build_router(cfg)  # type: ignore[assignment]
    torch.nn.init.normal_(router.gate.weight, std=0.5)
    h = torch.randn(200, cfg.dim)
    router.temperature_scale = 0.05
    sharp = router(h).k_T.float().mean()
    router.temperature_scale = 20.0
    flat = router(h).k_T.float().mean()
    assert sharp < 2.0 < 6.0 < flat


@pytest.mark.parametrize("dispatch", [grouped_dispatch, decode_dispatch])
@pytest.mark.parametrize("router_name", ROUTERS)
def test_fast_dispatch_equals_per_token_reference(router_name: str, dispatch) -> None:
    torch.manual_seed(1)
    moe = MoE(tiny(router=router_name)).double()  # float64, so only real differences show
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(37, moe.experts.dim, dtype=torch.float64, requires_grad=True)
    routing = moe.router(x)
    fast = dispatch(x, routing, moe.experts)
    slow = reference_dispatch(x, routing, moe.experts)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    params = [x, moe.experts.w_gate_up, moe.router.gate.weight]
    grad_fast = torch.autograd.grad(fast.square().sum(), params, retain_graph=True)
    grad_slow = torch.autograd.grad(slow.square().sum(), params)
    for a, b in zip(grad_fast, grad_slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16),
                                           pytest.param("cuda", torch.bfloat16, marks=GPU)])
@pytest.mark.parametrize("router_name", ["topk", "dynamic"])
def test_grouped_mm_dispatch_equals_the_plain_path(router_name: str, device: str, dtype: torch.dtype) -> None:
    # The GPU training path (torch._grouped_mm, group ends on the device, padding slots masked) against the plain
    # per-expert loop, forward and backward: exactly in float32 (torch's CPU grouped matmul is a loop of mm),
    # within bf16's precision otherwise. Padding slots (variable k) and an expert no token chose are included.
    torch.manual_seed(5)
    moe = MoE(tiny(router=router_name, top_k=2)).to(device)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(6, moe.experts.dim, device=device, requires_grad=True)
    routing = moe.router(x)
    assert routing.k_T.min() < routing.experts_TK.shape[1] or router_name == "topk"
    assert torch.bincount(routing.experts_TK[routing.mask_TK], minlength=8).min() == 0
    plain = grouped_dispatch(x, routing, moe.experts)
    with torch.no_grad():  # the probe of the device works wherever the first call comes from
        assert grouped_mm_works(torch.device(device))
    grouped = grouped_mm_dispatch(x, routing, moe.experts, dtype)
    params = [x, moe.experts.w_gate_up, moe.experts.w_down, moe.router.gate.weight]
    weights_RD = torch.randn_like(plain)  # a loss that weighs every output
    grads = [torch.autograd.grad((y * weights_RD).sum(), params, retain_graph=True) for y in (plain, grouped)]
    exact = dtype == torch.float32
    for a, b in [(plain, grouped), *zip(*grads)]:
        scale = a.abs().max().item()
        torch.testing.assert_close(b, a, rtol=0 if exact else 0.05, atol=0 if exact else 0.03 * scale)


@pytest.mark.parametrize("router_name", ROUTERS)
def test_dispatch_runs_exactly_the_selected_pairs(router_name: str) -> None:
    torch.manual_seed(2)
    router = build_router(tiny(router=router_name))
    routing = router(torch.randn(40, 64))
    token_P, weight_P, tokens_per_expert = sort_pairs_by_expert(routing, router.n_experts)
    assert sum(tokens_per_expert) == int(routing.k_T.sum()) == token_P.numel()
    assert torch.equal(torch.bincount(token_P, minlength=40), routing.k_T)


@pytest.mark.parametrize("router_name", ["dynamic", "topp"])
def test_threshold_router_selects_smallest_set_reaching_the_mass(router_name: str) -> None:
    cfg = tiny(router=router_name, k_max=8, threshold=0.6, target_k=3.0)
    router = build_router(cfg)
    torch.nn.init.normal_(router.gate.weight, std=0.3)
    h = torch.randn(100, cfg.dim)
    routing = router(h)
    temperature = router.temperature(h)
    probs = (router.gate(h).float() / temperature).softmax(-1)
    for t in range(100):
        sorted_p = probs[t].sort(descending=True).values
        k = int(routing.k_T[t])
        assert sorted_p[:k].sum() >= 0.6 - 1e-6 or k == cfg.k_max
        assert k == 1 or sorted_p[: k - 1].sum() < 0.6
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(100))
    assert torch.all(routing.weights_TK[~routing.mask_TK] == 0)


def test_topk_router_is_mixtral_style() -> None:
    router = build_router(tiny(router="topk", top_k=2))
    h = torch.randn(30, 64)
    routing = router(h)
    probs = router.gate(h).softmax(-1)
    top_p, top_e = probs.topk(2, dim=-1)
    assert torch.equal(routing.experts_TK, top_e)
    torch.testing.assert_close(routing.weights_TK, top_p / top_p.sum(-1, keepdim=True))


def test_relu_router_uses_experts_with_positive_gates() -> None:
    router = build_router(tiny(router="relu", k_max=8, n_experts=8))
    h = torch.randn(30, 64)
    routing = router(h)
    positive = (router.gate(h) > 0).sum(-1)
    assert torch.equal(routing.k_T, positive)


def test_pi_controller_moves_penalty_toward_target_through_zero_and_stays_bounded() -> None:
    router = build_router(tiny(router="dynamic", target_k=3.0, controller_kp=0.1, controller_ki=0.01, controller_limit=0.5))
    router.update_controller(5.0)  # two experts too many: integral 0.02, plus 0.1 * 2
    assert float(router.k_penalty) == pytest.approx(0.22)
    router.update_controller(3.0)  # on target: only the integral remains
    assert float(router.k_penalty) == pytest.approx(0.02)
    for _ in range(10):
        router.update_controller(1.0)
    assert float(router.k_penalty) < 0  # too few experts: the penalty becomes a reward
    for _ in range(1000):
        router.update_controller(8.0)  # an unreachable target must not wind the integral up
    assert float(router.k_penalty_integral) == pytest.approx(0.5)
    assert float(router.k_penalty) == pytest.approx(0.5 + 0.1 * 5)


def test_static_router_has_no_controller() -> None:
    router = build_router(tiny(router="topk"))
    router.update_controller(8.0)
    assert router.target_k is None and "k_penalty" not in dict(router.named_buffers())


def test_penalty_on_soft_k_is_in_the_loss_and_trains_the_temperature() -> None:
    torch.manual_seed(4)
    router: DynamicRouter = build_router(tiny(router="dynamic", target_k=3.0))  # type: ignore[assignment]
    torch.nn.init.normal_(router.gate.weight, std=0.3)
    h = torch.randn(64, 64)
    base = router(h)
    router.k_penalty.fill_(0.5)
    penalised = router(h)
    torch.testing.assert_close(penalised.aux_loss - base.aux_loss, 0.5 * penalised.stats["soft_k"])
    (grad,) = torch.autograd.grad(penalised.aux_loss, [router.temperature_head.bias])
    assert float(grad) > 0  # a hotter softmax needs more experts: the penalty pushes the temperature down


def test_straight_through_keeps_the_choice_and_lets_the_weights_reach_it() -> None:
    torch.manual_seed(5)
    router: DynamicRouter = build_router(tiny(router="dynamic", target_k=3.0))  # type: ignore[assignment]
    torch.nn.init.normal_(router.gate.weight, std=0.3)
    torch.nn.init.normal_(router.temperature_head.weight, std=1.0)
    h = torch.randn(64, 64)
    plain = router(h)
    router.straight_through = True
    relaxed = router(h)
    assert torch.equal(relaxed.k_T, plain.k_T) and torch.equal(relaxed.experts_TK, plain.experts_TK)
    torch.testing.assert_close(relaxed.weights_TK, plain.weights_TK)
    # A loss on the combine weights now also reaches the temperature through the soft choice of k.
    probe = torch.randn_like(plain.weights_TK)
    params = [router.temperature_head.weight, router.temperature_head.bias]
    plain_grads = torch.autograd.grad((plain.weights_TK * probe).sum(), params)
    relaxed_grads = torch.autograd.grad((relaxed.weights_TK * probe).sum(), params)
    assert not torch.allclose(plain_grads[0], relaxed_grads[0])


def test_inference_skips_auxiliary_losses() -> None:
    router = build_router(tiny(router="dynamic"))
    with torch.no_grad():
        routing = router(torch.randn(8, 64))
    assert float(routing.aux_loss) == 0.0 and routing.stats == {}


@pytest.mark.parametrize("router_name", ROUTERS + ["dense"])
def test_cached_decoding_equals_full_forward(router_name: str) -> None:
    torch.manual_seed(3)
    cfg = tiny(ffn="dense") if router_name == "dense" else tiny(router=router_name)
    model = Transformer(cfg).eval().double()  # float64: rounding cannot flip a routing decision
    for router in model.routers():
        torch.nn.init.normal_(router.gate.weight, std=0.3)  # sharper gates, so k varies across tokens
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full_out = model(idx)
        full = full_out.logits
        assert len({int(k) for r in full_out.routings for k in r.k_T}) > 1 or router_name in ("topk", "dense")
        model.setup_caches(batch_size=2, max_len=cfg.max_seq_len)
        prefill = model(idx[:, :7], input_pos_T=torch.arange(7)).logits
        steps = [model(idx[:, t:t + 1], input_pos_T=torch.tensor([t])).logits for t in range(7, 12)]
        model.clear_caches()
    cached = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-9)


def test_dense_baseline_has_the_active_size_of_top_k() -> None:
    cfg = tiny(ffn="dense", top_k=2)
    model = Transformer(cfg)
    assert model.layers[0].ffn.w_down.shape == (2 * cfg.expert_dim, cfg.dim)
    assert model.routers() == []


def test_loss_includes_router_aux_losses() -> None:
    model = Transformer(tiny(router="dynamic"))
    idx = torch.randint(0, 512, (2, 16))
    out = model(idx, idx)
    assert len(out.routings) == 2
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert out.aux_loss.item() > 0


def test_config_round_trip_and_validation(tmp_path) -> None:
    cfg = tiny(router="relu", target_k=2.0)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg
    with pytest.raises(DynamoeError, match="target_k"):
        tiny(target_k=9.0)
    with pytest.raises(DynamoeError, match="cannot be reached"):
        tiny(router="dynamic", n_experts=8, threshold=0.5, target_k=4.0)
    with pytest.raises(DynamoeError, match="unknown preset"):
        preset("huge")
    with pytest.raises(DynamoeError, match="unknown model config field"):
        ModelConfig.from_dict({"dimension": 3})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DynamoeError, match="not valid JSON"):
        ModelConfig.load(tmp_path / "bad.json")
