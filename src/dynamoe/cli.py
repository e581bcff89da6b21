"""Command-line interface: one typed function per subcommand, and the parser is built from their signatures.

Each parameter's annotation is `Annotated[type, "help"]` (plus an optional "--flag" when the flag name
differs from the parameter's); defaults come from the signature, so nothing is written twice. Bad input
ends in a one-line error and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

from dynamoe.bench import BenchSettings
from dynamoe.config import PRESETS, ROUTERS, ModelConfig
from dynamoe.errors import DynamoeError
from dynamoe.retrofit import RetrofitConfig
from dynamoe.train import TrainConfig

DEFAULT_DATA = Path("data/corpus")
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
BENCH_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BenchSettings)}
RETROFIT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RetrofitConfig)}

Checkpoint = Annotated[Path, "checkpoint folder, or run folder (its latest checkpoint)"]
Device = Annotated[str, "auto (cuda when present), cpu, cuda or cuda:N"]
WeightDType = Annotated[Literal["float32", "bfloat16", "int8"], "weights: bfloat16 reads half the bytes (oneDNN-packed where "
                        "the CPU supports it); int8 a quarter (weight-only, one scale per output column, computed in float32; the "
                        "weights are packed)"]
Threshold = Annotated[float | None, "compute dial of topp/dynamic routers: the probability mass the chosen experts must "
                                    "reach, in (0, 1]; lower runs fewer experts (default: the trained value)"]


def weight_format(dtype: str) -> dict[str, Any]:
    """load_model's dtype and int8 arguments for a --dtype choice."""
    import torch

    return {"dtype": None, "int8": True} if dtype == "int8" else {"dtype": getattr(torch, dtype), "int8": False}


def data_build(
    out: Annotated[Path, "output folder"] = DEFAULT_DATA,
    data: Annotated[Path | None, "your own .txt file, folder, or .jsonl (text, optional domain) instead of the built-in corpus"] = None,
    vocab_size: Annotated[int, "BPE vocabulary size"] = 8192,
    bytes_per_domain: Annotated[int, "cap on each built-in domain"] = 3_000_000,
    seed: Annotated[int, "seed of the splits and the math generator"] = 0,
    tokenizer: Annotated[Path | None, "encode with this tokenizer.json, or a checkpoint's (an imported model's), "
                                      "instead of training one; --vocab-size is then ignored"] = None,
    force: Annotated[bool, "rebuild even if a build with the same arguments exists"] = False,
) -> None:
    """Build the tokenizer and token shards: the built-in corpus (prose, code, math), or your files."""
    from dynamoe.checkpoint import tokenizer_file
    from dynamoe.data import build_corpus

    if tokenizer is not None and not tokenizer.is_file():
        tokenizer = tokenizer_file(tokenizer)  # a checkpoint or run folder: its tokenizer.json, or a clear error
    path = build_corpus(out, data=data, vocab_size=vocab_size, bytes_per_domain=bytes_per_domain, seed=seed,
                        tokenizer=tokenizer, force=force)
    meta = json.loads((path / "meta.json").read_text())
    print(f"corpus ready at {path} (domains: {', '.join(meta['domains'])}; vocabulary {meta['vocab_size']})")


