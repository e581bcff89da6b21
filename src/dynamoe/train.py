"""The training loop: AdamW with warm-up and cosine decay, gradient accumulation and clipping,
non-finite steps skipped, the routers' compute controllers stepped, periodic evaluation, logging
(progress bar, TensorBoard, JSONL) and atomic checkpoints that resume bit-for-bit. SIGTERM, SIGINT and
SIGUSR1 (cluster preemption) stop it at the next step boundary, after a checkpoint of that step.

On a GPU the loop never waits for the step it has just queued: skipping, the controllers and the batches'
copies stay on the device, and the host reads a step's numbers once the next step is queued (at once only
before it evaluates or saves). bf16 autocast is on there by default (`precision`).

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
import signal
import threading
import time
from collections import deque
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TextIO

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dynamoe.checkpoint import (OLDER_CHECKPOINT, check_same_tokenizer, checkpoint_bytes, checkpoint_name,
                                complete_checkpoints, first_non_finite, latest_checkpoint, load_model, load_train_config,
                                load_trainer_state, point_latest_at, rng_state, run_checkpoint, save_checkpoint,
                                set_rng_state)
from dynamoe.config import ModelConfig, check_field_types, dataclass_from_dict, requirement
from dynamoe.data import TokenDataset, load_tokenizer
from dynamoe.data.shards import read_meta
from dynamoe.data.tokenizer import TOKENIZER_FILE
from dynamoe.errors import DynamoeError
from dynamoe.model import Transformer
from dynamoe.model.need import supervise_need
from dynamoe.parallel import Parallelism, SingleProcess, distributed, world_size_from_env
from dynamoe.resources import check_memory, check_writable, training_bytes, writing

MAX_CONSECUTIVE_SKIPS = 20  # this many non-finite steps in a row means the run has diverged
K_WINDOW = 20  # the summary's mean experts/token averages this many final steps
# The settings that shape the trajectory a resume must continue; the rest may change between runs.
TRAJECTORY_FIELDS = ("batch_size", "grad_accum", "seq_len", "lr", "min_lr", "warmup_steps", "decay_steps",
                     "weight_decay", "betas", "grad_clip", "seed")
# Signals that stop training at the next step boundary, after a checkpoint: Ctrl-C, `kill`, and SIGUSR1, which
# cluster schedulers (e.g. Slurm's --signal) send ahead of preemption.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
RESUME_HINT = "run the same command with --resume to continue"


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
    # "auto": bf16 autocast on a CUDA GPU that supports it, float32 elsewhere; "bf16" asks for it on any device.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
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
        check_field_types(self, "train config")  # JSON hands back strings and lists: the declared types either way
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
        need(self.lr > 0, f"lr={self.lr} must be positive")
        need(0 <= self.lr_floor <= self.lr, f"min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(self.decay_steps is None or self.decay_steps >= 1, f"decay_steps={self.decay_steps} must be at least 1")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(all(0 <= b < 1 for b in self.betas), f"betas={self.betas} must both be in [0, 1)")
        need(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        need(self.save_every >= 1 and self.log_every >= 1, "save_every and log_every must be at least 1")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be at least 1")
        need(self.eval_every >= 0 and self.eval_batches >= 0, "eval_every and eval_batches must be >= 0")
        need(self.expert_parallel >= 1, f"expert_parallel={self.expert_parallel} must be at least 1")
        need(math.isfinite(self.dist_timeout) and self.dist_timeout > 0, f"dist_timeout={self.dist_timeout} must be positive")
        # _start hands the seed to np.random.seed, which takes 32 bits.
        need(0 <= self.seed < 2**32, f"seed={self.seed} must be in [0, 2**32)")
        parse_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings)."""
        data = dataclasses.asdict(self)
        data.update(data_dir=str(self.data_dir), out_dir=str(self.out_dir), betas=list(self.betas))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, rejecting unknown keys with a clear message."""
        return dataclass_from_dict(cls, data, "train config")


class TrainingStopped(DynamoeError):
    """A stop signal ended training before its last step, after a checkpoint of the step it had reached."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"training stopped by {signal.Signals(signal_number).name} after step {step}, saved in "
                         f"{checkpoint}; {RESUME_HINT}")
        self.exit_code = 128 + signal_number  # as if the signal had ended the process, which schedulers expect


