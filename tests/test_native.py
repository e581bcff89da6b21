"""The native decode kernel: every instruction-set level and every fused op against torch, int8 weights, and clean
fallbacks where the kernel is refused, cannot be built, or must not run (stale weights, hooks, gradients)."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynamoe.config import tiny
from dynamoe.generate import GREEDY, generate, prefill
from dynamoe.model import Transformer, native
from dynamoe.model import packed as packed_module
from dynamoe.model.native import ISA_LEVELS, native_available, pad_columns, quantize_columns, to_panels
from dynamoe.model.router import NeedRouter

CAN_BUILD = shutil.which(os.environ.get("CXX", "c++")) is not None
pytestmark = pytest.mark.skipif(not CAN_BUILD, reason="no C++ compiler: the kernel cannot be built here")

MODELS = {
    "topk": dict(router="topk"),
    "dynamic": dict(router="dynamic"),
    "topp, grouped-query": dict(router="topp", n_kv_heads=2),
    "dynamic, biases, clip, tied": dict(router="dynamic", qkv_bias=True, out_bias=True, clip_qkv=0.5, tie_embeddings=True),
    "retrofit-like static weights, k_min 2": dict(router="topp", static_weights=True, k_min=2, threshold=0.6),
    "dtopp": dict(router="dtopp", threshold=0.4),
    "need, k_min 2": dict(router="need", k_min=2),
}


def test_the_kernel_builds_and_checks_out_where_a_compiler_is_present() -> None:
    assert native_available()
    assert native.native_isa() in ISA_LEVELS


@pytest.fixture(params=ISA_LEVELS)
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each instruction-set level this CPU has (a capped level runs as a CPU without the wider ones would)."""
    assert native_available()
    monkeypatch.setenv(native.ISA_ENV, request.param)
    level = native.native_isa()
    if level != request.param:
        pytest.skip(f"this CPU has no {request.param}")
    yield level
    monkeypatch.delenv(native.ISA_ENV)
    native.native_isa()


