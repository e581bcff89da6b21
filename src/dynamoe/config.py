"""Model configuration: one dataclass, presets as small functions."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

from dynamoe.errors import DynamoeError

ConfigT = TypeVar("ConfigT")


def requirement(what: str) -> Callable[[bool, str], None]:
    """A check that raises DynamoeError("invalid {what}: message") when its condition is false."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise DynamoeError(f"invalid {what}: {message}")
    return need


def read_json_object(path: Path, missing: str, corrupt: str) -> dict[str, Any]:
    """A JSON object from a file; one-line errors: `missing` if there is no file, `corrupt` appended if it is not JSON."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DynamoeError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DynamoeError(f"{path} is not valid JSON ({e}); {corrupt}") from None
    if not isinstance(data, dict):
        raise DynamoeError(f"{path} must hold a JSON object")
    return data


def check_field_types(config: Any, what: str) -> None:
    """Check every field of a config dataclass against its annotation, converting what JSON and the command line
    cannot spell (an integer for a float, a string for a path, a list for a tuple); DynamoeError names the first
    field that does not fit. Floats must be finite."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        try:
            converted = _as_type(value, hints[f.name])
        except (TypeError, ValueError):
            raise DynamoeError(f"invalid {what}: {f.name}={value!r} must be {_describe(hints[f.name])}") from None
        object.__setattr__(config, f.name, converted)  # frozen dataclasses too


def _as_type(value: Any, annotation: Any) -> Any:
    """value as a value of annotation, or TypeError/ValueError; bool is no integer here, as in JSON."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _as_type(value, option)
            except (TypeError, ValueError):
                continue
        raise TypeError(value)
    if origin is Literal:
        if value not in args or not isinstance(value, str):
            raise ValueError(value)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            raise TypeError(value)
        kinds = args * len(value) if origin is list else args
        items = [_as_type(item, kind) for item, kind in zip(value, kinds)]
        return items if origin is list else tuple(items)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(value)
        return float(value)
    if annotation is Path and isinstance(value, (str, Path)):
        return Path(value)
    if annotation in (int, bool, str) and type(value) is annotation:
        return value
    raise TypeError(value)


def _describe(annotation: Any) -> str:
    """What a value of annotation looks like, for error messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        count = f"{len(args)} " if origin is tuple else ""
        return f"a list of {count}{_describe(args[0]).split(' ', 1)[1]}s"
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", Path: "a path"}
    return names.get(annotation, str(annotation))