class StopSignals:
    """While entered (in the main thread), remembers the first stop signal instead of dying of it; a second
    signal acts as it would without training (Ctrl-C twice stops at once)."""

    def __init__(self) -> None:
        self.received = 0  # the signal number, 0 while none came
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {number: signal.signal(number, self._remember) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _remember(self, number: int, frame: FrameType | None) -> None:
        self.received = number
        self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


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


@dataclass(frozen=True)
class QueuedStep:
    """An optimizer step as the device measured it, read on the host only when the loop needs it."""

    measured: torch.Tensor  # loss, lm_loss, aux_loss, grad norm, applied (1 or 0), then the mean k of each MoE layer
    copied: torch.cuda.Event | None = None  # on a GPU: recorded once `measured` is on its way to pinned host memory

    @classmethod
    def queue(cls, measured: torch.Tensor) -> "QueuedStep":
        """Start the one device-to-host copy of a step's numbers; on a GPU without waiting for it.

        Reading the device tensor later would wait for every step queued since; the event marks this one's end.
        """
        if not measured.is_cuda:
            return cls(measured)
        host = torch.empty(measured.shape, dtype=measured.dtype, pin_memory=True)
        host.copy_(measured, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(host, copied)

    def read(self) -> StepResult:
        """The step's numbers on the host: waits for this step to finish, not for the ones queued after it."""
        if self.copied is not None:
            self.copied.synchronize()
        loss, lm_loss, aux_loss, norm, applied, *mean_k = self.measured.tolist()
        return StepResult(loss, lm_loss, aux_loss, norm, mean_k, skipped=not applied)


def model_config_for_data(cfg: ModelConfig, data_dir: Path) -> ModelConfig:
    """cfg with vocab_size set to the size of data_dir's tokenizer."""
    return dataclasses.replace(cfg, vocab_size=read_meta(Path(data_dir))["vocab_size"])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up, cosine to min_lr, then flat."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.decay_end - cfg.warmup_steps))
    return cfg.lr_floor + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.lr_floor)


def parse_device(name: str) -> torch.device | None:
    """The device a device string names (None for "auto"), refusing any but the CPU and CUDA GPUs."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DynamoeError(f"device={name!r} is not a device dynamoe runs on; use auto, cpu, cuda or cuda:N")
    return device


def resolve_device(name: str) -> torch.device:
    """The torch device for a device string ("auto" picks cuda when there is one), which must exist here."""
    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DynamoeError(f"device {name!r} was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DynamoeError(f"device {name!r} was asked for but this machine has {torch.cuda.device_count()} GPU(s), "
                           "numbered from 0")
    return device


def build_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (see TrainConfig.weight_decay); fused on a GPU (see step_if_finite)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=params[0].is_cuda or None)


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """optimizer.step() unless `finite` (a bool tensor) is false.

    A fused AdamW (on a GPU) skips on the device through its found_inf input, as under torch's GradScaler,
    so the host never waits for the step. Another optimizer is decided on the host: a read that costs nothing
    on a CPU, where the default AdamW keeps the updates bit-identical to those of earlier versions.
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]  # read by the fused step
        optimizer.step()
    elif finite:
        optimizer.step()


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """bf16 autocast for `precision` "bf16", or "auto" on a CUDA GPU with bf16; otherwise a context that changes nothing."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on the device; to a GPU through pinned memory without waiting, so the host can run ahead."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def evaluate_loss(model: Transformer, data: TokenDataset, cfg: TrainConfig, seq_len: int, device: torch.device,
                  parallel: Parallelism = SingleProcess()) -> float:
    """Mean LM loss (no auxiliary losses) over the first eval_batches batches of a split."""
    model.eval()
    losses = []
    for index in range(cfg.eval_batches):
        x, y = data.batch(index, cfg.batch_size, seq_len, cfg.seed)
        with autocast(device, cfg.precision):
            losses.append(model(to_device(parallel.local_rows(x), device), to_device(parallel.local_rows(y), device)).lm_loss)
    model.train()
    return parallel.mean(torch.stack(losses).mean()).item()


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, data: TokenDataset, cfg: TrainConfig,
               step: int, seq_len: int, device: torch.device, parallel: Parallelism = SingleProcess()) -> QueuedStep:
    """Accumulate grad_accum micro-batches, clip, then step the optimizer and controllers, or skip if non-finite.

    Nothing here waits for a GPU (see step_if_finite, QueuedStep): the step is queued, and QueuedStep.read gives
    its numbers.
    With several processes, each takes its slice of every micro-batch and the measurements are averaged
    over them, so every rank takes the same decisions.
    """
    losses = torch.zeros(3, device=device)  # loss, lm_loss, aux_loss summed over micro-batches
    k_per_layer = torch.zeros(len(model.routers()), device=device)
    for micro in range(cfg.grad_accum):
        x, y = data.batch((step - 1) * cfg.grad_accum + micro, cfg.batch_size, seq_len, cfg.seed)
        x, y = to_device(parallel.local_rows(x), device), to_device(parallel.local_rows(y), device)
        with autocast(device, cfg.precision):
            supervise_need(model, x, y, step)  # need routers only: the benefit of experts, measured on a few rows
            out = model(x, y)
        (out.loss / cfg.grad_accum).backward()
        losses += torch.stack([out.loss, out.lm_loss, out.aux_loss]).detach()
        if out.routings:
            k_per_layer += torch.stack([r.stats["mean_k"] for r in out.routings])
    parallel.reduce_gradients(model)
    grad_norm = parallel.clip_grad_norm_(model, cfg.grad_clip if cfg.grad_clip > 0 else math.inf).reshape(1).to(device)
    measured = parallel.mean(torch.cat([losses, k_per_layer]) / cfg.grad_accum)
    finite = measured[0].isfinite() & grad_norm[0].isfinite()
    step_if_finite(optimizer, finite)
    # A skipped step leaves weights, optimizer moments and controllers exactly as they were.
    model.update_controllers(measured[3:], finite)
    optimizer.zero_grad(set_to_none=True)
    return QueuedStep.queue(torch.cat([measured[:3], grad_norm, finite.reshape(1).float(), measured[3:]]))


def reads_at_once(step: int, cfg: TrainConfig, evaluates: bool) -> bool:
    """Whether the loop needs a step's numbers before it queues the next: it is the last, or saves or evaluates after it."""
    return step == cfg.steps or step % cfg.save_every == 0 or (evaluates and cfg.eval_every > 0 and step % cfg.eval_every == 0)


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, resume: bool = False,
          resume_from: int | Path | None = None) -> TrainSummary:
    """Train a model on train_cfg.data_dir into train_cfg.out_dir.

    resume=True continues out_dir's latest checkpoint, or starts afresh when it holds none (so that one command
    serves the first run and every requeue); resume_from continues a chosen checkpoint of out_dir instead (a step,
    or the path of its ckpt-* folder). A resume must keep the model config, the tokenizer and the TRAJECTORY_FIELDS
    of the saved run; steps, saving, logging, evaluation, device and progress may change. Raising steps without a
    fixed decay_steps stretches the cosine to the new end, so the resumed steps differ from a longer run's.
    Launched by torchrun, the processes split every batch (and the experts, by expert_parallel) and
    take the steps one process would; the world size may change between resumes.
    A stop signal (STOP_SIGNALS) ends the run at the next step boundary with a checkpoint and TrainingStopped.
    """
    device = resolve_device(train_cfg.device)
    # From the start: a signal during the set-up stops the run after its first step.
    with StopSignals() as stop:
        if world_size_from_env() == 1:
            if train_cfg.expert_parallel != 1:
                raise DynamoeError(f"--expert-parallel {train_cfg.expert_parallel} splits the experts over that many "
                                   f"processes; launch with torchrun --nproc_per_node {train_cfg.expert_parallel} "
                                   "-m dynamoe train ...")
            return _train(model_cfg, train_cfg, device, resume, resume_from, stop, SingleProcess())
        with distributed(train_cfg.expert_parallel, device.type, train_cfg.dist_timeout) as parallel:
            return _train(model_cfg, train_cfg, parallel.mesh.device, resume, resume_from, stop, parallel)


