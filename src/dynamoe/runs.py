"""Run folders that a job owns (the demo, the headline experiment): train a model into one, resume it after
a kill, or reuse it once finished, and write the job's JSON files atomically."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from dynamoe.checkpoint import latest_checkpoint, load_config, load_train_config, load_trainer_state
from dynamoe.config import ModelConfig
from dynamoe.errors import DynamoeError
from dynamoe.train import TRAJECTORY_FIELDS, TrainConfig, train

SUMMARY_FILE = "summary.json"
PARENT_POLL_SECONDS = 1.0  # how often a training worker checks that the job that started it still runs
# What a checkpoint's saved training settings must share with the wanted run for the job to reuse or resume
# it: the trajectory, the planned length (a finished shorter run resumed to more steps would follow another
# cosine than a fresh run) and the corpus.
RECIPE_FIELDS = (*TRAJECTORY_FIELDS, "steps", "data_dir")


def train_or_reuse(title: str, model_cfg: ModelConfig, train_cfg: TrainConfig, tag: str) -> dict[str, Any]:
    """Train model_cfg into train_cfg.out_dir, resume it if it was interrupted, or reuse it if it is complete.

    Returns the run's summary (TrainSummary fields, checkpoint path, model config), also saved as summary.json.
    """
    run_dir = train_cfg.out_dir
    summary_path = run_dir / SUMMARY_FILE
    summary = read_json(summary_path)
    ckpt = latest_checkpoint(run_dir)
    if (summary and summary.get("model_config") == model_cfg.to_dict() and summary.get("step") == train_cfg.steps
            and ckpt is not None and _same_recipe(ckpt, train_cfg)):
        print(f"[{tag}] reusing {title} from {run_dir}")
        return summary
    resume = ckpt is not None and _resumable(ckpt, model_cfg, train_cfg)
    if ckpt is not None and not resume:
        # The job owns its run folders; one it can neither reuse nor resume (finished but without a
        # summary, or another config or recipe) would otherwise block training for good.
        print(f"[{tag}] {run_dir} holds a run the {tag} can neither reuse nor resume; training it again from scratch")
        shutil.rmtree(run_dir)
    seq_len = train_cfg.seq_len or model_cfg.max_seq_len
    print(f"[{tag}] {'resuming' if resume else 'training'} {title} ({train_cfg.steps} steps of "
          f"{train_cfg.batch_size * train_cfg.grad_accum}x{seq_len} tokens)")
    result = train(model_cfg, train_cfg, resume=resume)
    summary = {**asdict(result), "checkpoint": str(result.checkpoint), "model_config": model_cfg.to_dict()}
    write_json(summary_path, summary)
    return summary


@dataclass(frozen=True)
class TrainingJob:
    """One model a job trains into its run folder (the arguments of train_or_reuse)."""

    title: str
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    tag: str


def default_workers(device: str | torch.device, jobs: int | None = None) -> tuple[int, int]:
    """(trainings at once, CPU threads each): `jobs` or one per core up to 4 on CPU (one on a GPU), sharing the cores.

    Small models train faster as separate one-thread processes than as one process on every core
    (measured on 2 cores: two one-thread trainings ran at about 1,300 tokens/s each, where one
    two-thread training beside other work stalled at 150-300).
    """
    cores = os.cpu_count() or 1
    if jobs is None:
        jobs = max(1, min(cores, 4)) if torch.device(device).type == "cpu" else 1
    return jobs, max(1, cores // jobs)


def train_jobs(jobs: Sequence[TrainingJob], workers: int = 1, threads: int | None = None) -> list[dict[str, Any]]:
    """train_or_reuse every job, in order in this process, or `workers` at a time in separate processes of `threads`
    CPU threads each.

    Jobs are independent, so the runs and their summaries are the same either way (for a given thread
    count). In worker processes the per-step progress bars are off: several would garble one terminal.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [_train_job(job) for job in jobs]
    quiet = [replace(job, train_cfg=replace(job.train_cfg, progress=False, status_lines=True)) for job in jobs]
    # spawn, not fork: a forked child would inherit the parent's OpenMP thread pool in an unusable state.
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=start_worker, initargs=(threads or 1,)) as pool:
        return list(pool.map(_train_job, quiet))


def start_worker(threads: int) -> None:
    """A training worker's set-up: its CPU threads, and a watch on the job that started it. A kill of the job's
    process alone (`kill PID`: Ctrl-C reaches the workers too) would otherwise leave its workers training on into
    folders nobody reads; once the job is gone, the worker stops as on SIGTERM (a checkpoint at the next step
    boundary, which the job resumes when run again)."""
    torch.set_num_threads(threads)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-the-job", daemon=True).start()


def _train_job(job: TrainingJob) -> dict[str, Any]:
    """train_or_reuse in a worker process (a module-level function, so that it pickles)."""
    return train_or_reuse(job.title, job.model_cfg, job.train_cfg, job.tag)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _recipe(settings: dict[str, Any]) -> dict[str, Any]:
    """The RECIPE_FIELDS of saved or wanted training settings, with JSON's lists and strings normalised."""
    recipe = {name: settings.get(name) for name in RECIPE_FIELDS}
    recipe["betas"] = list(recipe["betas"] or [])
    recipe["data_dir"] = str(Path(recipe["data_dir"] or "").resolve())
    return recipe


def _same_recipe(ckpt: Path, train_cfg: TrainConfig) -> bool:
    """True when the checkpoint was trained with train_cfg's recipe (an unreadable one never is)."""
    try:
        return _recipe(load_train_config(ckpt)) == _recipe(train_cfg.to_dict())
    except DynamoeError:
        return False


def _resumable(ckpt: Path, model_cfg: ModelConfig, train_cfg: TrainConfig) -> bool:
    """True when a readable checkpoint of model_cfg and train_cfg's recipe stopped short of its steps."""
    try:
        return (load_config(ckpt) == model_cfg and _same_recipe(ckpt, train_cfg)
                and int(load_trainer_state(ckpt)["step"]) < train_cfg.steps)
    except DynamoeError:
        return False  # an unreadable checkpoint cannot be resumed either
