"""Allocation by need: forced-k benefit, the need router's supervised head and price controller, null experts
that never compute, exact resumes, and the analysis of k against benefit and difficulty."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynamoe.analyze import (ANALYSIS_JSON, NEED_PNG, TokenRouting, analyse_need, analyze_checkpoint, collect,
                             level_tokens, mean_by_rank_bins, spearman, top_budget_share)
from dynamoe.checkpoint import load_model, save_checkpoint
from dynamoe.config import tiny
from dynamoe.data.mathgen import check_answer, held_out_problems, math_documents, split_problem
from dynamoe.data.tokenizer import load_tokenizer
from dynamoe.evaluate import evaluate_tokens, split_tokens_by_domain
from dynamoe.model import Transformer
from dynamoe.model.experts import Experts
from dynamoe.model.need import (benefit_and_expectation, forced_experts, need_of, supervise_need, token_benefit,
                                token_losses)
from dynamoe.model.router import NEED_MEMORY, NEED_MOMENTUM, NEED_RIDGE, NeedRouter, NullRouter, build_router
from dynamoe.train import TrainConfig, train


def sharp_model(**overrides: Any) -> Transformer:
    """A tiny random model whose gates are sharper than the init's, so that routing varies from token to token."""
    torch.manual_seed(0)
    model = Transformer(tiny(**overrides)).eval()
    with torch.no_grad():
        for router in model.routers():
            router.gate.weight.normal_(std=0.1)
    return model