def random_weights(model: Transformer) -> Transformer:
    """Weights with more spread than the init, so that routing and attention have something to decide."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        for module in model.modules():
            if isinstance(module, NeedRouter):  # a fitted need head, so that k varies from token to token
                module.need_weight_D1.copy_(torch.randn_like(module.need_weight_D1) * 0.3)
                module.need_bias.fill_(3.0)
    return model.eval()


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dim", [70, 517])  # 517: three blocks of the int8 products' rounding of x, an odd last row
def test_panel_products_equal_torch_in_fp32_and_int8(isa: str, rows: int, dim: int) -> None:
    generator = torch.Generator().manual_seed(0)
    x_ND, w_DO = torch.randn(rows, dim, generator=generator), torch.randn(dim, 45, generator=generator)  # odd: padding
    bias_O, residual_NO = torch.randn(45, generator=generator), torch.randn(rows, 45, generator=generator)
    fp32 = torch.ops.dynamoe.linear(x_ND, to_panels(w_DO), None, bias_O, residual_NO, 45)
    torch.testing.assert_close(fp32, residual_NO + bias_O + x_ND @ w_DO, rtol=1e-4, atol=1e-4)
    q_DO, scale_O = quantize_columns(w_DO)
    int8 = torch.ops.dynamoe.linear(x_ND, to_panels(q_DO), pad_columns(scale_O), None, None, 45)
    expected = x_ND @ (q_DO * scale_O)
    # x is rounded to int16 per block of 256 values: by at most half its block's largest magnitude / 32767 each.
    blocks = torch.nn.functional.pad(x_ND.abs(), (0, -dim % 256)).unflatten(-1, (-1, 256)).amax(-1)
    half_step_ND = (blocks / 32767 / 2).repeat_interleave(256, dim=-1)[:, :dim]
    bound = half_step_ND @ (q_DO * scale_O).abs() + 1e-4 * expected.abs() + 1e-5
    assert bool(((int8 - expected).abs() <= bound).all())


def test_int8_rounding_keeps_each_column_within_half_a_step() -> None:
    w_DO = torch.randn(64, 24)
    w_DO[:, 3] = 0  # an all-zero column quantizes to zeros, not NaN
    q_DO, scale_O = quantize_columns(w_DO)
    assert q_DO.dtype == torch.int8 and int(q_DO.abs().max()) == 127
    assert bool(((q_DO * scale_O - w_DO).abs() <= scale_O / 2 + 1e-7).all())
    assert bool((q_DO[:, 3] == 0).all())


def packed_and_plain(int8: bool = False, **overrides) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    plain = random_weights(Transformer(tiny(**overrides)))
    fast = copy.deepcopy(plain)
    fast.pack_weights(int8=int8)
    if int8:  # the int8 model is the plain one on the rounded weights
        plain.load_state_dict(fast.state_dict())
    return fast, plain


def decode_step_outputs(model: Transformer, prompt_1T: torch.Tensor,
                        dial: float | list[float] | None = None) -> tuple[torch.Tensor, list[list[int]]]:
    """Logits and experts of one cached decode step after a prefill, at a compute dial (None: as trained)."""
    model.setup_caches(1, prompt_1T.shape[1] + 1)
    thresholds_1L = model.routing_thresholds([dial])
    try:
        prefill(model, prompt_1T[:, :-1], torch.tensor([prompt_1T.shape[1] - 1]), thresholds_1L)
        with torch.no_grad():
            out = model(prompt_1T[:, -1:], input_pos_T=torch.tensor([[prompt_1T.shape[1] - 1]]), thresholds_BL=thresholds_1L)
    finally:
        model.clear_caches()
    return out.logits, [routing.experts_TK[0, :int(routing.k_T[0])].tolist() for routing in out.routings]


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("name", MODELS)
def test_the_fused_decode_step_equals_the_modules_at_every_isa(name: str, int8: bool, isa: str) -> None:
    fast, plain = packed_and_plain(int8, **MODELS[name])
    assert fast.fused is not None and f"native kernel, {isa}" in fast.kernel_summary()
    assert "; batch-1 step fused," in fast.kernel_summary()
    prompt_1T = torch.randint(0, plain.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    fast_logits, fast_experts = decode_step_outputs(fast, prompt_1T)
    plain_logits, plain_experts = decode_step_outputs(plain, prompt_1T)
    torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-4, atol=1e-4)
    assert fast_experts == plain_experts
    prompts = [[1, 2, 3, 4, 5]]
    assert generate(fast, prompts, 16, GREEDY) == generate(plain, prompts, 16, GREEDY)


@pytest.mark.parametrize("overrides", [{}, dict(n_layers=3, dense_layers=[0])], ids=["all MoE", "dense first layer"])
def test_the_compute_dial_of_each_step_reaches_the_fused_step(overrides: dict) -> None:
    fast, plain = packed_and_plain(router="dynamic", **overrides)
    prompt_1T = torch.randint(0, plain.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    experts = []
    for threshold, temperature_scale in ((0.2, 1.0), (0.9, 1.0), (0.5, 3.0)):
        for model in (fast, plain):
            for router in model.routers():
                router.temperature_scale = temperature_scale
        dial = [threshold - 0.1 * layer for layer in range(len(plain.routers()))]  # one per MoE layer, in depth order
        (fast_logits, fast_experts), (plain_logits, plain_experts) = (decode_step_outputs(m, prompt_1T, dial)
                                                                      for m in (fast, plain))
        torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-4, atol=1e-4)
        assert fast_experts == plain_experts
        experts.append(sum(len(chosen) for chosen in fast_experts))
    assert experts[0] < experts[1] and experts[0] < experts[2]  # the dial changed how many experts ran


@pytest.fixture
def two_threads() -> None:
    """The kernel splits its work over torch's threads (the suite runs on one, see conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_work_split_over_two_threads_gives_the_same_outputs(int8: bool, two_threads: None) -> None:
    # Wide enough that every op splits (the kernel keeps small work on one thread), with a long context for the heads.
    fast, plain = packed_and_plain(int8, router="dynamic", dim=256, n_heads=2, expert_dim=512, vocab_size=4096,
                                   max_seq_len=2048)
    prompt_1T = torch.randint(0, plain.config.vocab_size, (1, 1500), generator=torch.Generator().manual_seed(3))
    fast_logits, fast_experts = decode_step_outputs(fast, prompt_1T)
    plain_logits, plain_experts = decode_step_outputs(plain, prompt_1T)
    # int8 products round x to int16 (2^-16 of its largest value per block): over this model's depth and context that
    # moves logits by a few 1e-4 (ties of routing apart, the same experts: checked below).
    tolerance = 1e-3 if int8 else 1e-4
    torch.testing.assert_close(fast_logits, plain_logits, rtol=tolerance, atol=tolerance)
    assert fast_experts == plain_experts
    x_ND = torch.randn(5, 256)
    for projection in (fast.output, fast.layers[0].attn.wqkv):  # several rows, several blocks of rows
        torch.testing.assert_close(projection(x_ND), x_ND @ projection.weight, rtol=1e-4, atol=1e-4)


