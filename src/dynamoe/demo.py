"""The main job: a static top-k MoE and a dynamic MoE, same architecture and token budget, side by side."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dynamoe import runs
from dynamoe.checkpoint import load_model
from dynamoe.config import ModelConfig, preset, with_dense_warmup
from dynamoe.data import build_corpus
from dynamoe.evaluate import EvalReport, evaluate_tokens, split_tokens_by_domain
from dynamoe.train import TrainConfig, resolve_device


@dataclass(frozen=True)
class DemoProfile:
    """Corpus size, token budget and evaluation size of one demo run."""

    name: str
    bytes_per_domain: int
    vocab_size: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    eval_tokens: int  # per domain
    preset: str = "small"


FULL = DemoProfile("full", bytes_per_domain=1_500_000, vocab_size=8192, steps=300, batch_size=8, seq_len=256,
                   lr=3e-3, warmup_steps=30, eval_tokens=16_384)
QUICK = DemoProfile("quick", bytes_per_domain=400_000, vocab_size=4096, steps=100, batch_size=4, seq_len=128,
                    lr=3e-3, warmup_steps=10, eval_tokens=2_048)
TARGET_K = 3.0
DENSE_WARMUP = 0.6  # as the headline experiment: the dynamic router holds k_max for 30% of the steps, then falls over 30%
STATIC, DYNAMIC = "static", "dynamic"  # the models' keys, which also name their run folders


@dataclass(frozen=True)
class DemoModel:
    """One model of the comparison: its column title and its config."""

    title: str
    config: ModelConfig


def demo_models(profile: DemoProfile) -> dict[str, DemoModel]:
    """Static top-k at k = target and the dynamic router aimed at the same mean k (warmed up from dense routing)."""
    common = dict(vocab_size=profile.vocab_size, max_seq_len=profile.seq_len)
    static = preset(profile.preset, router="topk", top_k=int(TARGET_K), **common)
    dynamic = with_dense_warmup(preset(profile.preset, router="dynamic", target_k=TARGET_K, **common), profile.steps,
                                DENSE_WARMUP)
    return {STATIC: DemoModel(f"static top-{int(TARGET_K)}", static),
            DYNAMIC: DemoModel(f"dynamic (target k={TARGET_K:g})", dynamic)}


def training_job(model: DemoModel, profile: DemoProfile, data_dir: Path, run_dir: Path) -> runs.TrainingJob:
    """How one demo model trains (or resumes, or is reused when complete): both on the same budget and seed."""
    train_cfg = TrainConfig(data_dir=data_dir, out_dir=run_dir, steps=profile.steps, batch_size=profile.batch_size,
                            lr=profile.lr, warmup_steps=profile.warmup_steps, save_every=max(profile.steps // 4, 1),
                            eval_every=profile.steps, seed=0)
    return runs.TrainingJob(model.title, model.config, train_cfg, tag="demo")


def side_by_side(reports: dict[str, EvalReport], summaries: dict[str, dict]) -> str:
    """One table with a column per model: per-domain perplexity, mean k, training speed."""
    names = list(reports)
    width = max(24, *(len(n) + 2 for n in names))
    lines = [f"{'':<22}" + "".join(f"{n:>{width}}" for n in names)]
    for i, domain in enumerate(r.domain for r in reports[names[0]].domains):
        lines.append(f"{'ppl ' + domain:<22}" + "".join(f"{reports[n].domains[i].perplexity:>{width}.2f}" for n in names))
    lines.append(f"{'ppl all':<22}" + "".join(f"{reports[n].total.perplexity:>{width}.2f}" for n in names))
    for i, domain in enumerate(r.domain for r in reports[names[0]].domains):
        lines.append(f"{'mean k ' + domain:<22}" + "".join(f"{reports[n].domains[i].mean_k:>{width}.2f}" for n in names))
    lines.append(f"{'mean k all':<22}" + "".join(f"{reports[n].total.mean_k:>{width}.2f}" for n in names))
    lines.append(f"{'train tokens/s':<22}" + "".join(f"{summaries[n]['tokens_per_s']:>{width}.0f}" for n in names))
    lines.append(f"{'train wall s':<22}" + "".join(f"{summaries[n]['wall_time_s']:>{width}.0f}" for n in names))
    return "\n".join(lines)


def k_variety(report: EvalReport, min_share: float = 0.05) -> list[int]:
    """The values of k used by at least min_share of (token, layer) decisions."""
    return [k for k, share in enumerate(report.k_shares()) if share >= min_share]


def run_demo(quick: bool = False, out_root: Path = Path("runs/demo"), data_root: Path = Path("data"),
             profile: DemoProfile | None = None, workers: int | None = None) -> dict:
    """Build the corpus, train both models (or reuse them), evaluate, print and save the comparison.

    workers: trainings at once in separate processes (default: one per CPU core, so both at once on 2 cores).
    """
    profile = profile or (QUICK if quick else FULL)
    started = time.perf_counter()
    data_dir = build_corpus(data_root / f"demo-{profile.name}", vocab_size=profile.vocab_size,
                            bytes_per_domain=profile.bytes_per_domain, seed=0)
    tokens = split_tokens_by_domain(data_dir, "test")
    models = demo_models(profile)
    run_dirs = {key: out_root / profile.name / key for key in models}
    jobs = [training_job(model, profile, data_dir, run_dirs[key]) for key, model in models.items()]
    workers, threads = runs.default_workers(resolve_device("auto"), workers)
    summaries = {job.title: summary for job, summary in zip(jobs, runs.train_jobs(jobs, workers, threads))}
    reports: dict[str, EvalReport] = {model.title: evaluate_tokens(load_model(run_dirs[key])[0], tokens,
                                                                   max_tokens=profile.eval_tokens)
                                      for key, model in models.items()}
    wall = time.perf_counter() - started
    dynamic = reports[models[DYNAMIC].title]
    used = k_variety(dynamic)
    table = side_by_side(reports, summaries)
    shares = "  ".join(f"k={k}: {s:.1%}" for k, s in enumerate(dynamic.k_shares()) if s > 0)
    on_target = abs(dynamic.total.mean_k - TARGET_K) <= 0.1 * TARGET_K
    print()
    print(table)
    print(f"\ndynamic k histogram: {shares}")
    print(f"k values used by >=5% of decisions: {used} ({'ok' if len(used) >= 3 else 'fewer than 3'}); "
          f"mean k {dynamic.total.mean_k:.2f} vs target {TARGET_K:g} ({'within' if on_target else 'outside'} ±10%)")
    print(f"demo ({profile.name}) finished in {wall:.0f} s ({len(jobs)} trainings, {workers} at a time, {threads} thread{'s' * (threads != 1)} each; "
          f"evaluation on {torch.get_num_threads()} threads), {platform.processor() or platform.machine()}")
    results = {
        "profile": asdict(profile), "wall_time_s": wall, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "training_workers": workers, "training_threads": threads,
        "models": {n: {"eval": reports[n].to_dict(), "train": summaries[n]} for n in reports},
        "dynamic_k_values_over_5pct": used, "dynamic_mean_k_within_10pct": on_target,
    }
    out_dir = out_root / profile.name
    out_dir.mkdir(parents=True, exist_ok=True)
    runs.write_json(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(f"```\n{table}\n\ndynamic k histogram: {shares}\n```\n")
    print(f"results written to {out_dir}/results.json and results.md")
    return results
