"""Import a transformers MoE checkpoint folder: as a dynamoe checkpoint folder, or straight into a model."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynamoe.checkpoint import CONFIG_FILE, WEIGHTS_FILE, check_output_folder, staged_folder, write_safetensors
from dynamoe.config import ModelConfig, read_json_object
from dynamoe.data.tokenizer import TOKENIZER_FILE
from dynamoe.errors import DynamoeError
from dynamoe.hf.families import Family, family_of
from dynamoe.hf.weights import SafetensorsFolder, weight_rules
from dynamoe.model import Transformer
from dynamoe.resources import check_memory, model_bytes

# What `dynamoe export --allow-dynamic` adds, so that importing its output restores the dynamic router.
ROUTING_KEY = "dynamoe_routing"  # config.json entry: the ModelConfig fields transformers has no field for
ROUTER_FILE = "dynamoe_router.safetensors"  # the routers' own tensors (temperature heads), under dynamoe names
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; recomputed, never read


@dataclass(frozen=True)
class Imported:
    """What `import_hf` wrote."""

    out: Path
    architecture: str
    config: ModelConfig
    fused_experts: bool  # the source stored experts as 3-D tensors (transformers 5's in-memory layout)
    tokenizer: bool  # a tokenizer.json came along


def read_hf_config(folder: Path) -> dict[str, Any]:
    """The config.json of a transformers checkpoint folder, with one-line errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DynamoeError(f"{folder} is not a folder; pass a transformers checkpoint folder (config.json + *.safetensors)")
    return read_json_object(folder / CONFIG_FILE, f"{folder} has no {CONFIG_FILE}; a transformers checkpoint folder needs one",
                            "fix or replace the checkpoint's config")


def convert(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Family, bool]:
    """Config, dynamoe state dict, family and whether the experts were fused, read from a transformers checkpoint folder."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    family = family_of(hf)
    cfg = with_dynamic_routing(family.model_config(hf), hf)
    check_memory(model_bytes(cfg), torch.device("cpu"), f"the model of {folder}",
                 "its config.json asks for more than this machine holds")
    source = SafetensorsFolder(folder)
    expected = expected_shapes(cfg)

    def fused(i: int) -> bool:
        return f"model.layers.{i}.mlp.experts.gate_up_proj" in source

    tensors = {rule.ours: rule.join(source.get, expected[rule.ours]) for rule in weight_rules(cfg, family, fused)}
    tensors.update(router_tensors(folder, cfg, expected))
    leftover = [name for name in source.unread() if not name.endswith(IGNORED_SUFFIXES)
                and not (cfg.tie_embeddings and name == "lm_head.weight")]  # a tied head saved anyway: the embedding
    if leftover:
        more = f" (and {len(leftover) - 1} more)" if len(leftover) > 1 else ""
        raise DynamoeError(f"weight {leftover[0]}{more} of {folder} has no place in a {family.architecture} with this "
                           f"config.json; the config does not match the weights")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise DynamoeError(f"{folder} has no tensor for {missing[0]}; re-export it with {ROUTER_FILE}")
    moe_blocks = [i for i in range(cfg.n_layers) if i not in cfg.dense_layers]
    return cfg, tensors, family, any(fused(i) for i in moe_blocks)


def with_dynamic_routing(cfg: ModelConfig, hf: dict[str, Any]) -> ModelConfig:
    """cfg with the routing a dynamoe export documented in config.json, if any."""
    routing = hf.get(ROUTING_KEY)
    if routing is None:
        return cfg
    if not isinstance(routing, dict):
        raise DynamoeError(f"config.json field {ROUTING_KEY} must be an object of dynamoe config fields")
    return ModelConfig.from_dict({**cfg.to_dict(), **routing})


def router_tensors(folder: Path, cfg: ModelConfig, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The dynamic routers' own tensors a dynamoe export wrote beside the transformers weights (none for top-k)."""
    if cfg.router == "topk":
        return {}
    file = Path(folder) / ROUTER_FILE
    if not file.is_file():
        raise DynamoeError(f"config.json asks for the {cfg.router} router but {file} is missing")
    reader = SafetensorsFolder(folder, file=ROUTER_FILE, index=None)
    tensors = {}
    for name in reader.shard_of:
        if name not in expected or name.endswith("gate.weight"):
            raise DynamoeError(f"{file} holds {name}, which a {cfg.router} router of this config does not have")
        tensors[name] = reader.get(name)
        if tuple(tensors[name].shape) != expected[name]:
            raise DynamoeError(f"{file}: {name} has shape {list(tensors[name].shape)}, expected {list(expected[name])}")
    return tensors


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a dynamoe model with cfg and its shape, from a model on the meta device (no memory used)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def load_hf(path: Path, device: str | torch.device = "cpu") -> tuple[Transformer, ModelConfig]:
    """A transformers MoE checkpoint folder as a dynamoe model in eval mode, without writing anything."""
    cfg, tensors, _, _ = convert(Path(path))
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the caller's RNG
        model = Transformer(cfg)
    model.load_state_dict(tensors)
    return model.to(device).eval(), cfg


def import_hf(source: Path, out: Path, force: bool = False) -> Imported:
    """Write a transformers MoE checkpoint folder as a dynamoe checkpoint folder (config, weights, tokenizer)."""
    source, out = Path(source), Path(out)
    # The converted weights take what the source's take (same dtypes), so that is the room to ask for.
    check_output_folder(out, force, sum(file.stat().st_size for file in Path(source).glob("*.safetensors")))
    cfg, tensors, family, fused = convert(source)
    tokenizer = (source / TOKENIZER_FILE).is_file()
    with staged_folder(out, f"the imported checkpoint {out.name}") as staging:
        cfg.save(staging / CONFIG_FILE)
        write_safetensors({name: tensor.contiguous() for name, tensor in tensors.items()}, staging / WEIGHTS_FILE,
                          {"format": "pt", "source": family.architecture})
        if tokenizer:
            shutil.copyfile(source / TOKENIZER_FILE, staging / TOKENIZER_FILE)
    return Imported(out, family.architecture, cfg, fused, tokenizer)