def test_int8_rounds_the_weights_themselves_and_keeps_the_router_gates() -> None:
    fast, _ = packed_and_plain(int8=True, router="topk")
    torch.manual_seed(0)
    original = random_weights(Transformer(tiny(router="topk")))
    block = fast.layers[0]
    assert not torch.equal(block.attn.wqkv.weight, original.layers[0].attn.wqkv.weight)  # rounded in place
    assert torch.equal(block.ffn.router.gate.weight, original.layers[0].ffn.router.gate.weight)
    assert block.attn.wqkv.packed.scale is not None and block.ffn.router.gate.packed.scale is None
    assert "with int8 weights" in fast.kernel_summary()


CONTROLLER_STATES = {  # router -> (the state tensor its controller writes, values from fewest experts to most)
    "need": ("k_penalty", (6.0, 0.0, -6.0)),  # the price: higher, fewer experts
    "dtopp": ("routing_threshold", (0.05, 0.4, 0.95)),  # the threshold: lower, fewer experts
}


@torch.no_grad()
@pytest.mark.parametrize("router", CONTROLLER_STATES)
def test_the_fused_step_follows_the_routers_controller_state(router: str) -> None:
    """The kernel reads the router's controller state afresh at each step, after a controller step changed it."""
    fast, plain = packed_and_plain(router=router, threshold=0.4)
    state, values = CONTROLLER_STATES[router]
    prompt_1T = torch.randint(0, plain.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    experts = []
    for value in values:
        for model in (fast, plain):
            for module in model.routers():
                getattr(module, state).fill_(value)
        fast_experts = decode_step_outputs(fast, prompt_1T)[1]
        assert fast_experts == decode_step_outputs(plain, prompt_1T)[1]
        experts.append(sum(map(len, fast_experts)))
    assert experts[0] < experts[1] < experts[2]


PARTLY_FUSED = {  # the kernel fuses their attention; their feed-forward half runs through its module
    "dense": dict(ffn="dense"),
    "shared expert": dict(router="dynamic", shared_expert_dim=32),
    "relu (k can be 0)": dict(router="relu"),
    "dense first layer": dict(router="topk", dense_layers=[0]),
}


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("name", PARTLY_FUSED)
def test_the_partly_fused_step_and_the_batched_native_path_equal_the_modules(name: str, int8: bool) -> None:
    fast, plain = packed_and_plain(int8, **PARTLY_FUSED[name])
    assert fast.fused is not None and any(block.moe_args is None for block in fast.fused.blocks)
    assert (fast.fused.blocks[0].dense_args is not None) == name.startswith("dense")
    assert ("feed-forward halves (router not in the kernel)" in fast.kernel_summary()) == (not name.startswith("dense"))
    prompt_1T = torch.randint(0, plain.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(5))
    fast_logits, fast_experts = decode_step_outputs(fast, prompt_1T)
    plain_logits, plain_experts = decode_step_outputs(plain, prompt_1T)
    torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-4, atol=1e-4)
    assert fast_experts == plain_experts
    for prompts in ([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5], [9, 8, 7]]):  # batch 1: the fused step; 2: the native matvecs
        assert generate(fast, prompts, 12, GREEDY) == generate(plain, prompts, 12, GREEDY)