def batch(seed: int = 0, rows: int = 3, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 512, (rows, length + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


# ----------------------------------------------------------------------------- forced routing and the benefit

def test_forced_benefit_equals_the_difference_of_two_static_evaluations() -> None:
    """Forcing k on a top-2 model gives exactly the losses of the same weights loaded as top-1 and as top-8."""
    model = sharp_model(router="topk", top_k=2)
    x, y = batch()
    twins = {}
    for k in (1, 8):
        twins[k] = Transformer(dataclasses.replace(model.config, top_k=k)).eval()
        twins[k].load_state_dict(model.state_dict())
    expected = token_losses(twins[1], x, y) - token_losses(twins[8], x, y)
    torch.testing.assert_close(token_benefit(model, x, y), expected, rtol=0, atol=1e-5)
    with forced_experts(model, 1):
        assert all(int(r.k_T.max()) == 1 for r in model(x).routings)
    assert all(int(r.k_T.min()) == 2 for r in model(x).routings)  # the hooks are gone after the block


def test_the_expected_benefit_is_the_kl_of_the_two_static_predictions() -> None:
    """benefit_and_expectation: the same benefit as token_benefit, and its expectation over the next token under the
    k_max prediction, KL(p_kmax || p_1), computed here from the static twins' outputs with torch's kl_div."""
    model = sharp_model(router="topk", top_k=2)
    x, y = batch()
    benefit_N, expected_N = benefit_and_expectation(model, x, y)
    torch.testing.assert_close(benefit_N, token_benefit(model, x, y), rtol=0, atol=1e-5)
    log_probs = {}
    for k in (1, 8):
        twin = Transformer(dataclasses.replace(model.config, top_k=k)).eval()
        twin.load_state_dict(model.state_dict())
        with torch.no_grad():
            log_probs[k] = torch.log_softmax(twin(x).logits.flatten(0, 1).float(), dim=-1)
    kl_N = F.kl_div(log_probs[1], log_probs[8], log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(expected_N, kl_N, rtol=1e-4, atol=1e-5)
    assert bool((expected_N >= -1e-6).all()) and float(expected_N.max()) > 0  # a divergence: never below 0


def test_analysed_benefit_equals_the_difference_of_two_evaluations_at_the_dial(tiny_corpus: Path) -> None:
    """On the test split, the mean benefit per domain is eval's loss at one expert minus its loss at k_max."""
    model = sharp_model(router="dynamic")
    tokens = split_tokens_by_domain(tiny_corpus, "test")
    routing = collect(model, tokens, 100, benefit=True)
    losses = {}
    for threshold, k in ((1e-6, 1), (1.0, model.config.k_max)):  # the dial at its ends: one expert, then all k_max
        report = evaluate_tokens(model, tokens, max_tokens=100, progress=False, dial=threshold)
        assert report.total.mean_k == k
        losses[k] = {d.domain: d.loss for d in report.domains}
    assert routing.benefit_N is not None
    for index, domain in enumerate(tokens):
        mine = routing.benefit_N[routing.domain_N == index]
        assert mine.mean() == pytest.approx(losses[1][domain] - losses[8][domain], abs=1e-5)


def test_need_target_is_the_normal_score_of_the_benefits_rank() -> None:
    expected = torch.special.ndtri(torch.tensor([0.875, 0.625, 0.375, 0.125]))
    torch.testing.assert_close(need_of(torch.tensor([4.0, 0.5, 0.0, -1.0])), expected)
    torch.testing.assert_close(need_of(torch.tensor([-3.0, 100.0, 0.1, 0.2])), expected[[3, 0, 2, 1]])  # ranks only


# ----------------------------------------------------------------------------- the need router

def test_need_router_adds_need_spread_experts_per_standard_deviation_and_keeps_the_gates_ranking() -> None:
    router = build_router(tiny(router="need", target_k=2.0, need_spread=1.5))
    assert isinstance(router, NeedRouter)
    h_TD = torch.randn(5, tiny().dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router.need_moments.copy_(torch.tensor([1.0, 4.0]))  # scores of mean 1 and standard deviation 2
        router.k_penalty.fill_(-2.0)  # a price of -2: k = round(1.5 * (score - 1) / 2 + 2)
        routing_by_score = {}
        for score in (-5.0, 1.0, 2.0, 3.6, 21.0):  # the head's weights are 0 before any fit: its bias is the score
            router.need_bias.fill_(score)
            routing_by_score[score] = router(h_TD)
    assert [int(r.k_T[0]) for r in routing_by_score.values()] == [1, 2, 3, 4, 8]  # clamped to [k_min, k_max]
    routing = routing_by_score[2.0]
    probs = torch.softmax(h_TD @ router.gate.weight, dim=-1)
    torch.testing.assert_close(routing.experts_TK, probs.topk(8, dim=-1).indices)
    top3 = probs.topk(3, dim=-1).values
    torch.testing.assert_close(routing.weights_TK[:, :3], top3 / top3.sum(-1, keepdim=True))
    assert (routing.weights_TK[:, 3:] == 0).all()


def test_need_moments_follow_the_training_scores_only() -> None:
    router = build_router(tiny(router="need", target_k=2.0))
    assert isinstance(router, NeedRouter)
    h_TD = torch.randn(64, tiny().dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router.need_weight_D1.normal_()
        router(h_TD)  # an evaluation forward: nothing to fold in
    router.update_controller(2.0)
    assert router.need_moments.tolist() == [0.0, 1.0]
    scores = router.need(h_TD).detach()
    router(h_TD)  # a training forward
    router.update_controller(2.0)
    expected = torch.tensor([0.0, 1.0]).lerp(torch.stack([scores.mean(), scores.var(correction=0)]), NEED_MOMENTUM)
    torch.testing.assert_close(router.need_moments, expected)


@pytest.mark.parametrize("name", ["need", "null"])
def test_price_controller_is_an_integral_step_toward_the_scheduled_target(name: str) -> None:
    router = build_router(tiny(router=name, target_k=2.0, price_gain=0.25, target_k_hold_steps=1))
    router.update_controller(6.0)  # aimed at k_max = 8 during the hold: too few experts, the price falls
    assert float(router.k_penalty) == pytest.approx(0.25 * (6.0 - 8.0))
    router.update_controller(3.0)  # now aimed at 2
    assert float(router.k_penalty) == pytest.approx(0.25 * (6.0 - 8.0) + 0.25 * (3.0 - 2.0))


def test_need_head_is_the_ridge_regression_of_the_measured_tokens() -> None:
    router = build_router(tiny(router="need", target_k=2.0))
    assert isinstance(router, NeedRouter)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(40, tiny().dim, generator=generator), torch.randn(40, generator=generator)) for _ in range(2)]
    for h_TD, target_T in batches:
        router.need_target_N = target_T
        router(h_TD)
        router.update_controller(2.0)
    features = [torch.nn.functional.pad(h_TD.double(), (0, 1), value=1.0) for h_TD, _ in batches]
    weights = [NEED_MEMORY, 1.0]  # the older batch weighted down once
    gram = sum(w * f.t() @ f for w, f in zip(weights, features))
    cross = sum(w * f.t() @ t.double() for w, f, (_, t) in zip(weights, features, batches))
    solution = torch.linalg.solve(gram + NEED_RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64),
                                  cross)
    torch.testing.assert_close(router.need_weight_D1[:, 0], solution[:-1].float())
    torch.testing.assert_close(router.need_bias, solution[-1:].float())


def test_supervised_head_learns_a_known_benefit_and_k_follows_it() -> None:
    """Half the tokens gain about 2 nats from more experts, the others about nothing, and within each kind the gain
    follows a direction of the input. The head's loss falls, k follows the benefit and the price holds the mean."""
    torch.manual_seed(0)
    router = build_router(tiny(router="need", target_k=2.0))
    kind_T = torch.arange(512) % 2  # 1: needs experts
    h_TD = torch.randn(512, tiny().dim)
    benefit_T = 2.0 * kind_T + 0.3 * torch.tanh(h_TD[:, 0])
    h_TD[:, 1] += 3.0 * kind_T  # what tells the kinds apart
    losses = []
    for step in range(40):
        rows = slice(128 * (step % 4), 128 * (step % 4 + 1))  # a quarter of the tokens measured per step
        router.need_target_N = need_of(benefit_T[rows])
        routing = router(h_TD[rows])
        router.update_controller(float(routing.k_T.float().mean()))
        losses.append(float(routing.stats["need_loss"]))
    assert router.need_target_N is None  # consumed by the forward it was meant for
    assert losses[0] > 0.9 and max(losses[4:]) < 0.3  # an unfit head, then a fit one on tokens it had not seen
    with torch.no_grad():
        k_T = router(h_TD).k_T.float()
    assert k_T[kind_T == 1].mean() > k_T[kind_T == 0].mean() + 1
    assert spearman(k_T.numpy(), benefit_T.numpy()) > 0.7
    assert k_T.mean() == pytest.approx(2.0, abs=0.15)


def test_supervision_reaches_the_head_alone_through_the_measured_rows() -> None:
    """supervise_need hands every need router the normal scores of the forced-k benefit of the batch's first rows;
    the forward keeps their regression sums; no gradient changes, and the refit after the step moves the head."""
    model = sharp_model(router="need", target_k=2.0, need_fraction=0.4)
    x, y = batch(rows=5)
    gradients = []
    for supervised in (False, True):
        if supervised:
            supervise_need(model, x, y, step=1)
            expected = need_of(token_benefit(model, x[:2], y[:2]))  # ceil(0.4 * 5) rows
            for router in model.routers():
                assert isinstance(router, NeedRouter) and router.need_target_N is not None
                torch.testing.assert_close(router.need_target_N, expected)
        model.zero_grad()
        out = model(x, y)
        out.loss.backward()
        assert ("need_loss" in out.routings[0].stats) == supervised
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, rtol=0, atol=0)
    dim = model.config.dim
    assert all(isinstance(r, NeedRouter) and r.batch_sums is not None and r.batch_sums.numel() == 3 + (dim + 1) ** 2 + dim + 1
               for r in model.routers())
    model.update_controllers([2.0, 2.0])
    assert all(isinstance(r, NeedRouter) and r.need_weight_D1.abs().sum() > 0 for r in model.routers())
    supervise_need(model, x, y, step=2)  # need_every=1: every step
    assert all(isinstance(r, NeedRouter) and r.need_target_N is not None for r in model.routers())


def test_supervision_skips_the_steps_between_measurements() -> None:
    model = sharp_model(router="need", target_k=2.0, need_every=3)
    x, y = batch()
    for step, measured in ((1, True), (2, False), (3, False), (4, True)):
        for router in model.routers():
            assert isinstance(router, NeedRouter)
            router.need_target_N = None
        supervise_need(model, x, y, step)
        assert all((r.need_target_N is not None) == measured for r in model.routers() if isinstance(r, NeedRouter))
    static = sharp_model(router="dynamic")
    supervise_need(static, x, y, 1)  # no need router: nothing measured, nothing set


# ----------------------------------------------------------------------------- null experts

def null_model_with_zeros() -> Transformer:
    """A tiny null-expert model priced so that some tokens run no expert at all and others several."""
    model = sharp_model(router="null", target_k=2.0)
    with torch.no_grad():
        for router in model.routers():
            router.k_penalty.fill_(1.0)
    return model


def test_null_router_weights_are_a_softmax_over_real_and_null_slots() -> None:
    router = build_router(tiny(router="null", target_k=2.0))
    assert isinstance(router, NullRouter)
    h_TD = torch.randn(6, tiny().dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        router.gate.weight.normal_(std=0.3)
        router.null_head.bias.fill_(0.1)
        routing = router(h_TD)
    logits = h_TD @ router.gate.weight
    null_T = 0.1 + (h_TD @ router.null_head.weight.t())[:, 0] * router.null_input_scale
    sorted_logits = logits.sort(dim=-1, descending=True).values[:, :8]
    k_T = (sorted_logits > null_T[:, None]).sum(-1)  # price 0
    assert torch.equal(routing.k_T, k_T)
    for t in range(6):
        k = int(k_T[t])
        slots = torch.cat([sorted_logits[t, :k], null_T[t].repeat(8 - k)])
        torch.testing.assert_close(routing.weights_TK[t, :k], slots.softmax(-1)[:k])
        assert (routing.weights_TK[t, k:] == 0).all()


def test_null_experts_never_run_a_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    model = null_model_with_zeros()
    rows_run = []
    for method in ("forward_expert", "add_weighted_expert"):
        original = getattr(Experts, method)

        def counting(self: Experts, expert: int, x_ND: torch.Tensor, *args: Any, original: Any = original) -> torch.Tensor:
            rows_run.append(x_ND.shape[0])
            return original(self, expert, x_ND, *args)
        monkeypatch.setattr(Experts, method, counting)
    x, _ = batch(rows=2)
    with torch.no_grad():
        routings = model(x).routings
    k_all = torch.cat([r.k_T for r in routings])
    assert (k_all == 0).any() and (k_all > 0).any()
    assert sum(rows_run) == int(k_all.sum())  # grouped dispatch: one row per (token, real expert) pair
    # One token at a time (the decode path): a token with no real expert calls no expert at all.
    moe = model.layers[0].ffn
    h_TD = torch.randn(40, model.config.dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        k_T = moe.router(h_TD).k_T
        zero = int((k_T == 0).nonzero()[0, 0])
        rows_run.clear()
        y_11D, routing = moe(h_TD[zero:zero + 1][None])
    assert rows_run == [] and int(routing.k_T) == 0 and (y_11D == 0).all()


def test_null_experts_count_as_zero_in_every_statistic(tiny_corpus: Path, tmp_path: Path) -> None:
    model = null_model_with_zeros()
    x, y = batch()
    routings = model(x, y).routings  # with gradients: the training statistics
    for routing in routings:
        assert routing.stats["mean_k"] == routing.k_T.float().mean()
        assert routing.mask_TK.sum() == routing.k_T.sum()
    save_checkpoint(tmp_path / "null", 1, model, {"step": 1, "optimizer": {}}, {}, tiny_corpus / "tokenizer.json")
    tokens = split_tokens_by_domain(tiny_corpus, "test")
    report = evaluate_tokens(model, tokens, max_tokens=64, progress=False)
    routing = collect(model, tokens, 64)
    zeros = int((routing.k_LN == 0).sum())
    assert zeros > 0 and report.total.k_histogram[0] == zeros
    assert report.total.mean_k == pytest.approx(float(routing.k_LN.mean()))
    for layer, k_N in enumerate(routing.k_LN):  # the expert usage counts only the experts that ran
        assert routing.usage_LED[layer].sum() == k_N.sum()
    analysis = analyze_checkpoint(tmp_path / "null", tiny_corpus, tmp_path / "analysis", max_tokens=64, sample_tokens=8,
                                  level_problems=24)
    assert sum(h[0] for h in analysis.k_histogram_per_layer) == zeros


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("name", ["need", "null"])
def test_training_resumes_exactly_with_each_new_router(name: str, tiny_corpus: Path, tmp_path: Path) -> None:
    cfg = tiny(router=name, target_k=2.0, target_k_hold_steps=1, target_k_decay_steps=2, need_every=2)
    settings = dict(data_dir=tiny_corpus, batch_size=4, warmup_steps=1, decay_steps=6, save_every=3, eval_batches=0,
                    progress=False)
    for folder, steps, resume in (("resumed", 3, False), ("resumed", 6, True), ("straight", 6, False)):
        train(cfg, TrainConfig(out_dir=tmp_path / folder, steps=steps, **settings), resume=resume)  # type: ignore[arg-type]
    resumed, straight = (load_model(tmp_path / folder)[0] for folder in ("resumed", "straight"))
    for (key, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    assert float(resumed.routers()[0].k_penalty) != 0.0  # the controller's price is part of the state


# ----------------------------------------------------------------------------- the analysis

def test_rank_bins_and_budget_share_by_hand() -> None:
    benefit = np.array([0.5, 0.1, 0.9, 0.3, 0.7])
    k = np.array([2.0, 1.0, 4.0, 1.0, 2.0])
    assert mean_by_rank_bins(benefit, k, 2) == [pytest.approx(4 / 3), pytest.approx(3.0)]  # (0.1, 0.3, 0.5), (0.7, 0.9)
    assert mean_by_rank_bins(benefit, k, 6)[-1] is None  # more bins than tokens
    assert top_budget_share(benefit, k, 0.2) == pytest.approx(4 / 10)  # the top fifth is the 0.9 token
    assert top_budget_share(benefit, np.zeros(5)) is None


def test_need_analysis_by_hand() -> None:
    # Two domains of four tokens, two layers; in domain 0 k follows the benefit exactly, in domain 1 against it.
    benefit = np.array([0.1, 0.2, 0.3, 0.4, 0.1, 0.2, 0.3, 0.4])
    k_LN = np.array([[1, 2, 3, 4, 4, 3, 2, 1], [1, 2, 3, 4, 4, 3, 2, 1]])
    expected = np.array([0.4, 0.3, 0.2, 0.1, 0.1, 0.2, 0.3, 0.4])  # ranks the benefit backwards in a, exactly in b
    routing = TokenRouting(np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.linspace(1, 2, 8), k_LN, np.zeros((2, 8, 2)), benefit,
                           expected)
    levels = TokenRouting(np.array([0, 0, 1, 2, 3, 4]), np.ones(6), np.array([[1, 1, 2, 3, 4, 5]]), np.zeros((1, 8, 5)),
                          np.array([0.1, 0.3, 0.2, 0.3, 0.4, 0.5]))
    need = analyse_need(routing, ["a", "b"], levels)
    assert need.spearman_k_benefit_per_domain == {"a": pytest.approx(1.0), "b": pytest.approx(-1.0)}
    assert need.spearman_k_benefit == pytest.approx(0.0)
    assert need.spearman_benefit_expectation_per_domain == {"a": pytest.approx(-1.0), "b": pytest.approx(1.0)}
    assert need.mean_benefit_per_domain == {"a": pytest.approx(0.25), "b": pytest.approx(0.25)}
    assert need.levels == [1, 2, 3, 4, 5] and need.tokens_per_level == [2, 1, 1, 1, 1]
    assert need.mean_k_per_level == [1.0, 2.0, 3.0, 4.0, 5.0] and need.k_rises_with_level is True
    assert need.mean_benefit_per_level[0] == pytest.approx(0.2)
    flat = analyse_need(routing, ["a", "b"], dataclasses.replace(levels, k_LN=np.array([[1, 1, 2, 2, 4, 5]])))
    assert flat.k_rises_with_level is False


def test_held_out_problems_are_checkable_and_apart_from_the_training_stream(tiny_corpus: Path) -> None:
    problems = held_out_problems(3, 50, seed=0)
    assert problems == held_out_problems(3, 50, seed=0) and problems != held_out_problems(3, 50, seed=1)
    assert all(check_answer(question, answer) for question, answer in problems)
    training = {split_problem(line) for doc in math_documents(20, seed=0, difficulty=3) for line in doc.text.splitlines()}
    assert len(set(problems) & training) < 3  # level 3 has far more problems than these: no shared stream
    streams = level_tokens(load_tokenizer(tiny_corpus), 30, seed=0)
    assert list(streams) == ["1", "2", "3", "4", "5"] and all(len(s) > 100 for s in streams.values())


def test_analyze_writes_the_need_analysis(tiny_corpus: Path, tmp_path: Path) -> None:
    model = sharp_model(router="need", target_k=2.0)
    with torch.no_grad():
        for router in model.routers():
            router.need_weight_D1.normal_(std=3.0)  # a need that varies from token to token
    save_checkpoint(tmp_path / "need", 1, model, {"step": 1, "optimizer": {}}, {}, tiny_corpus / "tokenizer.json")
    result = analyze_checkpoint(tmp_path / "need", tiny_corpus, tmp_path / "out", max_tokens=80, sample_tokens=8,
                                level_problems=24)
    need = result.need
    assert need is not None and need.levels == [1, 2, 3, 4, 5] and len(need.spearman_k_benefit_per_layer) == 2
    assert need.spearman_k_benefit is not None and len(need.mean_k_by_benefit_decile) == 10
    assert set(need.spearman_benefit_expectation_per_domain) == set(need.spearman_k_benefit_per_domain)
    assert all(v is None or -1 <= v <= 1 for v in need.spearman_benefit_expectation_per_domain.values())
    assert json.loads((tmp_path / "out" / ANALYSIS_JSON).read_text())["need"]["levels"] == [1, 2, 3, 4, 5]
    assert (tmp_path / "out" / NEED_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
