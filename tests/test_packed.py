"""oneDNN-packed inference weights: same outputs as the plain path, and never used when stale or under autograd."""

from __future__ import annotations

import copy

import pytest
import torch

from dynamoe.config import tiny
from dynamoe.generate import GREEDY, generate
from dynamoe.model import Transformer
from dynamoe.model import packed as packed_module

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

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


def test_bf16_weights_pack_and_match_the_plain_bf16_path(pack_everything: None) -> None:
    torch.manual_seed(0)
    plain = Transformer(tiny(router="topk")).eval().to(torch.bfloat16)
    packed = copy.deepcopy(plain)
    packed.pack_weights()
    assert packed.layers[0].attn.wqkv.packed is not None
    idx = torch.randint(0, plain.config.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(packed(idx).logits.float(), plain(idx).logits.float(), rtol=1e-2, atol=1e-2)  # logits std ~0.16