def _train(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, resume: bool, resume_from: int | Path | None,
           stop: StopSignals, parallel: Parallelism) -> TrainSummary:
    started = time.perf_counter()
    seq_len, train_data, val_data = _check_ready(model_cfg, cfg, device, parallel)
    model, optimizer, counters = _start(model_cfg, cfg, device, resume, resume_from, parallel)
    first_step, tokens_per_step = counters.step + 1, cfg.batch_size * cfg.grad_accum * seq_len

    # Rank 0 alone writes the log, TensorBoard events and checkpoints. purge_step hides the events
    # a killed run wrote past the checkpoint it resumes from.
    with writing(cfg.out_dir, "the training logs", then=RESUME_HINT):
        writers = (_open_log(cfg.out_dir / "log.jsonl", counters.step),
                   SummaryWriter(str(cfg.out_dir / "tb"), purge_step=counters.step + 1)) if parallel.is_main else None
    bar = tqdm(total=cfg.steps, initial=counters.step, disable=not (cfg.progress and parallel.is_main), desc="train",
               dynamic_ncols=True)
    recent_k: deque[list[float]] = deque(maxlen=K_WINDOW)
    # Seconds spent training (queuing steps and waiting for their numbers): throughput ignores evals and saves.
    train_time, window_time, window_steps, unattributed = 0.0, 0.0, 0, 0.0
    result, val_loss, ckpt, pending = None, None, None, None
    try:
        for step in range(first_step, cfg.steps + 1):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            tick = time.perf_counter()
            queued = train_step(model, optimizer, train_data, cfg, step, seq_len, device, parallel)
            # The previous step's numbers are read now that this one is queued, so a GPU never waits for the host;
            # a step that saves or evaluates after itself is read at once.
            done = [] if pending is None else [(step - 1, pending.read())]
            pending = queued
            # Every rank asks every step, so that all stop after the same one, whichever got the signal.
            stopped = parallel.max_over_ranks(stop.received)
            if stopped or reads_at_once(step, cfg, val_data is not None):
                done, pending = [*done, (step, queued.read())], None
            unattributed += time.perf_counter() - tick
            for done_step, result in done:
                elapsed = unattributed / len(done)
                train_time, window_time, window_steps = train_time + elapsed, window_time + elapsed, window_steps + 1
                counters.advance(done_step, tokens_per_step, result.skipped)
                if not result.skipped and result.mean_k_per_layer:
                    recent_k.append(result.mean_k_per_layer)

                last = done_step == cfg.steps
                if last:
                    # Before the final evaluation, so that nothing failing after the last step can cost the run.
                    ckpt = _save(model, optimizer, counters, cfg, parallel)
                val_loss = None
                if val_data is not None and (last or (cfg.eval_every > 0 and done_step % cfg.eval_every == 0)):
                    val_loss = evaluate_loss(model, val_data, cfg, seq_len, device, parallel)
                if done_step % cfg.log_every == 0 or last or val_loss is not None or result.skipped:
                    tokens_per_s = window_steps * tokens_per_step / window_time
                    if writers is not None:
                        _write_log(*writers, _record(done_step, result, lr_at(done_step, cfg), tokens_per_s, counters, val_loss))
                    window_time, window_steps = 0.0, 0
                postfix = _postfix(result, tokens_per_step / elapsed, counters)
                bar.update(1)
                bar.set_postfix(postfix, refresh=False)

                if counters.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    raise DynamoeError(f"training diverged: {counters.consecutive_skips} steps in a row up to step {done_step} "
                                       f"had a non-finite loss or gradient; lower --lr or lengthen warm-up, then {_restart(cfg)}")
                # Saved after the step's log line, so a resume from it never lacks that line.
                if done_step % cfg.save_every == 0 and not last:
                    ckpt = _save(model, optimizer, counters, cfg, parallel)
                if cfg.status_lines and parallel.is_main and (last or done_step % cfg.save_every == 0):
                    status = ", ".join(f"{key} {value}" for key, value in postfix.items())
                    print(f"[{cfg.out_dir.name}] step {done_step}/{cfg.steps}: {status}", flush=True)
                if stopped and done_step == step and not last:  # read at once (above): no step is left queued
                    if done_step % cfg.save_every:
                        ckpt = _save(model, optimizer, counters, cfg, parallel)
                    raise TrainingStopped(stopped, done_step, ckpt)
            if done:
                unattributed = 0.0
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