def dataclass_from_dict(cls: type[ConfigT], data: dict[str, Any], what: str) -> ConfigT:
    """cls(**data), rejecting unknown keys with a message naming them."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
    if unknown:
        raise DynamoeError(f"unknown {what} field(s): {', '.join(unknown)}")
    return cls(**data)


RouterName = Literal["topk", "dynamic", "topp", "relu", "dtopp", "need", "null"]
ROUTERS: tuple[str, ...] = ("topk", "dynamic", "topp", "relu", "dtopp", "need", "null")


@dataclass
class ModelConfig:
    """Shape of a decoder-only MoE transformer and of its router."""

    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouped-query attention)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    # Feed-forward: "moe" in every block, or "dense" with the active size of a top-k MoE.
    ffn: Literal["moe", "dense"] = "moe"
    n_experts: int = 16
    expert_dim: int = 256  # hidden size of one SwiGLU expert
    dense_dim: int | None = None  # None: top_k * expert_dim (same active size as static top-k)

    # Routing.
    router: RouterName = "dynamic"
    top_k: int = 2  # static top-k router; also sizes the dense baseline
    k_min: int = 1
    k_max: int = 8
    threshold: float = 0.5  # cumulative probability mass that threshold routers must reach
    layer_thresholds: list[float] | None = None  # one threshold per MoE layer instead (set by calibration, e.g. retrofit)
    temperature_min: float = 0.05  # the learned temperature is softplus(.) + temperature_min ...
    temperature_max: float = 10.0  # ... clamped at temperature_max
    target_k: float | None = 3.0  # mean experts/token the controller aims at (None: no control)
    # PI controller of the k penalty, per expert of error (mean_k - target_k).
    controller_kp: float = 0.03  # proportional gain: damps the oscillation an integral alone would cause
    controller_ki: float = 0.003  # integral gain, per optimizer step
    controller_limit: float = 1.0  # bound of the integral term
    # Warm-up from dense routing: the controller aims at k_max for target_k_hold_steps controller steps, then
    # its target falls linearly to target_k over target_k_decay_steps, so that every expert trains on many
    # tokens before the router learns to drop them (0 and 0: aim at target_k from the first step). A static
    # top-k router follows the same schedule with its own k: k_max experts, then stepping down to top_k.
    target_k_hold_steps: int = 0
    target_k_decay_steps: int = 0
    balance_coef: float = 0.01  # load-balance loss over the selected (token, expert) pairs
    z_loss_coef: float = 1e-3  # router z-loss
    renormalize_topk: bool = True  # topk router: the chosen experts' weights sum to 1 (Mixtral); False keeps softmax probabilities
    # topp/dynamic routers: weight each chosen expert as a static top-k_max router with renormalize_topk would
    # (dropped experts simply removed) instead of renormalising over the chosen ones; retrofit sets it.
    static_weights: bool = False
    # Allocation by need (the need and null routers): their controller sets a price per expert directly, a
    # pure integral step of price_gain per expert of error (mean k answers at once, unlike a penalty under Adam).
    price_gain: float = 0.1
    price_limit: float = 16.0  # bound of the price
    need_every: int = 1  # need router: measure the benefit of experts every this many optimizer steps ...
    need_fraction: float = 0.125  # ... on this share of the batch's rows (at least one row)
    need_spread: float = 1.0  # need router: experts added per standard deviation of need

    # Variants that imported checkpoints need (Qwen-MoE, OLMoE); the defaults are dynamoe's own architecture.
    attn_head_dim: int | None = None  # None: dim // n_heads; set when heads are wider or narrower (Qwen3-MoE)
    qkv_bias: bool = False  # bias on the query/key/value projection (Qwen2-MoE)
    out_bias: bool = False  # bias on the attention output projection
    qk_norm: Literal["none", "head", "proj"] = "none"  # RMSNorm of queries and keys: per head (Qwen3) or whole projection (OLMoE)
    clip_qkv: float | None = None  # clamp queries, keys and values to [-clip_qkv, clip_qkv] (OLMoE)
    dense_layers: list[int] = field(default_factory=list)  # blocks of an MoE model with a dense SwiGLU of dense_hidden
    shared_expert_dim: int = 0  # hidden size of an always-on expert behind a sigmoid gate in every MoE block; 0: none

    def __post_init__(self) -> None:
        check_field_types(self, "model config")
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dense_hidden(self) -> int:
        return self.dense_dim or self.top_k * self.expert_dim

    def validate(self) -> None:
        """Raise DynamoeError naming the first inconsistent field."""
        need = requirement("model config")
        need(min(self.vocab_size, self.dim, self.n_layers, self.n_heads, self.max_seq_len, self.expert_dim) >= 1,
             "vocab_size, dim, n_layers, n_heads, max_seq_len and expert_dim must be positive")
        need(self.kv_heads >= 1 and self.norm_eps > 0 and self.rope_theta > 0, "n_kv_heads, norm_eps and rope_theta must be positive")
        need(self.dense_dim is None or self.dense_dim >= 1, f"dense_dim={self.dense_dim} must be positive")
        need(self.attn_head_dim is not None or self.dim % self.n_heads == 0,
             f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set attn_head_dim")
        need(self.attn_head_dim is None or self.attn_head_dim >= 1, f"attn_head_dim={self.attn_head_dim} must be positive")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        need(self.n_heads % self.kv_heads == 0, f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        need(self.ffn in ("moe", "dense"), f"ffn must be 'moe' or 'dense', got {self.ffn!r}")
        need(self.router in ROUTERS, f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        need(self.n_experts >= 1, "n_experts must be at least 1")
        need(self.qk_norm in ("none", "head", "proj"), f"qk_norm must be 'none', 'head' or 'proj', got {self.qk_norm!r}")
        need(self.clip_qkv is None or self.clip_qkv > 0, f"clip_qkv={self.clip_qkv} must be positive (or None)")
        need(self.shared_expert_dim >= 0, f"shared_expert_dim={self.shared_expert_dim} must be >= 0 (0: no shared expert)")
        need(all(0 <= i < self.n_layers for i in self.dense_layers)
             and len(set(self.dense_layers)) == len(self.dense_layers),
             f"dense_layers={self.dense_layers!r} must be a list of distinct block indices in [0, n_layers={self.n_layers})")
        need(1 <= self.top_k <= self.n_experts, f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        need(self.router != "topk" or self.target_k_hold_steps + self.target_k_decay_steps == 0 or self.top_k <= self.k_max,
             f"a static router warming up from k_max={self.k_max} needs top_k={self.top_k} <= k_max")
        need(1 <= self.k_min <= self.k_max, f"need 1 <= k_min={self.k_min} <= k_max={self.k_max}")
        need(self.k_max <= self.n_experts, f"k_max={self.k_max} exceeds n_experts={self.n_experts}")
        need(0.0 < self.threshold <= 1.0, f"threshold={self.threshold} must be in (0, 1]")
        moe_layers = self.n_layers - len(self.dense_layers) if self.ffn == "moe" else 0
        need(self.layer_thresholds is None or (len(self.layer_thresholds) == moe_layers
                                               and all(0 < t <= 1 for t in self.layer_thresholds)),
             f"layer_thresholds={self.layer_thresholds!r} must list one threshold in (0, 1] per MoE layer ({moe_layers})")
        need(0.0 < self.temperature_min < self.temperature_max, "need 0 < temperature_min < temperature_max")
        need(min(self.controller_kp, self.controller_ki, self.controller_limit) >= 0, "controller gains and limit must be >= 0")
        need(self.price_gain >= 0 and self.price_limit > 0, "price_gain must be >= 0 and price_limit positive")
        need(isinstance(self.need_every, int) and self.need_every >= 1 and 0 < self.need_fraction <= 1 and self.need_spread > 0,
             f"need_every={self.need_every!r} must be an integer >= 1, need_fraction={self.need_fraction!r} in (0, 1] "
             f"and need_spread={self.need_spread!r} positive")
        need(min(self.target_k_hold_steps, self.target_k_decay_steps) >= 0,
             f"target_k_hold_steps={self.target_k_hold_steps} and target_k_decay_steps={self.target_k_decay_steps} "
             "must be integers >= 0")
        if self.target_k is not None and self.router != "topk" and self.ffn == "moe":
            need(self.k_min <= self.target_k <= self.k_max,
                 f"target_k={self.target_k} is outside [k_min={self.k_min}, k_max={self.k_max}]; "
                 "choose a target between them")
            if self.router in ("dynamic", "topp"):
                reachable = min(self.k_max, math.ceil(self.threshold * self.n_experts - 1e-9))
                need(self.target_k < reachable or self.target_k == self.k_min or self.threshold >= 1.0,
                     f"target_k={self.target_k} cannot be reached: threshold {self.threshold} over {self.n_experts} "
                     f"experts selects at most {reachable} (only for a perfectly flat softmax); raise threshold or lower target_k")

    def weight_count(self) -> int:
        """Parameters of the model's matrices (embeddings, head, attention, gates, experts, dense layers): all but
        norms, biases and temperature heads, so a lower bound of its size within a few percent. Computed, not built."""
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        attention = 2 * self.dim * (self.n_heads + self.kv_heads) * self.head_dim
        moe_layers = self.n_layers - len(self.dense_layers) if self.ffn == "moe" else 0
        moe = self.dim * (self.n_experts * (1 + 3 * self.expert_dim) + 3 * self.shared_expert_dim)
        dense = 3 * self.dim * self.dense_hidden
        return embeddings + self.n_layers * attention + moe_layers * moe + (self.n_layers - moe_layers) * dense

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a dict, rejecting unknown keys with a clear message."""
        return dataclass_from_dict(cls, data, "model config")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        """Read a config.json, with a one-line error if it is missing or malformed."""
        data = read_json_object(Path(path), f"{path} not found: a checkpoint folder needs a config.json",
                                "the checkpoint is corrupt")
        return cls.from_dict(data)


