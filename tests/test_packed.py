"""oneDNN-packed inference weights: same outputs as the plain path, and never used when stale or under autograd.

These run with the native kernel refused, as on a machine without a compiler (tests/test_native.py covers the kernel).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynamoe.config import tiny
from dynamoe.generate import GREEDY, generate
from dynamoe.model import Transformer
from dynamoe.model import native
from dynamoe.model import packed as packed_module

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture(autouse=True)
def without_the_native_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN is what packs where the native kernel is unavailable."""
    monkeypatch.setitem(native.NATIVE_STATE, "available", False)

VARIANTS = {
    "topk": dict(router="topk"),
    "dynamic tied": dict(router="dynamic", tie_embeddings=True),
    "qwen2-like": dict(router="topk", shared_expert_dim=32, qkv_bias=True, dense_layers=[0]),
    "dense": dict(ffn="dense"),
}


@pytest.fixture
def pack_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pack even the tiny test matrices (the real threshold skips them as too small to gain)."""
    monkeypatch.setattr(packed_module, "PACK_MIN_ELEMENTS", 0)


def packed_and_plain(**overrides) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    plain = Transformer(tiny(**overrides)).eval()
    packed = copy.deepcopy(plain)
    packed.pack_weights()
    return packed, plain


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_model_matches_plain_in_prefill_and_greedy_decoding(name: str, pack_everything: None) -> None:
    packed, plain = packed_and_plain(**VARIANTS[name])
    assert packed.layers[-1].attn.wqkv.packed is not None
    idx = torch.randint(0, plain.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(packed(idx).logits, plain(idx).logits, rtol=1e-4, atol=1e-4)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    assert generate(packed, prompts, 12, GREEDY) == generate(plain, prompts, 12, GREEDY)


def test_every_large_matrix_is_packed_and_small_ones_are_not(pack_everything: None) -> None:
    packed, _ = packed_and_plain(router="topk", tie_embeddings=True)
    moe = packed.layers[0].ffn
    assert packed.tied_head_packed is not None
    assert moe.experts.packed is not None and all(pair is not None for pair in moe.experts.packed)
    packed_module.PACK_MIN_ELEMENTS = 1 << 19  # the real threshold (monkeypatch restores the module's value anyway)
    moe.router.gate.pack_weights()
    assert moe.router.gate.packed is None  # D x E: too small for oneDNN to gain


def test_weights_changed_in_place_are_not_read_from_a_stale_pack(pack_everything: None) -> None:
    packed, plain = packed_and_plain(router="topk")
    idx = torch.randint(0, plain.config.vocab_size, (1, 8))
    with torch.no_grad():
        for model in (packed, plain):  # what an optimizer step or load_state_dict does: in-place updates
            for param in model.parameters():
                param.mul_(1.5)
        torch.testing.assert_close(packed(idx).logits, plain(idx).logits, rtol=1e-4, atol=1e-4)


def test_weights_replaced_by_new_tensors_are_not_read_from_a_stale_pack(pack_everything: None) -> None:
    packed, plain = packed_and_plain(router="topk")
    packed.double()  # model.to(dtype) gives every module new parameter tensors
    idx = torch.randint(0, plain.config.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(packed(idx).logits, plain.double()(idx).logits)


def test_gradients_flow_through_the_plain_path_when_packed(pack_everything: None) -> None:
    packed, plain = packed_and_plain(router="topk")
    idx = torch.randint(0, plain.config.vocab_size, (2, 8))
    for model in (packed, plain):
        model(idx, targets_BT=idx).loss.backward()
    for (name, p), q in zip(packed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_copy_of_a_packed_model_is_unpacked_and_still_correct(pack_everything: None) -> None:
    packed, plain = packed_and_plain(router="dynamic")
    clone = copy.deepcopy(packed)
    assert clone.layers[0].attn.wqkv.packed is None
    idx = torch.randint(0, plain.config.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(clone(idx).logits, plain(idx).logits)


def test_compiling_the_decode_drops_the_packs(pack_everything: None) -> None:
    packed, _ = packed_and_plain(router="topk", tie_embeddings=True)
    packed.compile_decode()  # inductor cannot lower oneDNN's opaque tensors: compiled graphs read the plain weights
    packed.pack_weights()
    assert packed.tied_head_packed is None
    assert all(getattr(module, "packed", None) is None for module in packed.modules())


def test_bf16_weights_pack_where_the_cpu_can_and_match_the_plain_bf16_path(pack_everything: None) -> None:
    torch.manual_seed(0)
    plain = Transformer(tiny(router="topk")).eval().to(torch.bfloat16)
    packed = copy.deepcopy(plain)
    packed.pack_weights()
    # bf16 packing needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT: where the probe says no, nothing is packed.
    assert (packed.layers[0].attn.wqkv.packed is not None) == packed_module.onednn_supports(torch.bfloat16)
    idx = torch.randint(0, plain.config.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(packed(idx).logits.float(), plain(idx).logits.float(), rtol=1e-2, atol=1e-2)  # logits std ~0.16


@pytest.fixture
def onednn_refuses_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CPU or build without oneDNN support looks like to the model: every dtype probed as unsupported."""
    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setitem(packed_module.ONEDNN_SUPPORT, dtype, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_where_onednn_cannot_pack_nothing_is_packed_and_decoding_is_the_plain_path(
        dtype: torch.dtype, pack_everything: None, onednn_refuses_everything: None) -> None:
    torch.manual_seed(0)
    plain = Transformer(tiny(router="dynamic", tie_embeddings=True)).eval().to(dtype)
    unpacked = copy.deepcopy(plain)
    unpacked.pack_weights()
    assert packed_module.count_packed(unpacked) == 0
    assert "oneDNN cannot pack" in unpacked.kernel_summary()
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    assert generate(unpacked, prompts, 12, GREEDY) == generate(plain, prompts, 12, GREEDY)


def test_the_kernel_summary_names_dtype_and_packing(pack_everything: None) -> None:
    packed, plain = packed_and_plain(router="topk")
    assert plain.kernel_summary().startswith("float32 on cpu: plain torch matmuls (not packed)")
    assert f"oneDNN-packed matmuls ({packed_module.count_packed(packed)} matrices)" in packed.kernel_summary()
    assert packed_module.count_packed(packed) > 0


def test_an_unsupported_dtype_is_never_probed_as_packable() -> None:
    assert not packed_module.onednn_supports(torch.float64)
    assert not packed_module.can_pack(torch.zeros(1024, 1024, dtype=torch.float16))


# oneDNN honours ONEDNN_MAX_CPU_ISA: capped at AVX2, this CPU behaves for oneDNN as one without AVX-512 does
# (bf16 packing refused), whatever CPU the suite runs on.
WITHOUT_AVX512 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def run_without_avx512(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env={**os.environ, **WITHOUT_AVX512}, capture_output=True,
                          text=True, timeout=300)


def test_generate_decodes_a_bf16_model_on_a_cpu_without_avx512(tiny_corpus: Path, tmp_path: Path) -> None:
    from dynamoe.checkpoint import save_model
    from dynamoe.data import load_tokenizer

    vocab_size = load_tokenizer(tiny_corpus / "tokenizer.json").get_vocab_size()
    torch.manual_seed(0)
    # Wide enough that its attention and experts pass the real packing threshold (PACK_MIN_ELEMENTS).
    cfg = tiny(router="dynamic", vocab_size=vocab_size, dim=1024, n_layers=1, n_heads=8, n_experts=4, k_max=4, target_k=1.5,
              expert_dim=256)
    save_model(tmp_path / "ckpt", Transformer(cfg), tiny_corpus / "tokenizer.json")
    probe = run_without_avx512("-c", "import torch; from dynamoe.model.packed import onednn_supports; "
                                     "print(onednn_supports(torch.bfloat16))")
    done = run_without_avx512("-m", "dynamoe", "generate", str(tmp_path / "ckpt"), "--prompt", "To be", "--dtype",
                              "bfloat16", "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("To be") and len(done.stdout.strip()) > len("To be")
    summary = done.stderr.strip().splitlines()[-1]
    assert "8 tokens" in summary and "bfloat16 on cpu" in summary
    refused = probe.stdout.strip() == "False"
    assert ("oneDNN cannot pack bfloat16" in summary) == refused
    assert ("oneDNN-packed matmuls" in summary) == (not refused)
