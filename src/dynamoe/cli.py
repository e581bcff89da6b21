"""Command-line interface: one typed function per subcommand; bad input ends in a one-line error."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from dynamoe.errors import DynamoeError

DEFAULT_DATA = Path("data/corpus")


def data_build(out: Path = DEFAULT_DATA, data: Path | None = None, vocab_size: int = 8192,
               bytes_per_domain: int = 3_000_000, seed: int = 0, force: bool = False) -> None:
    """Build the tokenizer and token shards: the built-in corpus, or the user's files with --data."""
    from dynamoe.data import build_corpus

    path = build_corpus(out, data=data, vocab_size=vocab_size, bytes_per_domain=bytes_per_domain, seed=seed, force=force)
    meta = json.loads((path / "meta.json").read_text())
    print(f"corpus ready at {path} (domains: {', '.join(meta['domains'])}; vocabulary {meta['vocab_size']})")


def train(data: Path = DEFAULT_DATA, out: Path = Path("runs/model"), preset: str = "small", router: str = "dynamic",
          target_k: float | None = None, top_k: int | None = None, ffn: str = "moe", steps: int = 500,
          batch_size: int = 8, grad_accum: int = 1, seq_len: int | None = None, lr: float = 3e-3,
          warmup_steps: int = 50, seed: int = 0, save_every: int = 100, eval_every: int = 100,
          device: str = "auto", resume: bool = False) -> None:
    """Train a model on a built corpus; --resume continues exactly where the run in --out stopped."""
    from dynamoe import train as training
    from dynamoe.config import preset as make_preset

    overrides: dict = {"router": router, "ffn": ffn}
    if target_k is not None:
        overrides["target_k"] = target_k
    if top_k is not None:
        overrides["top_k"] = top_k
    if seq_len is not None:
        overrides["max_seq_len"] = seq_len
    model_cfg = training.model_config_for_data(make_preset(preset, **overrides), data)
    train_cfg = training.TrainConfig(data_dir=data, out_dir=out, steps=steps, batch_size=batch_size,
                                     grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps, seed=seed,
                                     save_every=save_every, eval_every=eval_every, device=device)
    summary = training.train(model_cfg, train_cfg, resume=resume)
    print(f"trained {summary.step} steps; checkpoint {summary.checkpoint}")


def evaluate(checkpoint: Path, data: Path | None = None, corpus: Path = DEFAULT_DATA, split: str = "test",
             max_tokens: int = 50_000, as_json: bool = False, device: str = "cpu") -> None:
    """Perplexity per domain and routing statistics of a checkpoint, on a corpus split or the user's files."""
    from dynamoe.checkpoint import load_model, load_tokenizer_for
    from dynamoe.evaluate import evaluate_tokens, format_report, split_tokens_by_domain, user_tokens_by_domain

    model, _ = load_model(checkpoint, device=device)
    if data is not None:
        tokens = user_tokens_by_domain(data, load_tokenizer_for(checkpoint))
    else:
        tokens = split_tokens_by_domain(corpus, split)
    report = evaluate_tokens(model, tokens, max_tokens=max_tokens, progress=not as_json)
    print(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report, title=str(checkpoint)))


def generate(checkpoint: Path, prompt: str, max_new_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95,
             top_k: int = 0, seed: int = 0, stop: list[str] | None = None, show_experts: bool = False,
             color: str = "auto", device: str = "cpu") -> None:
    """Continue a prompt with a checkpoint, printing the text as it is decoded."""
    import os
    import time

    from dynamoe.checkpoint import load_model, load_tokenizer_for
    from dynamoe.data.tokenizer import eos_id
    from dynamoe.generate import SamplingConfig, experts_legend, paint, stream

    sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)  # before the slow load
    model, cfg = load_model(checkpoint, device=device)
    tokenizer = load_tokenizer_for(checkpoint)
    if show_experts and not model.routers():
        raise DynamoeError(f"--show-experts needs an MoE model, but {checkpoint} is dense; drop --show-experts")
    events = stream(model, tokenizer.encode(prompt).ids, max_new_tokens, sampling, stop_ids={eos_id(tokenizer)},
                    stop=stop or (), decode=tokenizer.decode)
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
    print(f"[{tokens} tokens in {elapsed:.2f} s, {tokens / elapsed:.1f} tokens/s; finished: {finish}]", file=sys.stderr)