def tiny(**overrides: Any) -> ModelConfig:
    """A model for tests: a few hundred thousand parameters."""
    return ModelConfig(**{**dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=64,
                                 n_experts=8, expert_dim=64, k_max=8, target_k=3.0), **overrides})


def small(**overrides: Any) -> ModelConfig:
    """The CPU demo model: experts dominate the weights a token reads."""
    return ModelConfig(**{**dict(vocab_size=8192, dim=256, n_layers=4, n_heads=4, max_seq_len=256,
                                 n_experts=16, expert_dim=512, k_max=8, target_k=3.0), **overrides})


def base(**overrides: Any) -> ModelConfig:
    """A GPU-sized model."""
    return ModelConfig(**{**dict(vocab_size=32768, dim=768, n_layers=12, n_heads=12, max_seq_len=1024,
                                 n_experts=32, expert_dim=1024, k_max=8, target_k=3.0), **overrides})


PRESETS: dict[str, Callable[..., ModelConfig]] = {"tiny": tiny, "small": small, "base": base}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Look a preset up by name, with a clear error listing the valid names."""
    if name not in PRESETS:
        raise DynamoeError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)


def with_dense_warmup(cfg: ModelConfig, steps: int, fraction: float) -> ModelConfig:
    """cfg warmed up from dense routing over `fraction` of `steps`: k_max for the first half of it, then falling
    linearly to the router's own k over the second (the controller's target_k, or a static router's top_k)."""
    if cfg.ffn != "moe" or (cfg.router != "topk" and cfg.target_k is None):
        return cfg
    half = dense_warmup_half(steps, fraction)
    return dataclasses.replace(cfg, target_k_hold_steps=half, target_k_decay_steps=half)


def dense_warmup_half(steps: int, fraction: float) -> int:
    """Steps of each half of a warm-up from dense routing over `fraction` of `steps`: the hold, then the fall."""
    return int(fraction / 2 * steps)