def test_a_partly_fused_step_runs_the_attention_in_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dense model's batch-1 steps take the fused attention, not the module's (benches compare like with like)."""
    fast, _ = packed_and_plain(ffn="dense")
    attention = type(fast.layers[0].attn)
    module_forward, calls = attention.forward, []
    monkeypatch.setattr(attention, "forward", lambda *args, **kwargs: calls.append(1) or module_forward(*args, **kwargs))
    generate(fast, [[1, 2, 3]], 6, GREEDY)
    assert len(calls) == fast.config.n_layers  # the prefill alone: one call per block, no decode step
@torch.no_grad()  # the native copy serves inference only
def test_a_token_routed_to_no_expert_gets_zeros_from_the_moe_op() -> None:
    """ReLU and null-expert routers give some tokens k = 0: the op adds nothing for them (once a division by zero)."""
    fast, _ = packed_and_plain(router="topk")
    experts = fast.layers[0].ffn.experts
    panels = experts.fresh_panels()
    assert panels is not None
    x_TD = torch.randn(3, fast.config.dim, generator=torch.Generator().manual_seed(7))
    experts_TK = torch.tensor([[0, 1], [2, 3], [1, 0]])
    weights_TK = torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.5, 0.5]])
    for k_T in (torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long)):
        y_TD = panels.run(x_TD, experts_TK, weights_TK, k_T)
        for t, k in enumerate(k_T.tolist()):
            expected = sum((weights_TK[t, j] * experts.forward_expert(int(experts_TK[t, j]), x_TD[t:t + 1])[0]
                            for j in range(k)), torch.zeros(fast.config.dim))
            torch.testing.assert_close(y_TD[t], expected, rtol=1e-4, atol=1e-5)


STALE_CHANGES = {  # in place (a new version) or `.data = ...` (new storage), on tensors read directly or through copies
    "experts in place": lambda model: model.layers[1].ffn.experts.w_down.mul_(2.0),
    "attention in place": lambda model: model.layers[0].attn.wqkv.weight.mul_(0.5),
    "final norm in place": lambda model: model.norm.weight.add_(0.25),
    "embedding replaced": lambda model: setattr(model.tok_embeddings.weight, "data", model.tok_embeddings.weight * 1.5),
}


@pytest.mark.parametrize("change", STALE_CHANGES)
def test_stale_weights_gradients_and_router_hooks_leave_the_fused_path(change: str) -> None:
    fast, plain = packed_and_plain(router="dynamic")
    assert fast.fused is not None and fast.fused.native is not None  # the whole step in one kernel call
    fast.setup_caches(1, 8)
    assert not fast.fused_step_ready()  # a gradient is wanted
    with torch.no_grad():
        assert fast.fused_step_ready()
        handle = fast.routers()[0].register_forward_hook(lambda *args: None)
        assert not fast.fused_step_ready()  # hooks need the router's own forward (bench's probe)
        handle.remove()
        for model in (fast, plain):
            STALE_CHANGES[change](model)
        assert not fast.fused_step_ready()
    fast.clear_caches()
    prompts = [[4, 3, 2, 1]]
    assert generate(fast, prompts, 10, GREEDY) == generate(plain, prompts, 10, GREEDY)


def test_the_whole_step_times_its_parts_and_hints_weights_beyond_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Decoder's clocks split a step (the peer benchmark's profile); weights beyond the last-level cache are
    streamed with the non-temporal hint, which must not change a result."""
    fast, plain = packed_and_plain(router="topk")
    assert fast.fused is not None and fast.fused.native is not None and not fast.fused.native.outgrows_cache()
    generate(fast, [[1, 2, 3]], 5, GREEDY)
    seconds = fast.fused.native.seconds()
    assert len(seconds) == 3 and all(part > 0 for part in seconds)  # attention, feed-forward, head
    assert fast.fused.native.seconds() == [0.0, 0.0, 0.0]  # read and reset
    monkeypatch.setattr("dynamoe.model.fused.last_level_cache_bytes", lambda: 1024)
    fast.pack_weights()
    assert fast.fused is not None and fast.fused.native is not None and fast.fused.native.outgrows_cache()
    prompts = [[4, 3, 2, 1]]
    assert generate(fast, prompts, 10, GREEDY) == generate(plain, prompts, 10, GREEDY)


