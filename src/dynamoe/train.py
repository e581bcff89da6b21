"""The training loop: AdamW with warm-up and cosine decay, gradient accumulation and clipping,
non-finite steps skipped, the routers' compute controllers stepped, periodic evaluation, logging
(progress bar, TensorBoard, JSONL) and atomic checkpoints that resume bit-for-bit.

Step numbering: optimizer step `s` (1-based) trains on the micro-batches with indices
(s-1)*grad_accum ... s*grad_accum-1, and checkpoint ckpt-{s} holds the state after it. The learning
rate and the batches are pure functions of the step, so the step is the whole schedule and sampler
state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dynamoe.checkpoint import (check_same_tokenizer, checkpoint_name, latest_checkpoint, load_model,
                                load_train_config, load_trainer_state, rng_state, save_checkpoint, set_rng_state)
from dynamoe.config import ModelConfig, dataclass_from_dict, requirement
from dynamoe.data import TokenDataset
from dynamoe.data.tokenizer import TOKENIZER_FILE
from dynamoe.errors import DynamoeError
from dynamoe.model import Transformer
from dynamoe.model.need import supervise_need
from dynamoe.parallel import Parallelism, SingleProcess, distributed, world_size_from_env

MAX_CONSECUTIVE_SKIPS = 20  # this many non-finite steps in a row means the run has diverged
K_WINDOW = 20  # the summary's mean experts/token averages this many final steps
# The settings that shape the trajectory a resume must continue; the rest may change between runs.
TRAJECTORY_FIELDS = ("batch_size", "grad_accum", "seq_len", "lr", "min_lr", "warmup_steps", "decay_steps",
                     "weight_decay", "betas", "grad_clip", "seed")


@dataclass
class TrainConfig:
    """How to train: data, batch, schedule, optimizer, checkpointing and logging."""

    data_dir: Path
    out_dir: Path = Path("runs/train")
    steps: int = 2000
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int | None = None  # None: the model's max_seq_len
    lr: float = 3e-3  # suits the small presets; lower it for larger models
    min_lr: float | None = None  # where the cosine ends; None: lr / 10
    warmup_steps: int = 100
    # Step where the cosine reaches min_lr (None: steps); fix it to extend a run on the same schedule.
    decay_steps: int | None = None
    # Decays matrices (embeddings, projections, experts, gates) but, as in nanoGPT, not norm gains
    # or biases: a gain pulled toward zero silences its layer instead of regularising it.
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 250  # 0: only after the last step
    eval_batches: int = 20  # 0: never evaluate
    device: str = "auto"  # "auto": cuda if available, else cpu
    progress: bool = True
    # Without the bar: one plain status line per checkpoint, for runs whose bars would garble a shared
    # terminal (several trainings in worker processes).
    status_lines: bool = False
    # Under torchrun: ranks that split the experts between them (the world is data parallel either way);
    # batch_size stays the global batch, so a run may resume on another world size.
    expert_parallel: int = 1
    # Seconds a collective waits for the other ranks before the run fails; it must cover rank 0 writing a
    # checkpoint while the others wait for the next step (NCCL's own default is 600 too).
    dist_timeout: float = 600.0

    def __post_init__(self) -> None:
        # JSON hands back strings and lists; keep the declared types either way.
        self.data_dir, self.out_dir = Path(self.data_dir), Path(self.out_dir)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.validate()

    @property
    def lr_floor(self) -> float:
        """Where the cosine ends: min_lr, or lr / 10 when unset."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def decay_end(self) -> int:
        """The step where the cosine reaches lr_floor: decay_steps, or steps when unset."""
        return self.steps if self.decay_steps is None else self.decay_steps

    def validate(self) -> None:
        """Raise DynamoeError naming the first invalid field."""
        need = requirement("train config")
        need(self.steps >= 1, f"steps={self.steps} must be at least 1")
        need(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be at least 1")
        need(self.seq_len is None or self.seq_len >= 1, f"seq_len={self.seq_len} must be at least 1")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr={self.lr} must be positive and finite")
        need(math.isfinite(self.lr_floor) and 0 <= self.lr_floor <= self.lr,
             f"min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(self.decay_steps is None or self.decay_steps >= 1, f"decay_steps={self.decay_steps} must be at least 1")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay={self.weight_decay} must be finite and >= 0")
        need(all(0 <= b < 1 for b in self.betas), f"betas={self.betas} must both be in [0, 1)")
        need(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        need(self.save_every >= 1 and self.log_every >= 1, "save_every and log_every must be at least 1")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be at least 1")
        need(self.eval_every >= 0 and self.eval_batches >= 0, "eval_every and eval_batches must be >= 0")
        need(self.expert_parallel >= 1, f"expert_parallel={self.expert_parallel} must be at least 1")
        need(math.isfinite(self.dist_timeout) and self.dist_timeout > 0, f"dist_timeout={self.dist_timeout} must be positive")
        # _start hands the seed to np.random.seed, which takes 32 bits.
        need(0 <= self.seed < 2**32, f"seed={self.seed} must be in [0, 2**32)")
        blocker = next((path for path in (self.out_dir, *self.out_dir.parents) if path.exists() and not path.is_dir()),
                       None)
        need(blocker is None, f"out_dir={self.out_dir} cannot be a folder because {blocker} is a file; choose another --out")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                need(False, f"device={self.device!r} is not a device; use auto, cpu, cuda or cuda:N")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings)."""
        data = dataclasses.asdict(self)
        data.update(data_dir=str(self.data_dir), out_dir=str(self.out_dir), betas=list(self.betas))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, rejecting unknown keys with a clear message."""
        return dataclass_from_dict(cls, data, "train config")


@dataclass
class TrainSummary:
    """How a run ended."""

    step: int
    train_loss: float  # loss on the last step's batch
    val_loss: float | None  # LM loss on the val split after the last step; None when eval_batches=0
    tokens_per_s: float  # training throughput of this process, evaluation and checkpointing excluded
    mean_k: float | None  # experts/token over the last K_WINDOW applied steps, averaged over layers; None: dense
    mean_k_per_layer: list[float]
    checkpoint: Path
    wall_time_s: float
    nan_skips: int
    tokens_seen: int


@dataclass
class Counters:
    """The loop's own state: with weights, optimizer and RNG states, all that a resume needs."""

    step: int = 0
    tokens_seen: int = 0
    nan_skips: int = 0
    consecutive_skips: int = 0

    def advance(self, step: int, tokens: int, skipped: bool) -> None:
        """Account for optimizer step `step`, applied or skipped."""
        self.step, self.tokens_seen = step, self.tokens_seen + tokens
        self.nan_skips += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0


@dataclass
class StepResult:
    """What one optimizer step measured."""

    loss: float
    lm_loss: float
    aux_loss: float
    grad_norm: float
    mean_k_per_layer: list[float] = field(default_factory=list)
    skipped: bool = False


def model_config_for_data(cfg: ModelConfig, data_dir: Path) -> ModelConfig:
    """cfg with vocab_size set to the size of data_dir's tokenizer."""
    return dataclasses.replace(cfg, vocab_size=TokenDataset(Path(data_dir), "train").vocab_size)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up, cosine to min_lr, then flat."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.decay_end - cfg.warmup_steps))
    return cfg.lr_floor + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.lr_floor)


