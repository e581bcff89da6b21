"""Export a dynamoe checkpoint as a transformers checkpoint folder (Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE layout)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from dynamoe.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, check_output_folder, checkpoint_bytes, load_config, load_model,
                                resolve_checkpoint, staged_folder, write_safetensors)
from dynamoe.config import ModelConfig
from dynamoe.data.tokenizer import EOS_TOKEN, TOKENIZER_FILE
from dynamoe.errors import DynamoeError
from dynamoe.hf.families import FAMILIES, MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE, Family
from dynamoe.hf.importer import ROUTER_FILE, ROUTING_KEY
from dynamoe.hf.weights import weight_rules
from dynamoe.model import Transformer
from dynamoe.model.router import TopKRouter

README_FILE = "README.md"


@dataclass(frozen=True)
class Exported:
    """What `export_hf` wrote."""

    out: Path
    architecture: str
    dynamic: bool  # weights of a variable-k router that transformers runs only as static top-k


def fits(family: Family, cfg: ModelConfig) -> bool:
    """Whether transformers' implementation of family computes exactly what dynamoe computes for cfg."""
    shared_bias_key = family.qkv_bias_key is not None and family.qkv_bias_key == family.out_bias_key
    return (cfg.qk_norm == family.qk_norm
            and bool(cfg.shared_expert_dim) == family.shared_expert
            and (family.dense_layers or not cfg.dense_layers)
            and (family.qkv_bias_key is not None or not cfg.qkv_bias)
            and (family.out_bias_key is not None or not cfg.out_bias)
            and (not shared_bias_key or cfg.qkv_bias == cfg.out_bias)
            and (family.norm_topk_key is not None or cfg.renormalize_topk)
            and (cfg.clip_qkv is None or family is OLMOE)
            # OLMoE's QK-norm spans hidden_size, so its heads must tile the model dimension exactly.
            and (family is not OLMOE or cfg.head_dim * cfg.n_heads == cfg.dim))


def family_for(cfg: ModelConfig) -> Family:
    """The first transformers family (Mixtral first: the most widely supported) that runs cfg exactly."""
    if cfg.ffn != "moe":
        raise DynamoeError("a dense model has no Mixture-of-Experts layout in transformers; export needs an MoE model")
    for family in (MIXTRAL, QWEN3_MOE, QWEN2_MOE, OLMOE):
        if fits(family, cfg):
            return family
    features = {"qk_norm": cfg.qk_norm, "qkv_bias": cfg.qkv_bias, "out_bias": cfg.out_bias, "clip_qkv": cfg.clip_qkv,
                "shared_expert_dim": cfg.shared_expert_dim, "dense_layers": cfg.dense_layers,
                "renormalize_topk": cfg.renormalize_topk}
    described = ", ".join(f"{key}={value}" for key, value in features.items())
    raise DynamoeError(f"no transformers architecture ({', '.join(FAMILIES)}) computes this model exactly ({described})")


def static_topk(model: Transformer, top_k: int) -> tuple[Transformer, ModelConfig]:
    """The same gate and experts behind a static top-k router: the k most probable experts under the gate, weighted by
    the model's top-k rule (renormalised, as Mixtral, unless renormalize_topk is off); temperature heads and
    thresholds are dropped."""
    cfg = model.config
    if cfg.ffn != "moe" or cfg.router == "relu":
        raise DynamoeError(f"--as-topk needs a softmax router (topk, topp or dynamic); this model has "
                           f"{'a dense feed-forward' if cfg.ffn != 'moe' else 'the relu router'}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= cfg.n_experts:
        raise DynamoeError(f"--as-topk {top_k!r} must be an integer in [1, {cfg.n_experts}] (the model's experts)")
    static_cfg = dataclasses.replace(cfg, router="topk", top_k=top_k, target_k=None, layer_thresholds=None)
    with torch.random.fork_rng(devices=[]):
        static = Transformer(static_cfg)
    missing, unexpected = static.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".router." in name for name in unexpected), (missing, unexpected)  # routing state only
    return static.eval(), static_cfg