def train(
    data: Annotated[Path, "built corpus folder"] = DEFAULT_DATA,
    out: Annotated[Path, "run folder for checkpoints and logs"] = Path("runs/model"),
    preset: Annotated[str, f"model size: {', '.join(PRESETS)}"] = "small",
    router: Annotated[Literal["topk", "dynamic", "topp", "relu", "dtopp", "need", "null"], "routing rule"] = "dynamic",
    ffn: Annotated[Literal["moe", "dense"], "dense: the baseline with top-k's active size"] = "moe",
    target_k: Annotated[float | None, "mean experts/token the controller aims at (preset default: 3)"] = None,
    top_k: Annotated[int | None, "experts per token of the static router (preset default: 2)"] = None,
    seq_len: Annotated[int | None, "context length (default: the preset's)"] = None,
    model: Annotated[list[str] | None, "more model config fields as KEY=VALUE, e.g. n_experts=32 threshold=0.6"] = None,
    steps: Annotated[int, "optimizer steps"] = TRAIN_DEFAULTS["steps"],
    batch_size: Annotated[int, "sequences per micro-batch, over all processes"] = TRAIN_DEFAULTS["batch_size"],
    grad_accum: Annotated[int, "micro-batches per optimizer step"] = TRAIN_DEFAULTS["grad_accum"],
    lr: Annotated[float, "peak learning rate"] = TRAIN_DEFAULTS["lr"],
    min_lr: Annotated[float | None, "end of the cosine (default: lr / 10)"] = None,
    warmup_steps: Annotated[int, "linear warm-up steps"] = TRAIN_DEFAULTS["warmup_steps"],
    decay_steps: Annotated[int | None, "step where the cosine ends (default: --steps); fix it to extend a run"] = None,
    weight_decay: Annotated[float, "AdamW weight decay on matrices"] = TRAIN_DEFAULTS["weight_decay"],
    grad_clip: Annotated[float, "max gradient norm; 0 disables clipping"] = TRAIN_DEFAULTS["grad_clip"],
    seed: Annotated[int, "seed of the initialisation and the batches"] = TRAIN_DEFAULTS["seed"],
    save_every: Annotated[int, "checkpoint every N steps (and at the end)"] = TRAIN_DEFAULTS["save_every"],
    log_every: Annotated[int, "log every N steps"] = TRAIN_DEFAULTS["log_every"],
    eval_every: Annotated[int, "validation loss every N steps; 0: only at the end"] = TRAIN_DEFAULTS["eval_every"],
    eval_batches: Annotated[int, "validation batches; 0: no validation"] = TRAIN_DEFAULTS["eval_batches"],
    device: Device = "auto",
    progress: Annotated[bool, "show a progress bar"] = True,
    resume: Annotated[bool, "continue the run in --out from its latest checkpoint, or start it if it has none"] = False,
    resume_from: Annotated[str | None, "continue the run in --out from this checkpoint: a step, or one of its ckpt-* "
                                       "folders"] = None,
    expert_parallel: Annotated[int, "under torchrun: processes that split the experts between them (a divisor of the "
                                    "world size); every process trains on its slice of each batch"] = 1,
    dist_timeout: Annotated[float, "under torchrun: seconds a collective waits for the other processes before "
                                   "failing"] = TRAIN_DEFAULTS["dist_timeout"],
) -> None:
    """Train a model on a built corpus; --resume continues exactly where the run in --out stopped.

    SIGTERM, SIGINT and SIGUSR1 stop it after the current step with a checkpoint (exit code 128 + the signal).
    """
    from dynamoe import train as training
    from dynamoe.config import preset as make_preset

    overrides = {**parse_model_overrides(model or []), "router": router, "ffn": ffn}
    for name, value in (("target_k", target_k), ("top_k", top_k), ("max_seq_len", seq_len)):
        if value is not None:
            overrides[name] = value
    model_cfg = training.model_config_for_data(make_preset(preset, **overrides), data)
    train_cfg = TrainConfig(data_dir=data, out_dir=out, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                            lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, decay_steps=decay_steps,
                            weight_decay=weight_decay, grad_clip=grad_clip, seed=seed, save_every=save_every,
                            log_every=log_every, eval_every=eval_every, eval_batches=eval_batches, device=device,
                            progress=progress, expert_parallel=expert_parallel, dist_timeout=dist_timeout)
    summary = training.train(model_cfg, train_cfg, resume=resume,
                             resume_from=None if resume_from is None else _step_or_path(resume_from))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the run rather than one per process
        print(f"trained {summary.step} steps; checkpoint {summary.checkpoint}")


def evaluate(
    checkpoint: Checkpoint,
    data: Annotated[Path | None, "your own .txt file, folder or .jsonl to evaluate on"] = None,
    corpus: Annotated[Path, "built corpus whose split to evaluate on"] = DEFAULT_DATA,
    split: Annotated[Literal["train", "val", "test"], "corpus split"] = "test",
    max_tokens: Annotated[int, "tokens per domain at most"] = 50_000,
    as_json: Annotated[bool, "machine-readable output", "--json"] = False,
    threshold: Threshold = None,
    dtype: WeightDType = "float32",
    device: Device = "auto",
) -> None:
    """Perplexity per domain, experts/token per layer and domain, and the histogram of k."""
    from dynamoe.checkpoint import check_same_tokenizer, load_model, load_tokenizer_for
    from dynamoe.evaluate import evaluate_tokens, format_report, split_tokens_by_domain, user_tokens_by_domain
    from dynamoe.train import resolve_device

    if max_tokens < 1:
        raise DynamoeError(f"--max-tokens={max_tokens} must be at least 1")
    model, _ = load_model(checkpoint, device=resolve_device(device), **weight_format(dtype))
    model.layer_thresholds(threshold)  # a model without a dial refuses one before the data is read
    if data is not None:
        tokens = user_tokens_by_domain(data, load_tokenizer_for(checkpoint))
    else:
        check_same_tokenizer(checkpoint, corpus)
        tokens = split_tokens_by_domain(corpus, split)
    report = evaluate_tokens(model, tokens, max_tokens=max_tokens, progress=not as_json, dial=threshold)
    print(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report, title=str(checkpoint)))