def demo(quick: bool = False, out: Path = Path("runs/demo"), data_root: Path = Path("data")) -> None:
    """The main job: build the corpus, train static top-k and dynamic models, compare them side by side."""
    from dynamoe.demo import run_demo

    run_demo(quick=quick, out_root=out, data_root=data_root)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per command function."""
    parser = argparse.ArgumentParser(prog="dynamoe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, function: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=function.__doc__)
        sub.set_defaults(function=function)
        return sub

    data = commands.add_parser("data", help="corpus commands").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    build = data.add_parser("build", help="build the tokenizer and token shards", description=data_build.__doc__)
    build.set_defaults(function=data_build)
    build.add_argument("--out", type=Path, default=DEFAULT_DATA, help="output folder (default: %(default)s)")
    build.add_argument("--data", type=Path, help="your own .txt / folder / .jsonl instead of the built-in corpus")
    build.add_argument("--vocab-size", type=int, default=8192)
    build.add_argument("--bytes-per-domain", type=int, default=3_000_000, help="cap per built-in domain")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")

    tr = command("train", train, "train a model")
    tr.add_argument("--data", type=Path, default=DEFAULT_DATA, help="built corpus folder (default: %(default)s)")
    tr.add_argument("--out", type=Path, default=Path("runs/model"), help="run folder for checkpoints and logs")
    tr.add_argument("--preset", default="small", help="tiny, small or base")
    tr.add_argument("--router", default="dynamic", choices=["topk", "dynamic", "topp", "relu"])
    tr.add_argument("--ffn", default="moe", choices=["moe", "dense"], help="dense: the baseline of top-k's active size")
    tr.add_argument("--target-k", type=float, help="mean experts/token the controller aims at (default 3)")
    tr.add_argument("--top-k", type=int, help="experts per token of the static router (default 2)")
    tr.add_argument("--steps", type=int, default=500)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--seq-len", type=int, help="context length (default: the preset's)")
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--warmup-steps", type=int, default=50)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--save-every", type=int, default=100)
    tr.add_argument("--eval-every", type=int, default=100)
    tr.add_argument("--device", default="auto", help="auto, cpu or cuda")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")

    ev = command("eval", evaluate, "evaluate a checkpoint")
    ev.add_argument("checkpoint", type=Path, help="checkpoint folder or run folder")
    ev.add_argument("--data", type=Path, help="your own .txt / folder / .jsonl to evaluate on")
    ev.add_argument("--corpus", type=Path, default=DEFAULT_DATA, help="built corpus whose split to use")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--max-tokens", type=int, default=50_000, help="per domain")
    ev.add_argument("--json", dest="as_json", action="store_true", help="machine-readable output")
    ev.add_argument("--device", default="cpu")

    gen = command("generate", generate, "continue a prompt, streaming the text")
    gen.add_argument("checkpoint", type=Path, help="checkpoint folder or run folder")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 keeps every token")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most probable tokens; 0 keeps all")
    gen.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    gen.add_argument("--stop", nargs="+", action="extend", metavar="STR", help="end when the text contains STR (not shown)")
    gen.add_argument("--show-experts", action="store_true", help="colour each token by the experts it used")
    gen.add_argument("--color", default="auto", choices=["auto", "always", "never"], help="colour of --show-experts; auto: on a terminal")
    gen.add_argument("--device", default="cpu")

    dm = command("demo", demo, "the main job: static top-k against dynamic, side by side")
    dm.add_argument("--quick", action="store_true", help="a smaller run in about 3 minutes")
    dm.add_argument("--out", type=Path, default=Path("runs/demo"))
    dm.add_argument("--data-root", type=Path, default=Path("data"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dynamoe` command."""
    args = vars(build_parser().parse_args(argv))
    function = args.pop("function")
    for key in ("command", "data_command"):
        args.pop(key, None)
    try:
        function(**args)
    except DynamoeError as error:
        print(f"dynamoe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynamoe: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