def export_hf(checkpoint: Path, out: Path, allow_dynamic: bool = False, force: bool = False,
              as_topk: int | None = None) -> Exported:
    """Write a dynamoe checkpoint as a transformers checkpoint folder that `from_pretrained` loads (a topk/topp/dynamic
    one as static top-`as_topk` if given)."""
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out)
    check_output_folder(out, force, checkpoint_bytes(load_config(ckpt), with_optimizer=False))
    model, cfg = load_model(ckpt)
    if as_topk is not None:
        model, cfg = static_topk(model, as_topk)
    family = family_for(cfg)
    dynamic = cfg.router != "topk"
    if dynamic and not allow_dynamic:
        raise DynamoeError(f"{ckpt} uses the {cfg.router} router (a variable number of experts per token), which transformers "
                           "cannot run; pass --allow-dynamic to write its weights anyway, with the routing documented")

    ours = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    if not dynamic:
        check_warm_up_over(model, ckpt)
        ours = {name: tensor for name, tensor in ours.items() if not name.endswith(".controller_steps")}
    theirs: dict[str, torch.Tensor] = {}
    for rule in weight_rules(cfg, family, fused_experts=lambda i: False):  # per-expert keys, as save_pretrained writes
        theirs.update(rule.split(ours.pop(rule.ours)))
    if ours and not dynamic:
        raise DynamoeError(f"weight {sorted(ours)[0]} of {ckpt} has no place in a {family.architecture}")

    hf = family.hf_config(cfg)
    with staged_folder(out, f"the exported checkpoint {out.name}") as staging:
        if (ckpt / TOKENIZER_FILE).is_file():
            shutil.copyfile(ckpt / TOKENIZER_FILE, staging / TOKENIZER_FILE)
            hf["eos_token_id"] = Tokenizer.from_file(str(ckpt / TOKENIZER_FILE)).token_to_id(EOS_TOKEN)
        if dynamic:
            hf["num_experts_per_tok"] = static_stand_in(cfg)
            hf[ROUTING_KEY] = settings_beyond(family, hf, cfg)
            write_safetensors({name: tensor.contiguous() for name, tensor in ours.items()}, staging / ROUTER_FILE,
                              {"format": "pt"})
            (staging / README_FILE).write_text(dynamic_readme(cfg, family, hf))
        (staging / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        write_safetensors(theirs, staging / WEIGHTS_FILE, {"format": "pt"})
    return Exported(out, family.architecture, dynamic)


def check_warm_up_over(model: Transformer, ckpt: Path) -> None:
    """Raise unless every static router is past its warm-up from dense routing, from where it routes as plain top-k."""
    for router in model.routers():
        assert isinstance(router, TopKRouter)
        k = int(router.current_k())
        if k != router.top_k:
            raise DynamoeError(f"{ckpt} is a static top-{router.top_k} model still warming up from dense routing (it runs "
                               f"{k} experts per token at this step); export a checkpoint past its warm-up")


def settings_beyond(family: Family, hf: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """The dynamoe config fields that the transformers config does not carry (router, thresholds, temperatures, ...)."""
    imported = family.model_config(hf).to_dict()
    return {name: value for name, value in cfg.to_dict().items() if imported[name] != value}


def static_stand_in(cfg: ModelConfig) -> int:
    """The top-k transformers will use for a dynamic model's weights: its target mean k, rounded."""
    return min(cfg.n_experts, max(1, round(cfg.target_k if cfg.target_k is not None else cfg.top_k)))


def dynamic_readme(cfg: ModelConfig, family: Family, hf: dict[str, Any]) -> str:
    """What an --allow-dynamic export is, and is not."""
    stand_in, routing = hf["num_experts_per_tok"], json.dumps(hf[ROUTING_KEY], indent=2)
    return f"""# A dynamoe model with dynamic routing, exported in the {family.architecture} layout

This model was trained with dynamoe's `{cfg.router}` router, which chooses a *variable* number of experts
per token (between k_min={cfg.k_min} and k_max={cfg.k_max}). transformers cannot run that routing: its
{family.architecture} always runs a fixed top-k. `num_experts_per_tok` is set to {stand_in} (the model's
target mean k, rounded) so that transformers can load and run these weights, but **its outputs are an
approximation, not this model**: quality may be lower than dynamoe's.

Exact inference: `dynamoe import <this folder> <out>` restores the dynamic router from `config.json`
(field `{ROUTING_KEY}`) and `{ROUTER_FILE}` (the routers' own tensors, such as the temperature heads,
under dynamoe's names), then `dynamoe generate <out> "..."`.

The dynamoe settings transformers has no field for (`{ROUTING_KEY}`):

```json
{routing}
```
"""