def generate(
    checkpoint: Checkpoint,
    prompt: Annotated[str, "the text to continue"],
    max_new_tokens: Annotated[int, "tokens to generate at most"] = 128,
    temperature: Annotated[float, "0: greedy"] = 0.8,
    top_p: Annotated[float, "nucleus sampling mass; 1 keeps every token"] = 0.95,
    top_k: Annotated[int, "sample among the k most probable tokens; 0 keeps all"] = 0,
    seed: Annotated[int, "the same seed gives the same text"] = 0,
    stop: Annotated[list[str] | None, "end when the text contains one of these (not shown)"] = None,
    show_experts: Annotated[bool, "colour each token by the experts it used"] = False,
    color: Annotated[Literal["auto", "always", "never"], "colour of --show-experts; auto: on a terminal"] = "auto",
    threshold: Threshold = None,
    compile: Annotated[bool, "decode through torch.compile: faster tokens after a compilation of some seconds"] = False,
    dtype: WeightDType = "float32",
    device: Device = "auto",
) -> None:
    """Continue a prompt with a checkpoint, printing the text as it is decoded.

    The last line (on stderr) gives the speed and the kernels behind it: weight dtype, device, and whether
    the matmuls ran on the native kernel, on oneDNN-packed weights or on torch's plain matmuls.
    """
    import torch

    from dynamoe.checkpoint import load_model, load_tokenizer_for
    from dynamoe.data.tokenizer import eos_id
    from dynamoe.generate import SamplingConfig, experts_legend, paint, stream
    from dynamoe.train import resolve_device

    sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)  # before the slow load
    try:
        prompt.encode("utf-8")  # Python hands over argv bytes that are not UTF-8 as lone surrogates
    except UnicodeEncodeError:
        raise DynamoeError("--prompt holds bytes that are not UTF-8 text; set the terminal to UTF-8 "
                           "or fix the text") from None
    model, cfg = load_model(checkpoint, device=resolve_device(device), pack=True, **weight_format(dtype))
    if compile:
        model.compile_decode()
    tokenizer = load_tokenizer_for(checkpoint)
    if show_experts and not model.routers():
        raise DynamoeError(f"--show-experts needs an MoE model, but {checkpoint} is dense; drop --show-experts")
    events = stream(model, tokenizer.encode(prompt).ids, max_new_tokens, sampling, stop_ids={eos_id(tokenizer)},
                    stop=stop or (), decode=tokenizer.decode, dial=threshold)
    colour = show_experts and (color == "always" or (color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ))
    sys.stdout.write(prompt)
    sys.stdout.flush()
    experts: list[float] = []
    tokens, finish, started = 0, "length", time.perf_counter()
    for event in events:
        # Flushed per token: the point of streaming is to see each token as soon as it exists.
        sys.stdout.write(paint(event.text, event.experts) if colour and event.experts is not None else event.text)
        sys.stdout.flush()
        tokens += 1
        experts += [] if event.experts is None else [event.experts]
        finish = event.finish_reason or finish
    elapsed = time.perf_counter() - started
    print()
    if show_experts:
        print(experts_legend(experts, cfg.k_max, colour))
    print(f"[{tokens} tokens in {elapsed:.2f} s, {tokens / elapsed:.1f} tokens/s; finished: {finish}; "
          f"{model.kernel_summary()}]", file=sys.stderr)


