"""The Hugging Face MoE families dynamoe reads and writes, and how their config.json maps to a ModelConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynamoe.config import ModelConfig
from dynamoe.errors import DynamoeError

DEFAULT_K_MAX = 8  # the experts/token ceiling a retrofitted dynamic router may use, as in dynamoe's presets


@dataclass(frozen=True)
class Family:
    """One transformers architecture: its names for the MoE fields and weights, and what its blocks contain."""

    architecture: str  # the class transformers builds, e.g. "MixtralForCausalLM"
    model_type: str
    experts_keys: tuple[str, ...]  # config fields that may hold the number of routed experts, the one export writes first
    expert_dim_key: str  # config field: hidden size of one expert
    moe_block: str  # the MoE block's name in per-expert checkpoints ("mlp" in the fused layout of every family)
    expert_projections: tuple[str, str, str]  # per-expert names of the gate, up and down projections
    qk_norm: str  # "none", "head" or "proj" (see ModelConfig.qk_norm)
    qkv_bias_key: str | None  # config field switching the q/k/v bias (None: never)
    out_bias_key: str | None  # config field switching the output projection's bias (None: never)
    default_bias: bool  # the value of the bias fields when config.json omits them
    norm_topk_key: str | None  # config field: renormalise the top-k weights (None: always, as Mixtral)
    shared_expert: bool  # every MoE block has a sigmoid-gated shared expert (Qwen2-MoE)
    dense_layers: bool  # config can make blocks dense (mlp_only_layers, decoder_sparse_step)

    def model_config(self, hf: dict[str, Any]) -> ModelConfig:
        """The dynamoe config of a checkpoint with this config.json; DynamoeError naming a missing or unsupported field."""
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if hf.get(key) is None:
                raise DynamoeError(f"config.json has no {key}, which every {self.architecture} config has")
        experts_key = next((key for key in self.experts_keys if hf.get(key) is not None), self.experts_keys[0])
        for key in (experts_key, "num_experts_per_tok", self.expert_dim_key):
            if hf.get(key) is None:
                raise DynamoeError(f"config.json has no {key}: it does not describe a Mixture-of-Experts {self.architecture}")
        if hf.get("hidden_act", "silu") != "silu":
            raise DynamoeError(f"hidden_act={hf['hidden_act']!r} is not supported: dynamoe experts are SwiGLU (silu)")
        n_experts, top_k, n_layers = int(hf[experts_key]), int(hf["num_experts_per_tok"]), int(hf["num_hidden_layers"])
        if n_experts < 1:
            raise DynamoeError(f"{experts_key}={n_experts}: a model without experts is not a Mixture-of-Experts model")
        fields: dict[str, Any] = dict(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers, n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads"), max_seq_len=max_seq_len(hf), rope_theta=rope_theta(hf),
            norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            ffn="moe", router="topk", n_experts=n_experts, top_k=top_k, expert_dim=hf[self.expert_dim_key],
            k_min=1, k_max=min(n_experts, max(top_k, DEFAULT_K_MAX)), target_k=None,
            renormalize_topk=True if self.norm_topk_key is None else bool(hf.get(self.norm_topk_key, False)),
            qkv_bias=bool(hf.get(self.qkv_bias_key, self.default_bias)) if self.qkv_bias_key else False,
            out_bias=bool(hf.get(self.out_bias_key, self.default_bias)) if self.out_bias_key else False,
            qk_norm=self.qk_norm, clip_qkv=hf.get("clip_qkv"),
        )
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            fields["attn_head_dim"] = head_dim
        if self.shared_expert:
            fields["shared_expert_dim"] = int(hf.get("shared_expert_intermediate_size") or 0)
        if self.dense_layers:
            fields["dense_layers"] = dense_layers(hf, n_layers)
            if fields["dense_layers"]:
                fields["dense_dim"] = hf["intermediate_size"]
        try:
            return ModelConfig(**fields)
        except DynamoeError as error:
            raise DynamoeError(f"config.json cannot be represented: {error}") from None

    def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        """The config.json transformers needs to build this family with cfg's shapes."""
        bias = {key: value for key, value in ((self.qkv_bias_key, cfg.qkv_bias), (self.out_bias_key, cfg.out_bias)) if key}
        hf: dict[str, Any] = {
            "architectures": [self.architecture], "model_type": self.model_type, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "dtype": "float32",
            # The dense blocks' size; Mixtral and OLMoE use this field for the experts, so the next line wins there.
            "intermediate_size": cfg.dense_hidden if cfg.dense_layers else cfg.expert_dim,
            self.experts_keys[0]: cfg.n_experts, "num_experts_per_tok": cfg.top_k, self.expert_dim_key: cfg.expert_dim, **bias,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        }
        if self.norm_topk_key:
            hf[self.norm_topk_key] = cfg.renormalize_topk
        if self.shared_expert:
            hf["shared_expert_intermediate_size"] = cfg.shared_expert_dim
        if self.dense_layers:
            hf.update(mlp_only_layers=sorted(cfg.dense_layers), decoder_sparse_step=1, use_sliding_window=False)
        if self.qk_norm == "proj":
            hf["clip_qkv"] = cfg.clip_qkv
        if self.model_type == "mixtral":
            hf["sliding_window"] = None
        return hf


