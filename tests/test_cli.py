"""The command line: bad input ends in one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamoe.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("\r")]
    assert len(lines) == 1, err
    assert lines[0].startswith("dynamoe: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_checkpoint(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "eval", tmp_path / "nowhere")
    assert_one_line_error(code, err, "nowhere")


def test_folder_that_is_not_a_checkpoint(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "eval", tmp_path)
    assert_one_line_error(code, err)


def test_unknown_preset(capsys, tiny_corpus: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "train", "--data", tiny_corpus, "--out", tmp_path / "run", "--preset", "gigantic")
    assert_one_line_error(code, err, "gigantic")


def test_target_k_outside_range(capsys, tiny_corpus: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "train", "--data", tiny_corpus, "--out", tmp_path / "run", "--preset", "tiny",
                           "--target-k", "12")
    assert_one_line_error(code, err, "target_k")


def test_missing_corpus(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "nodata", "--out", tmp_path / "run", "--preset", "tiny")
    assert_one_line_error(code, err, "data build")


@pytest.mark.parametrize("content", [b"", b"caf\xe9 au lait\n"], ids=["empty", "not-utf8"])
def test_bad_user_data_file(capsys, tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    code, _, err = run_cli(capsys, "data", "build", "--data", bad, "--out", tmp_path / "corpus", "--vocab-size", "300")
    assert_one_line_error(code, err, "bad.txt")


def test_train_eval_round_trip_through_the_cli(capsys, tiny_corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", tiny_corpus, "--out", run, "--preset", "tiny", "--steps", "3",
                           "--batch-size", "2", "--save-every", "3", "--eval-every", "3", "--warmup-steps", "1")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", run, "--corpus", tiny_corpus, "--max-tokens", "256", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {d["domain"] for d in report["domains"]} == {"prose", "code", "math"}
    assert report["total"]["mean_k"] > 0
    # Training again into a folder that holds a run, without --resume, is refused rather than overwriting it.
    code, _, err = run_cli(capsys, "train", "--data", tiny_corpus, "--out", run, "--preset", "tiny", "--steps", "3")
    assert_one_line_error(code, err, "--resume")


def test_config_weights_mismatch(capsys, tiny_corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--data", tiny_corpus, "--out", run, "--preset", "tiny", "--steps", "1",
                   "--batch-size", "1", "--save-every", "1", "--eval-every", "1", "--warmup-steps", "1")[0] == 0
    checkpoint = next(run.glob("ckpt-*"))
    config = checkpoint / "config.json"
    config.write_text(config.read_text().replace('"dim": 64', '"dim": 128'))
    code, _, err = run_cli(capsys, "eval", checkpoint, "--corpus", tiny_corpus)
    assert_one_line_error(code, err)


def test_parser_defaults_come_from_the_signatures_and_train_config() -> None:
    import dataclasses

    from dynamoe.cli import build_parser
    from dynamoe.train import TrainConfig

    args = build_parser().parse_args(["train"])
    for field in dataclasses.fields(TrainConfig):
        if field.name in vars(args) and field.default is not dataclasses.MISSING:
            assert getattr(args, field.name) == field.default, field.name
    args = build_parser().parse_args(["eval", "ckpt", "--json", "--max-tokens", "7"])
    assert args.as_json is True and args.max_tokens == 7 and args.checkpoint == Path("ckpt")
    args = build_parser().parse_args(["generate", "ckpt", "--prompt", "hi", "--stop", "a", "b", "--stop", "c"])
    assert args.stop == ["a", "b", "c"]


def test_model_overrides_are_typed() -> None:
    from dynamoe.cli import parse_model_overrides
    from dynamoe.config import tiny
    from dynamoe.errors import DynamoeError

    parsed = parse_model_overrides(["n_experts=4", "threshold=0.6", "tie_embeddings=true", "target_k=none",
                                    "dense_layers=[0]", "router=topk", "n_kv_heads=null"])
    assert parsed == {"n_experts": 4, "threshold": 0.6, "tie_embeddings": True, "target_k": None, "dense_layers": [0],
                      "router": "topk", "n_kv_heads": None}
    assert tiny(dense_layers=parsed["dense_layers"]).dense_layers == [0]  # block indices, not characters
    for bad, fragment in [("n_experts=four", "not a valid value"), ("width=3", "KEY one of")]:
        with pytest.raises(DynamoeError, match=fragment):
            parse_model_overrides([bad])
    # Values of the wrong type parse, then the config names the field and the type it needs.
    for bad, fragment in [("router=magic", "router='magic' must be one of 'topk'"), ("n_layers=2.5", "must be an integer"),
                          ("tie_embeddings=\"yes\"", "must be true or false"), ("norm_eps=Infinity", "finite number"),
                          ("dense_layers=[\"0\"]", "a list of integers")]:
        with pytest.raises(DynamoeError, match=fragment):
            tiny(**parse_model_overrides([bad]))


def test_train_with_model_overrides(capsys, tiny_corpus: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "train", "--data", tiny_corpus, "--out", tmp_path / "run", "--preset", "tiny",
                           "--model", "n_experts=4", "k_max=4", "--target-k", "1.5", "--steps", "1", "--batch-size", "1",
                           "--no-progress", "--eval-batches", "0", "--warmup-steps", "1")
    assert code == 0, err
    config = json.loads((next((tmp_path / "run").glob("ckpt-*")) / "config.json").read_text())
    assert config["n_experts"] == 4 and config["k_max"] == 4 and config["target_k"] == 1.5


def test_eval_refuses_a_corpus_with_another_tokenizer(capsys, tiny_corpus: Path, tmp_path: Path) -> None:
    from dynamoe.data import build_corpus

    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--data", tiny_corpus, "--out", run, "--preset", "tiny", "--steps", "1",
                   "--batch-size", "1", "--eval-batches", "0", "--warmup-steps", "1", "--no-progress")[0] == 0
    other = build_corpus(tmp_path / "other", vocab_size=400, bytes_per_domain=40_000, seed=1, progress=False)
    code, _, err = run_cli(capsys, "eval", run, "--corpus", other)
    assert_one_line_error(code, err, "different tokenizer")


def test_argument_errors_and_odd_paths_are_one_line(capsys, tiny_corpus: Path, tmp_path: Path) -> None:
    from dynamoe.checkpoint import save_model
    from dynamoe.config import tiny
    from dynamoe.model import Transformer

    ckpt = save_model(tmp_path / "ckpt", Transformer(tiny()), tiny_corpus / "tokenizer.json")
    for argv, fragment in [(["train", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
                           (["generate", ckpt, "--prompt", "\udcff"], "--prompt holds bytes that are not UTF-8 text"),
                           (["eval", tmp_path / ("n" * 300)], "File name too long"),
                           (["eval", tmp_path / "line\nbreak"], "line\\nbreak does not exist"),
                           (["bench", ckpt, "--threads", "100000000000"], "is more than the"),
                           (["eval", ckpt, "--device", "mps"], "device='mps' is not a device dynamoe runs on")]:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse's errors
            code = exit_.code
        assert code == 2
        assert_one_line_error(code, capsys.readouterr().err, fragment)