def bench(
    checkpoints: Annotated[list[Path], "checkpoint or run folders to compare (the first is the reference of the ratios)"],
    dial: Annotated[list[float] | None, "thresholds to run each topp/dynamic checkpoint at (default: its trained one)"] = None,
    corpus: Annotated[Path, "built corpus the checkpoints were trained on (its test split)"] = DEFAULT_DATA,
    out: Annotated[Path, "folder for results.json, results.md and latency_vs_perplexity.png"] = Path("runs/bench"),
    price_per_hour: Annotated[float, "machine price, USD/hour (for cost per million tokens)"] = BENCH_DEFAULTS["price_per_hour"],
    decode_tokens: Annotated[int, "timed decode steps per round"] = BENCH_DEFAULTS["decode_tokens"],
    repeats: Annotated[int, "interleaved rounds over all variants"] = BENCH_DEFAULTS["repeats"],
    eval_tokens: Annotated[int, "held-out tokens per domain for perplexity"] = BENCH_DEFAULTS["eval_tokens"],
    batch_sizes: Annotated[list[int] | None, f"batch sizes of the decode throughput runs (default: {' '.join(map(str, BENCH_DEFAULTS['batch_sizes']))})"] = None,
    threads: Annotated[int | None, "torch CPU threads (default: torch's choice); 1 is steadiest on a busy machine"] = None,
    compile: Annotated[bool, "decode through torch.compile (compiles once per model, batch size and dial)"] = False,
    pack: Annotated[bool, "decode on packed weights (the native kernel, else oneDNN), CPU only (--no-pack: torch's plain matmuls)"] = True,
    dtype: WeightDType = "float32",
    device: Device = "auto",
    progress: Annotated[bool, "show a progress bar"] = True,
) -> None:
    """Compare checkpoints and dial settings: perplexity, decode latency, throughput, memory, cost."""
    import torch

    from dynamoe.bench import kernels_line, markdown_table, run_bench

    if threads is not None:
        set_threads(threads)
    settings = BenchSettings(decode_tokens=decode_tokens, repeats=repeats, eval_tokens=eval_tokens,
                             batch_sizes=tuple(batch_sizes or BENCH_DEFAULTS["batch_sizes"]), price_per_hour=price_per_hour)
    report = run_bench(checkpoints, corpus, out, dial=dial or (), settings=settings, device=device, progress=progress,
                       compile_decode=compile, pack=pack, **weight_format(dtype))
    print(markdown_table(report.variants))
    print(kernels_line(report.variants))
    print(f"results written to {out}")


def demo(
    quick: Annotated[bool, "the 2-minute profile: a smaller corpus and budget"] = False,
    out: Annotated[Path, "where the runs and results go"] = Path("runs/demo"),
    data_root: Annotated[Path, "where the corpus goes"] = Path("data"),
) -> None:
    """The main job: build the corpus, train static top-k and dynamic models, compare them side by side."""
    from dynamoe.demo import run_demo

    run_demo(quick=quick, out_root=out, data_root=data_root)


def experiment_headline(
    profile: Annotated[Literal["default", "quick", "gpu"], "default: 2 CPU cores, about 90 min; quick: three seeds of "
                       "smaller models, under 30 min; gpu: where a MoE pays, about 10 min on one H200"] = "default",
    quick: Annotated[bool, "the same as --profile quick"] = False,
    preset: Annotated[str | None, f"model size: {', '.join(PRESETS)} (default: small, narrowed by quick and gpu)"] = None,
    tokens: Annotated[int | None, "training tokens per model (default: 1000000; quick: 262144; gpu: 33554432)"] = None,
    seeds: Annotated[list[int] | None, "seeds to train every model with (default: 0; quick: 0 1 2); each adds a "
                                       "full round"] = None,
    models: Annotated[list[str] | None, "a subset of: top8 top4 top2 top1 top4-warm top2-warm top1-warm dense dynamic-2 "
                                        "dynamic-3 dynamic-4 topp-3 relu-3 dtopp-3 need-2 null-2 (default: all but null-2; quick: "
                                        "also without dynamic-4 topp-3 relu-3; with --dense-warmup 0, also without the "
                                        "-warm ones)"] = None,
    dense_warmup: Annotated[float | None, "fraction of the steps that warms the adaptive routers and the -warm static "
                                          "ones up from dense routing: k_max for its first half, then falling to "
                                          "their own k (default: 0.6; 0: none)"] = None,
    out: Annotated[Path | None, "report folder; the runs go in OUT/seed-S/MODEL (default: runs/headline, "
                                "runs/headline-quick, runs/headline-gpu)"] = None,
    data_root: Annotated[Path, "where the corpus is built"] = Path("data"),
    corpus: Annotated[Path | None, "a built corpus to use instead of building the built-in one"] = None,
    jobs: Annotated[int | None, "models trained at once, each in its own process (default: one per CPU core up to 4; "
                                "on a GPU 1, or every model of a seed with --profile gpu)"] = None,
    threads: Annotated[int | None, "torch CPU threads of each training and of the bench (default: the cores / --jobs)"] = None,
    device: Device = "auto",
    progress: Annotated[bool, "show progress bars (one training at a time only)"] = True,
) -> None:
    """Dense, static top-k (cold and warmed up) and adaptive routers on one budget, benched side by side over seeds:
    latency at quality parity, and each claim seed by seed."""
    from dynamoe.experiment import command_line, default_models, headline_profile, run_headline
    from dynamoe.runs import default_workers
    from dynamoe.train import resolve_device

    if jobs is not None and jobs < 1:
        raise DynamoeError(f"--jobs={jobs} must be at least 1")
    if quick and profile not in ("default", "quick"):
        raise DynamoeError(f"--quick is --profile quick; it cannot go with --profile {profile}")
    chosen = headline_profile("quick" if quick else profile, preset, tokens, dense_warmup)
    out = out or Path("runs/headline" + ("" if chosen.name == "default" else f"-{chosen.name}"))
    seeds, models = seeds or list(chosen.seeds), models or default_models(chosen)
    device_type = resolve_device(device).type
    if jobs is None and chosen.gpu_parallel and device_type == "cuda":
        jobs = len(models)
    jobs, auto_threads = default_workers(device_type, jobs)
    threads = auto_threads if threads is None else threads
    set_threads(threads)
    run_headline(chosen, seeds=seeds, models=models, out=out, data_root=data_root, corpus=corpus, device=device,
                 progress=progress, command=command_line(chosen.name, preset, tokens, seeds, models, out, dense_warmup),
                 workers=jobs, threads=threads)