def resolve_device(name: str) -> torch.device:
    """The torch device for a config's device string ("auto" picks cuda when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DynamoeError(f"device {name!r} was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


def build_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (see TrainConfig.weight_decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@torch.no_grad()
def evaluate_loss(model: Transformer, data: TokenDataset, cfg: TrainConfig, seq_len: int, device: torch.device,
                  parallel: Parallelism = SingleProcess()) -> float:
    """Mean LM loss (no auxiliary losses) over the first eval_batches batches of a split."""
    model.eval()
    losses = []
    for index in range(cfg.eval_batches):
        x, y = data.batch(index, cfg.batch_size, seq_len, cfg.seed)
        losses.append(model(parallel.local_rows(x).to(device), parallel.local_rows(y).to(device)).lm_loss)
    model.train()
    return parallel.mean(torch.stack(losses).mean()).item()


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, data: TokenDataset, cfg: TrainConfig,
               step: int, seq_len: int, device: torch.device, parallel: Parallelism = SingleProcess()) -> StepResult:
    """Accumulate grad_accum micro-batches, clip, then step the optimizer and controllers, or skip if non-finite.

    With several processes, each takes its slice of every micro-batch and the measurements are averaged
    over them, so every rank takes the same decisions.
    """
    losses = torch.zeros(3, device=device)  # loss, lm_loss, aux_loss summed over micro-batches
    k_per_layer = torch.zeros(len(model.routers()), device=device)
    for micro in range(cfg.grad_accum):
        x, y = data.batch((step - 1) * cfg.grad_accum + micro, cfg.batch_size, seq_len, cfg.seed)
        x, y = parallel.local_rows(x).to(device), parallel.local_rows(y).to(device)
        supervise_need(model, x, y, step)  # need routers only: the benefit of experts, measured on a few rows
        out = model(x, y)
        (out.loss / cfg.grad_accum).backward()
        losses += torch.stack([out.loss, out.lm_loss, out.aux_loss]).detach()
        if out.routings:
            k_per_layer += torch.stack([r.stats["mean_k"] for r in out.routings])
    parallel.reduce_gradients(model)
    grad_norm = parallel.clip_grad_norm_(model, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    measured = parallel.mean(torch.cat([losses, k_per_layer]) / cfg.grad_accum)
    # One device-to-host copy per step for everything the loop needs to decide and log.
    loss, lm_loss, aux_loss, norm, *mean_k = torch.cat([measured[:3], grad_norm.reshape(1).to(device), measured[3:]]).tolist()
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    if not skipped:
        optimizer.step()
        model.update_controllers(mean_k)
    # A skipped step leaves weights, optimizer moments and controllers exactly as they were.
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, lm_loss, aux_loss, norm, mean_k, skipped)


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, resume: bool = False) -> TrainSummary:
    """Train a model on train_cfg.data_dir into train_cfg.out_dir; resume=True continues its latest checkpoint.

    A resume must keep the model config, the tokenizer and the TRAJECTORY_FIELDS of the saved run;
    steps, saving, logging, evaluation, device and progress may change. Raising steps without a fixed
    decay_steps stretches the cosine to the new end, so the resumed steps differ from a longer run's.
    Launched by torchrun, the processes split every batch (and the experts, by expert_parallel) and
    take the steps one process would; the world size may change between resumes.
    """
    device = resolve_device(train_cfg.device)
    if world_size_from_env() == 1:
        if train_cfg.expert_parallel != 1:
            raise DynamoeError(f"--expert-parallel {train_cfg.expert_parallel} splits the experts over that many processes; "
                               f"launch with torchrun --nproc_per_node {train_cfg.expert_parallel} -m dynamoe train ...")
        return _train(model_cfg, train_cfg, device, resume, SingleProcess())
    with distributed(train_cfg.expert_parallel, device.type, train_cfg.dist_timeout) as parallel:
        return _train(model_cfg, train_cfg, parallel.mesh.device, resume, parallel)


def _train(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, resume: bool,
           parallel: Parallelism) -> TrainSummary:
    started = time.perf_counter()
    train_data = TokenDataset(cfg.data_dir, "train")
    val_data = TokenDataset(cfg.data_dir, "val") if cfg.eval_batches else None
    seq_len = _check_fits(model_cfg, cfg, [train_data] if val_data is None else [train_data, val_data])
    if cfg.batch_size % parallel.world_size:
        raise DynamoeError(f"batch_size={cfg.batch_size} (the global batch) cannot be split evenly over "
                           f"{parallel.world_size} processes; use a multiple of {parallel.world_size}")
    model, optimizer, counters = _start(model_cfg, cfg, device, resume, parallel)
    first_step, tokens_per_step = counters.step + 1, cfg.batch_size * cfg.grad_accum * seq_len

    # Rank 0 alone writes the log, TensorBoard events and checkpoints. purge_step hides the events
    # a killed run wrote past the checkpoint it resumes from.
    writers = (_open_log(cfg.out_dir / "log.jsonl", counters.step),
               SummaryWriter(str(cfg.out_dir / "tb"), purge_step=counters.step + 1)) if parallel.is_main else None
    bar = tqdm(total=cfg.steps, initial=counters.step, disable=not (cfg.progress and parallel.is_main), desc="train",
               dynamic_ncols=True)
    recent_k: deque[list[float]] = deque(maxlen=K_WINDOW)
    train_time, window_time, window_steps = 0.0, 0.0, 0  # seconds in train_step: throughput ignores evals and saves
    result, val_loss, ckpt = None, None, None
    try:
        for step in range(first_step, cfg.steps + 1):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            tick = time.perf_counter()
            result = train_step(model, optimizer, train_data, cfg, step, seq_len, device, parallel)
            elapsed = time.perf_counter() - tick
            train_time, window_time, window_steps = train_time + elapsed, window_time + elapsed, window_steps + 1
            counters.advance(step, tokens_per_step, result.skipped)
            if not result.skipped and result.mean_k_per_layer:
                recent_k.append(result.mean_k_per_layer)

            last = step == cfg.steps
            if last:
                # Before the final evaluation, so that nothing failing after the last step can cost the run.
                ckpt = _save(model, optimizer, counters, cfg, parallel)
            val_loss = None
            if val_data is not None and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
                val_loss = evaluate_loss(model, val_data, cfg, seq_len, device, parallel)
            if step % cfg.log_every == 0 or last or val_loss is not None or result.skipped:
                tokens_per_s = window_steps * tokens_per_step / window_time
                if writers is not None:
                    _write_log(*writers, _record(step, result, optimizer.param_groups[0]["lr"], tokens_per_s, counters, val_loss))
                window_time, window_steps = 0.0, 0
            postfix = _postfix(result, tokens_per_step / elapsed, counters)
            bar.update(1)
            bar.set_postfix(postfix, refresh=False)

            if counters.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise DynamoeError(f"training diverged: {counters.consecutive_skips} steps in a row up to step {step} had "
                                   f"a non-finite loss or gradient; lower --lr or lengthen warm-up, then {_restart(cfg)}")
            # Saved after the step's log line, so a resume from it never lacks that line.
            if step % cfg.save_every == 0 and not last:
                ckpt = _save(model, optimizer, counters, cfg, parallel)
            if cfg.status_lines and parallel.is_main and (last or step % cfg.save_every == 0):
                status = ", ".join(f"{key} {value}" for key, value in postfix.items())
                print(f"[{cfg.out_dir.name}] step {step}/{cfg.steps}: {status}", flush=True)
    finally:
        bar.close()
        for writer in writers or ():
            writer.close()

    assert result is not None and ckpt is not None  # _start guarantees at least one step
    if result.skipped:
        raise DynamoeError(f"the last step ({counters.step}) had a non-finite loss or gradient and was skipped, so the "
                           f"run did not end on a trained step; lower --lr, then --resume from {ckpt} with more --steps")
    mean_k_per_layer = np.mean(recent_k, axis=0).tolist() if recent_k else []
    return TrainSummary(step=counters.step, train_loss=result.loss, val_loss=val_loss,
                        tokens_per_s=(counters.step - first_step + 1) * tokens_per_step / train_time,
                        mean_k=float(np.mean(mean_k_per_layer)) if mean_k_per_layer else None,
                        mean_k_per_layer=mean_k_per_layer, checkpoint=ckpt,
                        wall_time_s=time.perf_counter() - started, nan_skips=counters.nan_skips,
                        tokens_seen=counters.tokens_seen)


def _check_fits(model_cfg: ModelConfig, cfg: TrainConfig, splits: list[TokenDataset]) -> int:
    """The sequence length to train at, after checking the model can read every split it will at that length."""
    vocab_size = splits[0].vocab_size
    if vocab_size != model_cfg.vocab_size:
        raise DynamoeError(f"the model has vocab_size={model_cfg.vocab_size} but the tokenizer in {cfg.data_dir} has "
                           f"{vocab_size} tokens; set vocab_size={vocab_size} (model_config_for_data does it)")
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise DynamoeError(f"seq_len={seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}; "
                           "lower seq_len or raise max_seq_len")
    # Checked up front: a val split too short for one window would otherwise fail at the first evaluation.
    for data in splits:
        data.check_window(seq_len)
    return seq_len


def _start(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, resume: bool,
           parallel: Parallelism) -> tuple[Transformer, torch.optim.AdamW, Counters]:
    """A fresh seeded model and optimizer, or those of out_dir's latest checkpoint, parallelized.

    Checkpoints hold every expert whatever the world size: each rank loads the whole model, then keeps its part.
    """
    existing = latest_checkpoint(cfg.out_dir)
    if resume and existing is None:
        raise DynamoeError(f"nothing to resume: {cfg.out_dir} holds no checkpoint; drop --resume to start a new run there")
    if not resume and existing is not None:
        raise DynamoeError(f"{cfg.out_dir} already holds a checkpoint ({existing.name}); "
                           "use --resume to continue it or another --out to start a new run")
    # Seeding before the model is built makes the initial weights a function of the seed.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if existing is None:
        model = parallel.parallelize(Transformer(model_cfg).to(device).train())
        return model, build_optimizer(model, cfg), Counters()

    model, saved_cfg = load_model(existing, device)
    _check_unchanged(existing, "model config", dataclasses.asdict(saved_cfg), dataclasses.asdict(model_cfg))
    current = cfg.to_dict()
    _check_unchanged(existing, "training settings", load_train_config(existing),
                     {name: current[name] for name in TRAJECTORY_FIELDS})
    check_same_tokenizer(existing, cfg.data_dir, "resume with the corpus it was trained on, or use another --out")
    state = load_trainer_state(existing)
    model = parallel.parallelize(model)
    optimizer = build_optimizer(model, cfg)
    try:
        optimizer.load_state_dict(parallel.shard_optimizer_state(state["optimizer"], optimizer, model))
        counters = Counters(**{f.name: int(state[f.name]) for f in dataclasses.fields(Counters)})
        set_rng_state(state["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise DynamoeError(f"{existing}/trainer_state.pt does not fit this model ({type(e).__name__}: {e}); "
                           "resume from an older checkpoint") from None
    if counters.step >= cfg.steps:
        raise DynamoeError(f"{existing} is already at step {counters.step} >= steps={cfg.steps}; "
                           "raise --steps to train further")
    return model.train(), optimizer, counters


def _check_unchanged(ckpt: Path, kind: str, saved: dict[str, Any], asked: dict[str, Any]) -> None:
    """Raise a DynamoeError naming the first of asked's fields whose value differs from the saved run's."""
    for name, value in asked.items():
        old = saved.get(name, "missing")
        if old != value:
            raise DynamoeError(f"cannot resume {ckpt}: it was trained with {name}={old!r} but {name}={value!r} was "
                               f"asked for; resume with the same {kind} or use another --out")


def _restart(cfg: TrainConfig) -> str:
    """How to carry on after a failure: from the latest checkpoint, or from scratch."""
    saved = latest_checkpoint(cfg.out_dir)
    return f"--resume from {saved}" if saved else "start again (no checkpoint was saved)"


def _save(model: Transformer, optimizer: torch.optim.Optimizer, counters: Counters, cfg: TrainConfig,
          parallel: Parallelism) -> Path:
    """Checkpoint the run after counters.step, refusing non-finite weights that would push out good checkpoints.

    With several processes, every expert is gathered to rank 0, which writes the same files one process would.
    """
    optimizer_state = parallel.full_optimizer_state(optimizer, model)
    with parallel.full_model(model) as writer:
        if not writer:
            return cfg.out_dir / checkpoint_name(counters.step)
        bad = _first_non_finite(model)
        if bad is not None:
            raise DynamoeError(f"weight {bad} is not finite after step {counters.step}, so it was not saved; "
                               f"lower --lr or lengthen warm-up, then {_restart(cfg)}")
        state = {**dataclasses.asdict(counters), "optimizer": optimizer_state, "rng": rng_state()}
        return save_checkpoint(cfg.out_dir, counters.step, model, state, cfg.to_dict(),
                               cfg.data_dir / TOKENIZER_FILE, keep=cfg.keep_checkpoints)


def _first_non_finite(model: Transformer) -> str | None:
    """The name of the first weight or buffer holding a NaN or infinity, if any."""
    tensors = {name: tensor for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    finite = torch.stack([torch.isfinite(tensor).all() for tensor in tensors.values()]).tolist()  # one host sync
    return next((name for name, ok in zip(tensors, finite) if not ok), None)


def _open_log(path: Path, last_step: int) -> TextIO:
    """log.jsonl opened for appending, without the lines a killed run wrote after step last_step."""
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a kill
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return open(path, "a")


def _record(step: int, result: StepResult, lr: float, tokens_per_s: float, counters: Counters,
            val_loss: float | None) -> dict[str, Any]:
    mean_k = float(np.mean(result.mean_k_per_layer)) if result.mean_k_per_layer else None
    record: dict[str, Any] = {
        "step": step, "loss": result.loss, "lm_loss": result.lm_loss, "aux_loss": result.aux_loss, "lr": lr,
        "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s, "mean_k": mean_k,
        "mean_k_per_layer": result.mean_k_per_layer, "skipped": result.skipped, "nan_skips": counters.nan_skips,
        "tokens": counters.tokens_seen,
    }
    if val_loss is not None:
        record["val_loss"] = val_loss
    return record


def _write_log(log: TextIO, tb: SummaryWriter, record: dict[str, Any]) -> None:
    """One JSONL line (non-finite numbers as null, which strict JSON readers accept) and the TensorBoard scalars."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return [clean(v) for v in value] if isinstance(value, list) else value

    log.write(json.dumps({key: clean(value) for key, value in record.items()}) + "\n")
    log.flush()
    step = record["step"]
    for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mean_k", "nan_skips"):
        if record[key] is not None:
            tb.add_scalar(f"train/{key}", record[key], step)
    for layer, mean_k in enumerate(record["mean_k_per_layer"]):
        tb.add_scalar(f"mean_k/layer{layer}", mean_k, step)
    if "val_loss" in record:
        tb.add_scalar("val/loss", record["val_loss"], step)


def _postfix(result: StepResult, tokens_per_s: float, counters: Counters) -> dict[str, str]:
    postfix = {"loss": f"{result.loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
    if result.mean_k_per_layer:
        postfix["k"] = f"{np.mean(result.mean_k_per_layer):.2f}"
    if counters.nan_skips:
        postfix["skipped"] = str(counters.nan_skips)
    return postfix