def test_a_packed_model_saved_whole_loads_unpacked_and_decodes_the_same(tmp_path: Path) -> None:
    """torch.save of a whole packed model (the kernel's Decoder cannot be pickled): it loads as a copy does."""
    fast, plain = packed_and_plain(router="dynamic")
    torch.save(fast, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert loaded.fused is None
    prompts = [[4, 3, 2, 1]]
    assert generate(loaded, prompts, 8, GREEDY) == generate(plain, prompts, 8, GREEDY)


@pytest.fixture
def native_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a machine without a compiler (or a failed build) looks like to the model."""
    monkeypatch.setitem(native.NATIVE_STATE, "available", False)


def test_where_the_kernel_is_refused_the_torch_kernels_decode_the_same(native_refused: None) -> None:
    fast, plain = packed_and_plain(router="dynamic")
    assert fast.fused is None and packed_module.count_packed(fast, packed_module.PanelWeight) == 0
    assert "native kernel unavailable" in fast.kernel_summary()
    prompts = [[1, 2, 3, 4, 5]]
    assert generate(fast, prompts, 12, GREEDY) == generate(plain, prompts, 12, GREEDY)


def test_int8_without_the_kernel_still_computes_the_int8_model(native_refused: None) -> None:
    fast, plain = packed_and_plain(int8=True, router="topk")
    prompt_1T = torch.randint(0, plain.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(decode_step_outputs(fast, prompt_1T)[0], decode_step_outputs(plain, prompt_1T)[0],
                               rtol=1e-4, atol=1e-4)


def test_a_kernel_that_fails_to_build_is_refused_with_one_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "decode.cpp"
    broken.write_text("#error this kernel does not compile\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setattr(native, "kernel_loaded", lambda: False)  # as in a fresh process
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delitem(native.NATIVE_STATE, "available")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native_available()
        assert not native_available()  # decided once per process
    refusals = [record for record in caplog.records if "unavailable" in record.getMessage()]
    assert len(refusals) == 1 and "decoding uses torch's kernels" in refusals[0].getMessage()


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


SUMMARY = ("import torch; from dynamoe.config import tiny; from dynamoe.model import Transformer; "
           "m = Transformer(tiny(router='dynamic')).eval(); m.pack_weights(); print(m.fused is not None, m.kernel_summary())")


def test_a_cpu_without_avx512_runs_the_avx2_kernel_in_a_fresh_process() -> None:
    if ISA_LEVELS.index(native.native_isa()) < ISA_LEVELS.index("avx2"):
        pytest.skip("this CPU has no AVX2")
    done = run_python(SUMMARY, DYNAMOE_NATIVE_ISA="avx2", ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True float32 on cpu: native kernel, avx2"), done.stdout


def test_dynamoe_native_0_keeps_the_torch_kernels() -> None:
    done = run_python(SUMMARY, DYNAMOE_NATIVE="0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False float32 on cpu: ") and "native kernel unavailable" in done.stdout, done.stdout


def test_generate_and_eval_take_int8_weights_from_the_command_line(tiny_corpus: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from dynamoe.checkpoint import save_model
    from dynamoe.cli import main
    from dynamoe.data import load_tokenizer

    vocab_size = load_tokenizer(tiny_corpus / "tokenizer.json").get_vocab_size()
    torch.manual_seed(0)
    save_model(tmp_path / "ckpt", Transformer(tiny(router="dynamic", vocab_size=vocab_size)), tiny_corpus / "tokenizer.json")
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "To be", "--dtype", "int8", "--max-new-tokens", "6",
                 "--temperature", "0", "--device", "cpu"]) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert "6 tokens" in summary and "float32 with int8 weights on cpu: native kernel" in summary
    perplexity = {}
    for dtype in ("float32", "int8"):
        assert main(["eval", str(tmp_path / "ckpt"), "--corpus", str(tiny_corpus), "--dtype", dtype, "--max-tokens", "512",
                     "--json", "--device", "cpu"]) == 0
        perplexity[dtype] = json.loads(capsys.readouterr().out)["total"]["perplexity"]
    assert perplexity["int8"] != perplexity["float32"]  # the rounded weights are evaluated ...
    assert abs(perplexity["int8"] / perplexity["float32"] - 1) < 0.01  # ... and cost little
