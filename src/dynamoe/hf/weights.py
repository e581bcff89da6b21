"""Weight names and layouts: one rule per dynamoe tensor says which Hugging Face tensors it is made of.

transformers stores a Linear weight output-major, (out, in); dynamoe stores projections input-major,
(in, out), and fuses q/k/v and gate/up along the output axis. A rule therefore reads as: transpose
each of these tensors (if they are Linear weights), then join them along the output axis; for experts,
stack the experts first. Import applies a rule forwards, export backwards, so the two cannot disagree.
Reading goes through safetensors' memory map, one tensor at a time; nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from dynamoe.config import ModelConfig
from dynamoe.errors import DynamoeError
from dynamoe.hf.families import Family

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Rule:
    """One dynamoe tensor and the Hugging Face tensors it is made of, joined along its output (last) axis."""

    ours: str
    theirs: tuple[str, ...]
    widths: tuple[int, ...]  # each of theirs' size along the output axis
    linear: bool = True  # theirs are (out, in) Linear weights, ours their transpose; False: vectors and tables as they are
    experts: int = 0  # > 0: theirs name one expert's tensor through "{e}", and ours stacks the experts on a leading axis

    def their_shape(self, ours_shape: tuple[int, ...], width: int) -> tuple[int, ...]:
        """The shape one of theirs must have (per expert when experts > 0) for ours to have ours_shape."""
        shape = ours_shape[1:] if self.experts else ours_shape
        return (*shape[:-2], width, shape[-2]) if self.linear else (*shape[:-1], width)

    def join(self, read: Callable[[str], torch.Tensor], ours_shape: tuple[int, ...]) -> torch.Tensor:
        """Ours, of ours_shape, from theirs (import); DynamoeError naming the first tensor of another shape."""
        def part(name: str, width: int) -> torch.Tensor:
            tensor, expected = read(name), self.their_shape(ours_shape, width)
            if tuple(tensor.shape) != expected:
                raise DynamoeError(f"weight {name} has shape {list(tensor.shape)} but config.json implies {list(expected)}; "
                                   "the config does not match the weights")
            return tensor.transpose(-1, -2) if self.linear else tensor

        def one(names: tuple[str, ...]) -> torch.Tensor:
            return torch.cat([part(name, width) for name, width in zip(names, self.widths)], dim=-1)
        if self.experts:
            return torch.stack([one(tuple(name.format(e=e) for name in self.theirs)) for e in range(self.experts)])
        return one(self.theirs)

    def split(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Theirs from ours (export), contiguous so that safetensors can write them."""
        def one(ours: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
            parts = ours.split(self.widths, dim=-1)
            return {name: (part.transpose(-1, -2) if self.linear else part).contiguous() for name, part in zip(names, parts)}
        if not self.experts:
            return one(tensor, self.theirs)
        theirs: dict[str, torch.Tensor] = {}
        for e in range(self.experts):
            theirs.update(one(tensor[e], tuple(name.format(e=e) for name in self.theirs)))
        return theirs


def weight_rules(cfg: ModelConfig, family: Family, fused_experts: Callable[[int], bool]) -> list[Rule]:
    """Every dynamoe tensor of a model with cfg as a rule; fused_experts(i): block i stores experts as 3-D tensors."""
    rules = [Rule("tok_embeddings.weight", ("model.embed_tokens.weight",), (cfg.dim,), linear=False),
             Rule("norm.weight", ("model.norm.weight",), (cfg.dim,), linear=False)]
    if not cfg.tie_embeddings:
        rules.append(Rule("output.weight", ("lm_head.weight",), (cfg.vocab_size,)))
    for i in range(cfg.n_layers):
        rules += attention_rules(cfg, i)
        if cfg.ffn == "moe" and i not in cfg.dense_layers:
            rules += moe_rules(cfg, family, i, fused_experts(i))
        else:
            rules += swiglu_rules(f"layers.{i}.ffn.", f"model.layers.{i}.mlp.", cfg.dim, cfg.dense_hidden)
    return rules


def attention_rules(cfg: ModelConfig, i: int) -> list[Rule]:
    """Norms, the fused q/k/v projection (and its bias), the output projection, QK-norm weights of block i."""
    ours, theirs = f"layers.{i}.", f"model.layers.{i}."
    attn = theirs + "self_attn."
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    qkv = tuple(f"{attn}{name}_proj" for name in "qkv")
    rules = [Rule(ours + "attn_norm.weight", (theirs + "input_layernorm.weight",), (cfg.dim,), linear=False),
             Rule(ours + "ffn_norm.weight", (theirs + "post_attention_layernorm.weight",), (cfg.dim,), linear=False),
             Rule(ours + "attn.wqkv.weight", tuple(name + ".weight" for name in qkv), (q, kv, kv)),
             Rule(ours + "attn.wo.weight", (attn + "o_proj.weight",), (cfg.dim,))]
    if cfg.qkv_bias:
        rules.append(Rule(ours + "attn.wqkv.bias", tuple(name + ".bias" for name in qkv), (q, kv, kv), linear=False))
    if cfg.out_bias:
        rules.append(Rule(ours + "attn.wo.bias", (attn + "o_proj.bias",), (cfg.dim,), linear=False))
    if cfg.qk_norm != "none":
        q_width, k_width = (cfg.head_dim, cfg.head_dim) if cfg.qk_norm == "head" else (q, kv)
        rules += [Rule(ours + "attn.q_norm.weight", (attn + "q_norm.weight",), (q_width,), linear=False),
                  Rule(ours + "attn.k_norm.weight", (attn + "k_norm.weight",), (k_width,), linear=False)]
    return rules


def moe_rules(cfg: ModelConfig, family: Family, i: int, fused: bool) -> list[Rule]:
    """Router gate, experts (fused 3-D or one tensor per expert) and shared expert of block i."""
    ours = f"layers.{i}.ffn."
    block = f"model.layers.{i}.{'mlp' if fused else family.moe_block}."
    rules = [Rule(ours + "router.gate.weight", (block + "gate.weight",), (cfg.n_experts,))]
    if fused:
        rules += [Rule(ours + "experts.w_gate_up", (block + "experts.gate_up_proj",), (2 * cfg.expert_dim,)),
                  Rule(ours + "experts.w_down", (block + "experts.down_proj",), (cfg.dim,))]
    else:
        gate, up, down = (f"{block}experts.{{e}}.{name}.weight" for name in family.expert_projections)
        rules += [Rule(ours + "experts.w_gate_up", (gate, up), (cfg.expert_dim, cfg.expert_dim), experts=cfg.n_experts),
                  Rule(ours + "experts.w_down", (down,), (cfg.dim,), experts=cfg.n_experts)]
    if cfg.shared_expert_dim:
        rules += swiglu_rules(ours + "shared_expert.ffn.", block + "shared_expert.", cfg.dim, cfg.shared_expert_dim)
        rules.append(Rule(ours + "shared_expert.gate.weight", (block + "shared_expert_gate.weight",), (1,)))
    return rules


def swiglu_rules(ours: str, theirs: str, dim: int, hidden: int) -> list[Rule]:
    """A SwiGLU MLP: gate_proj and up_proj fused into w_gate_up, down_proj into w_down."""
    return [Rule(ours + "w_gate_up", (theirs + "gate_proj.weight", theirs + "up_proj.weight"), (hidden, hidden)),
            Rule(ours + "w_down", (theirs + "down_proj.weight",), (dim,))]


class SafetensorsFolder:
    """The tensors of a transformers checkpoint folder (one file, or shards named by an index), memory-mapped."""

    def __init__(self, folder: Path, file: str = SINGLE_FILE, index: str | None = INDEX_FILE) -> None:
        self.folder = Path(folder)
        self.shard_of = self._weight_map(file, index)
        self._handles: dict[str, Any] = {}
        self.read: set[str] = set()

    def _weight_map(self, file: str, index_file: str | None) -> dict[str, str]:
        index = self.folder / (index_file or file)
        if index_file and index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise DynamoeError(f"{index} is not a valid safetensors index (no weight_map)") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in (*weight_map, *weight_map.values())):
                raise DynamoeError(f"{index}: weight_map must map tensor names to shard file names")
            for shard in sorted(set(weight_map.values())):
                # Shards live in the checkpoint's own folder; an index naming /etc/x or ../x must not read elsewhere.
                # (Checked on the name, not the resolved path: the Hugging Face cache links shards to a blobs folder.)
                if PurePath(shard).is_absolute() or ".." in PurePath(shard).parts:
                    raise DynamoeError(f"{index} names shard {shard!r} outside {self.folder}; shard names must be files "
                                       "of the checkpoint folder")
                if not (self.folder / shard).is_file():
                    raise DynamoeError(f"shard {shard} listed in {index} is missing from {self.folder}; copy every shard")
            return dict(weight_map)
        if not (self.folder / file).is_file():
            found = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt*"))
            hint = f" ({', '.join(found[:2])} is a pickle, which dynamoe never loads: re-save with safetensors)" if found else ""
            raise DynamoeError(f"{self.folder} has no {file}{f' or {index_file}' if index_file else ''}{hint}")
        with self._open(file) as handle:
            return {name: file for name in handle.keys()}

    def _open(self, shard: str) -> Any:
        try:
            return safe_open(str(self.folder / shard), framework="pt")
        except (SafetensorError, OSError) as error:
            raise DynamoeError(f"{self.folder / shard} is not a readable safetensors file ({error})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def get(self, name: str) -> torch.Tensor:
        """One tensor by name, with an error naming it when the checkpoint lacks it."""
        shard = self.shard_of.get(name)
        if shard is None:
            raise DynamoeError(f"weight {name} is missing from {self.folder}, but its config.json implies it; "
                               "the config does not match the weights")
        if shard not in self._handles:
            self._handles[shard] = self._open(shard)
        try:
            tensor = self._handles[shard].get_tensor(name)
        except SafetensorError:
            raise DynamoeError(f"weight {name} is missing from shard {shard}, though {INDEX_FILE} lists it there") from None
        self.read.add(name)
        return tensor

    def unread(self) -> list[str]:
        """Tensor names not read yet, sorted."""
        return sorted(set(self.shard_of) - self.read)