def analyze(
    checkpoint: Checkpoint,
    corpus: Annotated[Path, "built corpus the checkpoint was trained on (its test split)"] = DEFAULT_DATA,
    out: Annotated[Path, "folder for analysis.json, the plots and sample.html"] = Path("runs/analysis"),
    max_tokens: Annotated[int, "held-out tokens per domain to analyse"] = 16_384,
    sample_tokens: Annotated[int, "tokens per domain in the coloured HTML sample"] = 200,
    level_problems: Annotated[int, "held-out math problems per difficulty level 1-5 (0: none)"] = 240,
    threshold: Threshold = None,
    device: Device = "auto",
) -> None:
    """Routing analysis: experts/token per layer and domain, k against loss and against the benefit of experts,
    k per math difficulty level, expert specialisation, a coloured sample."""
    from dynamoe.analyze import analyze_checkpoint, format_analysis
    from dynamoe.train import resolve_device

    result = analyze_checkpoint(checkpoint, corpus, out, max_tokens=max_tokens, sample_tokens=sample_tokens,
                                threshold=threshold, device=resolve_device(device), level_problems=level_problems)
    print(format_analysis(result))
    print(f"analysis written to {out}")


def answers(
    checkpoints: Annotated[list[Path], "checkpoint or run folders to compare"],
    problems: Annotated[int, "held-out math problems per difficulty level"] = 100,
    levels: Annotated[list[int] | None, "difficulty levels to ask (default: 1 2 3 4 5)"] = None,
    seed: Annotated[int, "seed of the held-out problems (apart from every corpus build's)"] = 0,
    price_per_hour: Annotated[float, "machine price, USD/hour (for the cost per correct answer)"] = BENCH_DEFAULTS["price_per_hour"],
    out: Annotated[Path, "folder for answers.json and answers.md"] = Path("runs/answers"),
    threads: Annotated[int | None, "torch CPU threads (default: torch's choice); 1 is steadiest on a busy machine"] = None,
    device: Device = "auto",
    progress: Annotated[bool, "show a progress bar"] = True,
) -> None:
    """Cost per useful output: exact-match accuracy of greedy answers to held-out math problems per difficulty level,
    and the cost per correct answer (price per hour x the time to answer, batch 1)."""
    from dynamoe.answers import answers_table, run_answers

    if threads is not None:
        set_threads(threads)
    reports = run_answers(checkpoints, out, problems=problems, levels=levels or [1, 2, 3, 4, 5], seed=seed,
                          price_per_hour=price_per_hour, device=device, progress=progress)
    print(answers_table(reports))
    print(f"results written to {out}")


