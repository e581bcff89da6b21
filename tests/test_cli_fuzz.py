"""The command line under fuzzing (hypothesis): every subcommand with bad flags, bad values, missing and odd paths
and values of the wrong type exits 0 or 2, with at most one line on stderr (progress reports aside) and never a
traceback.

DYNAMOE_CLI_FUZZ_EXAMPLES sets the number of generated invocations (default 100, so that `make test` stays quick);
`DYNAMOE_CLI_FUZZ_EXAMPLES=500 pytest tests/test_cli_fuzz.py` is the full run. Every flag of every command comes
from the command functions' signatures, so a new flag is fuzzed without a change here. Accepted invocations stop at
the first expensive step (a training step, a corpus build, a measurement, the server loop), which raises Reached:
everything checked before that runs for real, on tiny inputs.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import signal
import types
import typing
from collections import Counter
from pathlib import Path
from typing import Any, Annotated, Iterator, Literal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamoe.checkpoint import save_model
from dynamoe.cli import COMMANDS, main
from dynamoe.config import tiny
from dynamoe.hf import export_hf
from dynamoe.model import Transformer

EXAMPLES = int(os.environ.get("DYNAMOE_CLI_FUZZ_EXAMPLES", "100"))
SECONDS_PER_INVOCATION = 120  # a hang is a failure too
# The commands' own progress reports on stderr: `data: ...` lines, `[demo] ...` lines and tqdm bars.
PROGRESS = re.compile(r"(data|\[\w+\]): |[\w ,]*: *\d+%\|")
# The first expensive step of each command: reaching it means every check before it passed.
EXPENSIVE = ("dynamoe.train.train_step", "dynamoe.data.build._build_into", "dynamoe.bench.measure_round",
             "dynamoe.retrofit.calibrate_thresholds", "dynamoe.analyze.analyse", "dynamoe.runs.train_jobs",
             "dynamoe.model.Transformer.compile_decode", "dynamoe.answers.answer_problems", "uvicorn.run")
# Values to draw from: (good, bad) for each type, and for parameters whose good values are specific.
INTS = (["1", "2", "8"], ["0", "-1", "64", "1000000000000", "2.5", "x", "", "1e3", "0x10", "99999999999999999999999"])
FLOATS = (["0.5", "1", "2"], ["0", "-1", "nan", "inf", "-inf", "1e309", "1e-320", "x", ""])
STRINGS = (["x", "hello world"], ["", "ü", "--", "-1", "a" * 300, "line\nbreak", "\udcff"])  # \udcff: the byte 0xff
SPECIAL = {
    "model": (["dim=32", "n_experts=4", "dense_layers=[0]", "qk_norm=head", "threshold=0.6"],
              ["dim=1000000000", "n_layers=2.5", "n_layers=1000000000", "tie_embeddings=yes", "norm_eps=Infinity", "x",
               "=", "dim=", "router=magic", "threshold=nan", "layer_thresholds=[0.5]", "vocab_size=99999999999",
               "max_seq_len=1000000000000", "n_heads=0", "expert_dim=-3", "clip_qkv=0", "k_max=99"]),
    "preset": (["tiny"], ["small", "gigantic", ""]),
    "device": (["cpu"], ["auto", "cuda", "cuda:1", "toaster", "meta", "mps", ""]),
    "models": (["top2", "dynamic-3"], ["nope", ""]),
    "resume_from": (["1"], ["0", "999", "abc", "../x", "ckpt-0000001", ""]),
}
GOOD_PATHS = {"checkpoint": ("dynamic", "static"), "checkpoints": ("dynamic", "static"), "corpus": ("corpus",),
              "data": ("text",), "train data": ("corpus",), "source": ("hf",), "tokenizer": ("tokenizer", "dynamic")}
OUTPUT_PARAMETERS = ("out", "data_root")


class Reached(Exception):
    """An invocation got past every check to its expensive work."""


@pytest.fixture(scope="module")
def places(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Input paths (good ones and bad ones) and output paths to draw from."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    dynamic = save_model(root / "dynamic", Transformer(tiny()), tiny_corpus / "tokenizer.json")
    static = save_model(root / "static", Transformer(tiny(router="topk")), tiny_corpus / "tokenizer.json")
    export_hf(static, root / "hf")
    (root / "text.txt").write_text("To be, or not to be, that is the question.\n\n" * 2000)
    (root / "junk.bin").write_bytes(b"\x00\xff" * 100)
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("mine")
    good = {"corpus": tiny_corpus, "dynamic": dynamic, "static": static, "hf": root / "hf", "text": root / "text.txt",
            "tokenizer": tiny_corpus / "tokenizer.json"}
    bad = [str(root / "missing"), str(root / "empty"), str(root / "broken"), str(root / "junk.bin"), "/dev/null", "",
           str(root / "junk.bin" / "below"), str(root / ("n" * 300)), "/proc/self/status", str(root / "line\nbreak"),
           str(dynamic / "model.safetensors"), *map(str, good.values())]  # a good path for another parameter is bad
    outputs = [str(root / "full"), str(root / "junk.bin"), "/proc/dynamoe-out", str(root / "junk.bin" / "sub"), "",
               "/dev/null", str(root / ("o" * 300))]
    return {**{name: [str(path)] for name, path in good.items()}, "bad inputs": bad, "bad outputs": outputs,
            "fresh": [str(root / "outputs")]}


def parameters(command: str) -> Iterator[tuple[str, str | None, Any, bool, Any]]:
    """(name, flag or None for a positional, base type, required, default) of each parameter of a command."""
    function = COMMANDS[command]
    hints = typing.get_type_hints(function, include_extras=True)
    for parameter in inspect.signature(function).parameters.values():
        base, *meta = typing.get_args(hints[parameter.name]) if typing.get_origin(hints[parameter.name]) is Annotated \
            else (hints[parameter.name],)
        options = [a for a in typing.get_args(base) if a is not type(None)]
        base = options[0] if typing.get_origin(base) in (typing.Union, types.UnionType) else base
        flag = next((m for m in meta if m.startswith("--")), "--" + parameter.name.replace("_", "-"))
        required = parameter.default is inspect.Parameter.empty
        yield parameter.name, None if required and base in (Path, list[Path]) else flag, base, required, parameter.default


def values(name: str, base: Any, places: dict[str, list[str]], fresh: str, badness: int,
           command: str) -> st.SearchStrategy[list[str]]:
    """Strategy for the command-line words that follow a flag (or stand for a positional): a bad value badness
    times in 100."""
    item = typing.get_args(base)[0] if typing.get_origin(base) is list else base
    if name in SPECIAL:
        good, bad = SPECIAL[name]
    elif item is Path and name in OUTPUT_PARAMETERS:
        good, bad = [fresh], places["bad outputs"]
    elif item is Path:
        keys = GOOD_PATHS.get(f"{command} {name}", GOOD_PATHS.get(name, ()))
        good, bad = [path for key in keys for path in places[key]], places["bad inputs"]
    elif typing.get_origin(item) is Literal:
        good, bad = list(typing.get_args(item)), ["bogus"]
    else:
        good, bad = {int: INTS, float: FLOATS}.get(item, STRINGS)
    one = st.integers(0, 99).flatmap(lambda roll: st.sampled_from(bad if roll < badness or not good else good))
    return st.lists(one, min_size=1, max_size=3) if typing.get_origin(base) is list else one.map(lambda word: [word])


@st.composite
def invocations(draw: st.DrawFn, places: dict[str, list[str]]) -> tuple[str, list[str]]:
    """A subcommand and its command line: some of its parameters, with good values, a few bad ones or many, and
    now and then a missing value, a missing positional or a stray word."""
    command = draw(st.sampled_from(sorted(COMMANDS)))
    badness = draw(st.sampled_from([0, 5, 30]))
    fresh = f"{places['fresh'][0]}/{draw(st.integers(0, 10**9))}"
    argv = command.split()
    for name, flag, base, required, default in parameters(command):
        words = values(name, base, places, fresh, badness, command)
        if required and badness and not draw(st.integers(0, 9)):
            continue  # now and then a required argument goes missing
        if flag is None:
            argv += draw(words)
        elif base is bool:  # --no-FLAG exists for the flags that default to true
            negated = [flag.replace("--", "--no-", 1)]
            argv += draw(st.sampled_from([[], [flag], *([negated] if badness or default else [])]))
        elif required or draw(st.integers(0, 2)) == 0:
            missing = badness > 0 and draw(st.integers(0, 19)) == 0
            argv += [flag] if missing else [flag, *draw(words)]
    if badness and not draw(st.integers(0, 7)):
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--bogus", "-x", "--help", "extra", "--steps"])))
    return command, argv


def run(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int | str, str]:
    """Exit code (or "reached") and stderr of one invocation, failing it if it runs past the time limit."""
    def too_slow(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {SECONDS_PER_INVOCATION} s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(SECONDS_PER_INVOCATION)
    try:
        code: int | str = main(argv)
    except SystemExit as exit_:  # argparse: --help, or a bad flag
        code = exit_.code if isinstance(exit_.code, int) else 2
    except Reached:
        code = "reached"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        torch.set_num_threads(1)  # --threads changes it for the process
    return code, capfd.readouterr().err


@pytest.fixture
def expensive_steps_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    def reached(*args: Any, **kwargs: Any) -> None:
        raise Reached

    for target in EXPENSIVE:
        monkeypatch.setattr(target, reached)


def test_fuzzed_command_lines_exit_cleanly(places: dict[str, list[str]], expensive_steps_stopped: None,
                                           capfd: pytest.CaptureFixture[str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative and default output folders land here
    outcomes: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(invocation=invocations(places))
    def check(invocation: tuple[str, list[str]]) -> None:
        command, argv = invocation
        code, err = run(argv, capfd)
        lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS.match(line)]
        assert "Traceback" not in err, (argv, err)
        assert code in (0, 2, "reached"), (argv, code, err)
        assert len(lines) <= 1, (argv, err)
        assert code != 2 or (lines and lines[0].startswith("dynamoe: error: ")), (argv, err)
        outcomes[f"{command}: {code}"] += 1

    check()
    shutil.rmtree(places["fresh"][0], ignore_errors=True)
    print(f"{sum(outcomes.values())} invocations: {dict(sorted(outcomes.items()))}")
    assert sum(outcomes.values()) >= EXAMPLES