MIXTRAL = Family("MixtralForCausalLM", "mixtral", ("num_local_experts",), "intermediate_size", "block_sparse_moe",
                 ("w1", "w3", "w2"), "none", None, None, False, None, shared_expert=False, dense_layers=False)
QWEN2_MOE = Family("Qwen2MoeForCausalLM", "qwen2_moe", ("num_experts", "num_local_experts"), "moe_intermediate_size", "mlp",
                   ("gate_proj", "up_proj", "down_proj"), "none", "qkv_bias", None, True, "norm_topk_prob",
                   shared_expert=True, dense_layers=True)
QWEN3_MOE = Family("Qwen3MoeForCausalLM", "qwen3_moe", ("num_experts", "num_local_experts"), "moe_intermediate_size", "mlp",
                   ("gate_proj", "up_proj", "down_proj"), "head", "attention_bias", "attention_bias", False, "norm_topk_prob",
                   shared_expert=False, dense_layers=True)
OLMOE = Family("OlmoeForCausalLM", "olmoe", ("num_experts", "num_local_experts"), "intermediate_size", "mlp",
               ("gate_proj", "up_proj", "down_proj"), "proj", "attention_bias", "attention_bias", False, "norm_topk_prob",
               shared_expert=False, dense_layers=False)
FAMILIES: dict[str, Family] = {family.architecture: family for family in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)}


def family_of(hf: dict[str, Any]) -> Family:
    """The family a config.json names in `architectures` (or, failing that, in `model_type`)."""
    architectures = hf.get("architectures") or []
    by_type = {family.model_type: family for family in FAMILIES.values()}
    for name in architectures:
        if name in FAMILIES:
            return FAMILIES[name]
    if not architectures and hf.get("model_type") in by_type:
        return by_type[hf["model_type"]]
    named = ", ".join(architectures) or f"model_type {hf.get('model_type')!r}"
    raise DynamoeError(f"unsupported architecture {named}; dynamoe imports {', '.join(FAMILIES)}")


def max_seq_len(hf: dict[str, Any]) -> int:
    """max_position_embeddings, capped at an active sliding window: within it, sliding attention equals full attention."""
    length = int(hf.get("max_position_embeddings") or 4096)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    return min(length, int(window)) if window else length


def rope_theta(hf: dict[str, Any]) -> float:
    """The RoPE base, refusing the scaled RoPE variants dynamoe does not implement."""
    parameters = hf.get("rope_parameters") or {}
    for settings in (parameters, hf.get("rope_scaling") or {}):  # rope_scaling: transformers 4's name for the variants
        rope_type = settings.get("rope_type", settings.get("type", "default"))
        if rope_type != "default":
            raise DynamoeError(f"RoPE type {rope_type} is not supported; dynamoe implements the default (unscaled) RoPE")
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))


def dense_layers(hf: dict[str, Any], n_layers: int) -> list[int]:
    """Blocks with a dense MLP: those in mlp_only_layers and those decoder_sparse_step skips (Qwen-MoE's rule)."""
    mlp_only = set(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step") or 1)
    return [i for i in range(n_layers) if i in mlp_only or (i + 1) % step != 0]