def _check_ready(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device,
                 parallel: Parallelism) -> tuple[int, TokenDataset, TokenDataset | None]:
    """What a run could otherwise fail on later, checked before anything is allocated: the corpus and its
    tokenizer, the model against them, the batch against the world size, memory, and the output folder's room.

    Returns the sequence length and the train and val (None without evaluation) splits.
    """
    load_tokenizer(cfg.data_dir)  # every checkpoint copies it: without one, the first save would fail
    train_data = TokenDataset(cfg.data_dir, "train")
    val_data = TokenDataset(cfg.data_dir, "val") if cfg.eval_batches else None
    seq_len = _check_fits(model_cfg, cfg, [train_data] if val_data is None else [train_data, val_data])
    if cfg.batch_size % parallel.world_size:
        raise DynamoeError(f"batch_size={cfg.batch_size} (the global batch) cannot be split evenly over "
                           f"{parallel.world_size} processes; use a multiple of {parallel.world_size}")
    needed = training_bytes(model_cfg, cfg.batch_size // parallel.world_size, seq_len, cfg.expert_parallel)
    check_memory(needed, device, "training this model at this batch size",
                 "lower --batch-size or --seq-len, or use a smaller model")
    if parallel.is_main:
        # Room for keep_checkpoints of them, and one more while a save replaces the oldest; those there count.
        missing = cfg.keep_checkpoints + 1 - len(complete_checkpoints(cfg.out_dir))
        check_writable(cfg.out_dir, checkpoint_bytes(model_cfg) * max(1, missing), "the run's checkpoints")
    return seq_len, train_data, val_data


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


def _start(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, resume: bool, resume_from: int | Path | None,
           parallel: Parallelism) -> tuple[Transformer, torch.optim.AdamW, Counters]:
    """A fresh seeded model and optimizer, or those of the checkpoint resumed from, parallelized.

    Checkpoints hold every expert whatever the world size: each rank loads the whole model, then keeps its part.
    """
    existing = _resume_point(cfg, resume, resume_from)
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
                           f"{OLDER_CHECKPOINT}") from None
    if counters.step >= cfg.steps:
        raise DynamoeError(f"{existing} is already at step {counters.step} >= steps={cfg.steps}; "
                           "raise --steps to train further")
    if resume_from is not None and parallel.is_main:
        point_latest_at(existing)  # so that a kill before the next save resumes from here again, not from later
    return model.train(), optimizer, counters


def _resume_point(cfg: TrainConfig, resume: bool, resume_from: int | Path | None) -> Path | None:
    """The checkpoint a run continues: the one asked for, out_dir's latest on resume, or none (a fresh run)."""
    if resume_from is not None:
        return run_checkpoint(cfg.out_dir, resume_from)
    latest = latest_checkpoint(cfg.out_dir)
    if latest is not None and not resume:
        raise DynamoeError(f"{cfg.out_dir} already holds a checkpoint ({latest.name}); "
                           "use --resume to continue it or another --out to start a new run")
    return latest


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
        bad = first_non_finite(model.state_dict())
        if bad is not None:
            raise DynamoeError(f"weight {bad} is not finite after step {counters.step}, so it was not saved; "
                               f"lower --lr or lengthen warm-up, then {_restart(cfg)}")
        state = {**dataclasses.asdict(counters), "optimizer": optimizer_state, "rng": rng_state()}
        return save_checkpoint(cfg.out_dir, counters.step, model, state, cfg.to_dict(), cfg.data_dir / TOKENIZER_FILE,
                               keep=cfg.keep_checkpoints, then=RESUME_HINT)


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

    with writing(Path(log.name).parent, "the training log", then=RESUME_HINT):
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