def serve(
    checkpoint: Checkpoint,
    host: Annotated[str, "address to bind; 0.0.0.0 exposes the server to the network"] = "127.0.0.1",
    port: Annotated[int, "TCP port"] = 8000,
    api_key: Annotated[str | None, "require `Authorization: Bearer KEY` (default: $DYNAMOE_API_KEY, else no key)"] = None,
    model_name: Annotated[str, "the model id clients pass as `model`"] = "dynamoe",
    threshold: Threshold = None,
    max_batch_size: Annotated[int, "rows decoded together; 1 serves one request at a time"] = 32,
    max_queue: Annotated[int, "requests waiting at most; more are refused with 429"] = 256,
    max_tokens: Annotated[int, "largest max_tokens a request may ask for"] = 1024,
    max_prompt_tokens: Annotated[int | None, "longest prompt in tokens (default: the model's context)"] = None,
    max_body_bytes: Annotated[int, "largest request body"] = 1_000_000,
    timeout: Annotated[float, "seconds a request may wait and run before it is cancelled (504)"] = 300.0,
    read_timeout: Annotated[float, "seconds a client may take to send a request's headers, and again its body"] = 5.0,
    batch_window_ms: Annotated[float, "an idle server waits this long for requests to prefill together"] = 5.0,
    prefill_chunk: Annotated[int, "prompt tokens per prefill call; a longer prompt is prefilled over several decode "
                             "steps, so that it does not stall the others"] = 512,
    compile: Annotated[bool, "decode through torch.compile: faster steps after a compilation per batch size"] = False,
    device: Device = "auto",
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (completions, chat, lm-eval's endpoints)."""
    from dynamoe.serve.app import serve_checkpoint
    from dynamoe.serve.security import api_key_from

    serve_checkpoint(checkpoint, host=host, port=port, api_key=api_key_from(api_key, os.environ),
                     model_name=model_name, threshold=threshold, max_batch_size=max_batch_size, max_queue=max_queue,
                     max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
                     timeout=timeout, read_timeout=read_timeout, batch_window_ms=batch_window_ms,
                     prefill_chunk=prefill_chunk, compile=compile, device=device)


def import_hf(
    source: Annotated[Path, "transformers checkpoint folder (config.json, *.safetensors, optional tokenizer.json)"],
    out: Annotated[Path, "new dynamoe checkpoint folder"],
    force: Annotated[bool, "replace OUT if it exists"] = False,
) -> None:
    """Import a Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE checkpoint as a dynamoe checkpoint (exact logits)."""
    from dynamoe.hf import import_hf as run_import

    done = run_import(source, out, force=force)
    layout = "fused 3-D experts" if done.fused_experts else "per-expert weights"
    tokenizer = "tokenizer.json copied" if done.tokenizer else "no tokenizer.json in the source"
    print(f"imported {done.architecture} ({layout}; {done.config.n_layers} layers, {done.config.n_experts} experts, "
          f"top-{done.config.top_k}; {tokenizer}) into {done.out}")


def export(
    checkpoint: Checkpoint,
    out: Annotated[Path, "new folder (hf) or file (gguf) for the exported model"],
    output_format: Annotated[Literal["hf", "gguf"], "hf: a transformers folder (Mixtral, Qwen3-MoE, Qwen2-MoE or OLMoE "
                             "layout); gguf: one llama.cpp file (Mixtral layout, tokenizer inside)", "--format"] = "hf",
    gguf_type: Annotated[Literal["f32", "q8_0"], "gguf: weight type (q8_0: 8-bit blocks of 32, router gates f32)"] = "f32",
    as_topk: Annotated[int | None, "export a topk/topp/dynamic model as static top-K (the K most probable experts)"] = None,
    allow_dynamic: Annotated[bool, "hf: write a dynamic-routing model anyway; transformers would run it as static top-k"] = False,
    force: Annotated[bool, "replace OUT if it exists"] = False,
) -> None:
    """Export a static top-k checkpoint in a layout that transformers (identical logits) or llama.cpp loads."""
    if output_format == "gguf":
        try:
            from dynamoe.gguf_export import export_gguf
        except ImportError:
            raise DynamoeError("the GGUF export needs the gguf package: pip install gguf") from None
        written = export_gguf(checkpoint, out, gguf_type=gguf_type, as_topk=as_topk, force=force)
        print(f"exported GGUF ({written.gguf_type}, static top-{written.top_k}, pre-tokenizer {written.pre_tokenizer!r}) "
              f"to {written.out}")
        return
    from dynamoe.hf import export_hf

    done = export_hf(checkpoint, out, allow_dynamic=allow_dynamic, force=force, as_topk=as_topk)
    note = " (dynamic routing: see README.md there; transformers runs it as static top-k)" if done.dynamic else ""
    print(f"exported {done.architecture} to {done.out}{note}")


def retrofit(
    checkpoint: Checkpoint,
    out: Annotated[Path, "new folder for the dynamic checkpoint"],
    target_k: Annotated[float, "mean experts/token to aim at, below the checkpoint's top_k"],
    mode: Annotated[Literal["free", "light"], "free: only calibrate thresholds; light: also distil temperature heads"] = "light",
    corpus: Annotated[Path, "built corpus: its val split calibrates, its train split distils, its test split evaluates"] = DEFAULT_DATA,
    tokens: Annotated[int, "light mode: distillation tokens"] = RETROFIT_DEFAULTS["tokens"],
    batch_size: Annotated[int, "sequences per batch"] = RETROFIT_DEFAULTS["batch_size"],
    seq_len: Annotated[int | None, "window length (default: the checkpoint's context)"] = None,
    lr: Annotated[float, "light mode: learning rate of the temperature heads"] = RETROFIT_DEFAULTS["lr"],
    straight_through: Annotated[bool, "light mode: the distillation loss also sees which experts were kept"] = RETROFIT_DEFAULTS["straight_through"],
    eval_tokens: Annotated[int, "held-out tokens per domain for the before/after comparison; 0 skips it"] = 16_384,
    seed: Annotated[int, "seed of the batches"] = 0,
    force: Annotated[bool, "replace OUT if it exists"] = False,
    device: Device = "auto",
    progress: Annotated[bool, "show a progress bar"] = True,
) -> None:
    """Make a static top-k checkpoint route dynamically (fewer experts per token) without retraining its experts."""
    from dynamoe.checkpoint import (check_output_folder, check_same_tokenizer, checkpoint_bytes, load_config, load_model,
                                    save_model, tokenizer_file)
    from dynamoe.evaluate import evaluate_tokens, split_tokens_by_domain
    from dynamoe.retrofit import retrofit as run_retrofit
    from dynamoe.train import resolve_device

    cfg = RetrofitConfig(target_k=target_k, mode=mode, tokens=tokens, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                         straight_through=straight_through)
    # Before the slow work: the twin's weights are about the checkpoint's.
    check_output_folder(out, force, checkpoint_bytes(load_config(checkpoint), with_optimizer=False))
    check_same_tokenizer(checkpoint, corpus, "pass the corpus it was trained on with --corpus")
    static, _ = load_model(checkpoint, device=resolve_device(device))
    dynamic, log = run_retrofit(static, corpus, cfg, progress=progress)
    save_model(out, dynamic, tokenizer_file(checkpoint), force=force, metadata={"retrofit_of": str(checkpoint)})
    print(f"retrofitted ({mode}) into {out}; thresholds per layer: {', '.join(f'{t:.3f}' for t in log['thresholds'])}")
    if eval_tokens > 0:
        test = split_tokens_by_domain(corpus, "test")
        for name, model in (("before", static), ("after", dynamic)):
            report = evaluate_tokens(model, test, max_tokens=eval_tokens, progress=False)
            domains = ", ".join(f"{d.domain} {d.perplexity:.3f}" for d in report.domains)
            print(f"{name}: perplexity {report.total.perplexity:.3f} ({domains}); mean experts/token {report.total.mean_k:.2f}")


COMMANDS: dict[str, Callable[..., None]] = {
    "data build": data_build, "train": train, "eval": evaluate, "generate": generate, "bench": bench, "demo": demo,
    "retrofit": retrofit, "serve": serve, "experiment headline": experiment_headline, "analyze": analyze, "answers": answers,
    "import": import_hf, "export": export,
}


def set_threads(threads: int) -> None:
    """torch's CPU threads: from 1 to the cores (more only slow it down, and OpenMP would try to start them all)."""
    import torch

    cores = os.cpu_count() or 1
    if threads < 1:
        raise DynamoeError(f"--threads={threads} must be at least 1")
    if threads > cores:
        raise DynamoeError(f"--threads={threads} is more than the {cores} CPU cores of this machine")
    torch.set_num_threads(threads)


def parse_model_overrides(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings to ModelConfig fields: a string field takes VALUE as it is, any other reads it as JSON
    (3, 0.6, true, [0, 1], null; `none` too); ModelConfig checks the types."""
    hints = typing.get_type_hints(ModelConfig)
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(ModelConfig))
            raise DynamoeError(f"--model {item!r}: expected KEY=VALUE with KEY one of: {known}")
        overrides[key] = _parse_value(text, hints[key], f"--model {key}")
    return overrides


def _parse_value(text: str, annotation: Any, where: str) -> Any:
    """text as it is for a string (or Literal) field; otherwise as JSON, with `none` for null."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if any(option is str or typing.get_origin(option) is Literal for option in options):
        return None if text.lower() == "none" and type(None) in options else text
    if text.lower() == "none":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DynamoeError(f"{where}={text!r} is not a valid value: write a number, true/false, null or a JSON "
                           "list such as [0, 1]") from None


def _step_or_path(text: str) -> int | Path:
    """A checkpoint named by its step (digits) or by its path."""
    return int(text) if text.isdigit() else Path(text)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _add_parameter(parser: argparse.ArgumentParser, parameter: inspect.Parameter, annotation: Any) -> None:
    """One argparse argument from one annotated parameter."""
    base, *meta = typing.get_args(annotation) if typing.get_origin(annotation) is Annotated else (annotation,)
    help_text = next((m for m in meta if not m.startswith("--")), None)
    flag = next((m for m in meta if m.startswith("--")), "--" + parameter.name.replace("_", "-"))
    if _is_union(base):  # X | None: the flag is optional, its type is X
        base = next(a for a in typing.get_args(base) if a is not type(None))
    if parameter.default is inspect.Parameter.empty and base in (Path, list[Path]):  # positional: one path or more
        parser.add_argument(parameter.name, type=Path, nargs="+" if base == list[Path] else None, help=help_text)
        return
    kwargs: dict[str, Any] = {"dest": parameter.name, "help": help_text}
    if parameter.default is inspect.Parameter.empty:
        kwargs["required"] = True
    else:
        kwargs["default"] = parameter.default
        if parameter.default is not None and parameter.default is not False and help_text is not None:
            kwargs["help"] = f"{help_text} (default: %(default)s)"
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if parameter.default else "store_true"
    elif typing.get_origin(base) is list:
        kwargs.update(nargs="+", action="extend", type=typing.get_args(base)[0], metavar="VALUE")
    elif typing.get_origin(base) is Literal:
        kwargs["choices"] = typing.get_args(base)
    else:
        kwargs["type"] = base
    parser.add_argument(flag, **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (usage is one --help away), like every other error of the CLI."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"dynamoe: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per command function, arguments from its signature."""
    parser = _Parser(prog="dynamoe", description="Mixture-of-Experts LMs with dynamic routing.")
    groups: dict[str, argparse._SubParsersAction] = {"": parser.add_subparsers(dest="command", required=True, metavar="COMMAND")}
    for name, function in COMMANDS.items():
        *parents, leaf = name.split()
        prefix = ""
        for parent in parents:  # nested commands such as `data build`
            if parent not in groups:
                sub = groups[prefix].add_parser(parent, help=f"{parent} commands")
                groups[parent] = sub.add_subparsers(dest=f"{parent}_command", required=True, metavar="ACTION")
            prefix = parent
        summary = (function.__doc__ or "").splitlines()[0]
        sub = groups[prefix].add_parser(leaf, help=summary, description=summary)
        sub.set_defaults(function=function)
        hints = typing.get_type_hints(function, include_extras=True)
        for parameter in inspect.signature(function).parameters.values():
            _add_parameter(sub, parameter, hints[parameter.name])
    return parser


def _error_line(message: str) -> None:
    """One line on stderr, whatever the message holds (a path with a newline, say)."""
    print(f"dynamoe: error: {message}".replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dynamoe` command."""
    args = vars(build_parser().parse_args(argv))
    function = args.pop("function")
    parameters = inspect.signature(function).parameters
    try:
        function(**{key: value for key, value in args.items() if key in parameters})
    except DynamoeError as error:
        _error_line(str(error))
        return error.exit_code
    except OSError as error:  # a path the system refuses (a name too long, a permission...), wherever it was met
        _error_line(f"{error.strerror or error}: {error.filename}" if error.filename else str(error))
        return 2
    except MemoryError:  # the checks up front are lower bounds; the rest shows here
        _error_line("out of memory; use a smaller model, batch or --seq-len")
        return 2
    except KeyboardInterrupt:
        print("dynamoe: interrupted", file=sys.stderr)
        return 130
    return 0
