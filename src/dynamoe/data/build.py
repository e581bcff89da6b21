"""Build a corpus folder: collect documents, split them, train the tokenizer, write the token shards."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tokenizers import Tokenizer
from tqdm import tqdm

from dynamoe.data.documents import Document, code_documents, prose_documents, user_data_files, user_documents
from dynamoe.data.mathgen import difficulty_range, math_documents
from dynamoe.data.shards import (
    FORMAT_VERSION,
    META_FILE,
    SPLITS,
    SplitCounts,
    index_path,
    read_meta,
    token_dtype,
    tokens_path,
    write_split,
)
from dynamoe.data.tokenizer import (MIN_VOCAB_SIZE, TOKENIZER_FILE, check_vocab_size, eos_id, load_tokenizer,
                                    tokenizer_digest, train_tokenizer)
from dynamoe.errors import DynamoeError
from dynamoe.resources import check_writable, writing

_MATH_SAMPLE_DOCS = 32  # documents generated to estimate how many reach the byte budget

SplitDocuments = dict[str, dict[str, list[Document]]]  # split -> domain -> documents


@dataclass(frozen=True)
class _Arguments:
    """Everything a build depends on; a folder built with equal arguments is reused as it is."""

    data: str | None
    data_fingerprint: str | None  # names, sizes and times of the user's files, so edits cause a rebuild
    vocab_size: int
    bytes_per_domain: int | None
    math_docs: int | None
    math_difficulty: tuple[int, int]
    seed: int
    splits: tuple[float, float, float]
    tokenizer_digest: str | None = None  # a given tokenizer (None: one trained on the train split)

    def as_json(self) -> dict[str, Any]:
        """The arguments as they read back from meta.json (tuples become lists)."""
        data = json.loads(json.dumps(dataclasses.asdict(self)))
        if data["tokenizer_digest"] is None:  # absent rather than null, so that older builds are still reused
            del data["tokenizer_digest"]
        return data


def build_corpus(
    out_dir: Path,
    *,
    data: Path | None = None,
    vocab_size: int = 8192,
    bytes_per_domain: int | None = 3_000_000,
    math_docs: int | None = None,
    math_difficulty: tuple[int, int] = (1, 4),
    seed: int = 0,
    splits: tuple[float, float, float] = (0.9, 0.05, 0.05),
    tokenizer: Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build the tokenized corpus in out_dir (or reuse one built with the same arguments) and return out_dir.

    tokenizer: a tokenizer.json (or a folder holding one, such as an imported checkpoint) to encode with
    instead of training one; vocab_size is then the tokenizer's own.
    """
    out_dir = Path(out_dir)
    given = None if tokenizer is None else load_tokenizer(tokenizer)
    if given is not None:
        vocab_size = given.get_vocab_size()
    arguments = _checked_arguments(data, vocab_size, bytes_per_domain, math_docs, math_difficulty, seed, splits)
    if given is not None:
        arguments = dataclasses.replace(arguments, tokenizer_digest=tokenizer_digest(Path(tokenizer)))
    if not force and _is_built_with(out_dir, arguments):
        _report(progress, f"reusing the corpus in {out_dir}: it was built with the same arguments (force rebuilds it)")
        return out_dir
    _check_replaceable(out_dir)
    started = time.perf_counter()
    target = out_dir.resolve()
    # The build is staged beside the target: its parent must take about the text's size (2-byte ids, a few bytes
    # of text per token).
    check_writable(target.parent, _text_bytes(arguments), f"the corpus {out_dir}")
    with writing(target.parent, f"the corpus {out_dir}"):
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename into place, so an interrupted build never leaves a
        # half-written folder that looks complete. The pid keeps concurrent builds apart.
        staging = target.with_name(f".{target.name}.building-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            _build_into(staging, arguments, progress, given)
            _swap_in(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful swap
    _report(progress, f"corpus ready in {out_dir} ({time.perf_counter() - started:.1f} s)")
    return out_dir


def _checked_arguments(
    data: Path | None,
    vocab_size: int,
    bytes_per_domain: int | None,
    math_docs: int | None,
    math_difficulty: tuple[int, int],
    seed: int,
    splits: tuple[float, float, float],
) -> _Arguments:
    """The build arguments, each checked before any slow work starts."""
    check_vocab_size(vocab_size)
    if bytes_per_domain is not None and bytes_per_domain <= 0:
        raise DynamoeError(f"bytes_per_domain must be positive (or None for everything), got {bytes_per_domain}")
    if math_docs is not None and math_docs < 0:
        raise DynamoeError(f"math_docs must be >= 0 (or None to match the byte budget), got {math_docs}")
    if len(splits) != 3 or min(splits) <= 0 or abs(sum(splits) - 1) > 1e-6:
        raise DynamoeError(f"splits must be three positive fractions (train, val, test) summing to 1, got {splits}")
    return _Arguments(
        data=None if data is None else str(Path(data).resolve()),
        data_fingerprint=None if data is None else _fingerprint(Path(data)),
        vocab_size=vocab_size,
        bytes_per_domain=bytes_per_domain,
        math_docs=math_docs,
        math_difficulty=difficulty_range(math_difficulty),
        seed=seed,
        splits=(splits[0], splits[1], splits[2]),
    )


def _fingerprint(data: Path) -> str:
    """A hash of the names, sizes and modification times of the files a data path names."""
    root = data if data.is_dir() else data.parent
    digest = hashlib.sha256()
    for file in user_data_files(data):
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _text_bytes(arguments: _Arguments) -> int:
    """The bytes of text a build reads: the user's files, or the built-in domains' budget (0 when unbounded)."""
    if arguments.data is not None:
        return sum(file.stat().st_size for file in user_data_files(Path(arguments.data)))
    return 3 * (arguments.bytes_per_domain or 0)


def _is_built_with(out_dir: Path, arguments: _Arguments) -> bool:
    """True when out_dir holds a complete corpus built from these arguments."""
    try:
        meta = read_meta(out_dir)
    except DynamoeError:
        return False
    shards = [path(out_dir, split) for split in SPLITS for path in (tokens_path, index_path)]
    files = [out_dir / TOKENIZER_FILE, *shards]
    return meta.get("arguments") == arguments.as_json() and all(file.is_file() for file in files)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a folder that is neither empty nor a corpus, so no user files are lost."""
    if not out_dir.exists():
        return
    if out_dir.is_dir() and ((out_dir / META_FILE).is_file() or not any(out_dir.iterdir())):
        return
    raise DynamoeError(f"{out_dir} exists and is not a dynamoe corpus: choose another output folder, or remove it")


def _swap_in(staging: Path, target: Path) -> None:
    """Put the finished build at target, replacing any older build there."""
    if not target.exists():
        staging.rename(target)
        return
    # A directory cannot be renamed onto a non-empty one, so the old build steps aside first.
    retired = staging.with_name(f"{staging.name}.old")
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)


def _build_into(folder: Path, arguments: _Arguments, progress: bool, given: Tokenizer | None) -> None:
    """Write tokenizer.json, the three splits and meta.json (last, so that it marks completion) into folder."""
    by_domain = _collect(arguments, progress)
    documents = _split_documents(by_domain, arguments.splits, arguments.seed, _more_text_hint(arguments))
    sizes = ", ".join(f"{split} {len(_concatenated(documents[split]))}" for split in SPLITS)
    _report(progress, f"split: {sizes} documents")

    started = time.perf_counter()
    if given is None:
        train_documents = _concatenated(documents["train"])
        # BPE learns one token per merge, and each merge shortens the text by at least one symbol: a vocabulary
        # larger than this can never fill, and the trainer would reserve memory for all of it.
        learnable = MIN_VOCAB_SIZE + _count_bytes(train_documents)
        tokenizer = train_tokenizer((document.text for document in train_documents),
                                    min(arguments.vocab_size, learnable))
        _report(progress, f"tokenizer: {tokenizer.get_vocab_size()} tokens learned from the train split ({_since(started)})")
    else:
        tokenizer = given
        _report(progress, f"tokenizer: the given one, {tokenizer.get_vocab_size()} tokens")
    tokenizer.save(str(folder / TOKENIZER_FILE))

    domains = list(by_domain)
    counts: dict[str, SplitCounts] = {}
    for split in SPLITS:
        started = time.perf_counter()
        # Closed even when writing fails, so that the error starts a line of its own.
        with tqdm(_concatenated(documents[split]), desc=f"tokenizing {split}", unit="doc", leave=False,
                  disable=not progress) as bar:
            counts[split] = write_split(folder, split, bar, tokenizer, domains)
        n_tokens = sum(domain_counts["tokens"] for domain_counts in counts[split].values())
        _report(progress, f"{split}: {n_tokens:,} tokens ({_since(started)})")

    meta = {
        "format_version": FORMAT_VERSION,
        "arguments": arguments.as_json(),
        "domains": domains,
        "vocab_size": tokenizer.get_vocab_size(),
        "eos_id": eos_id(tokenizer),
        "dtype": token_dtype(tokenizer.get_vocab_size()).name,
        "tokenizer": TOKENIZER_FILE,
        "splits": counts,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _collect(arguments: _Arguments, progress: bool) -> dict[str, list[Document]]:
    """The documents of each domain, in a fixed domain order; empty domains are left out."""
    data = arguments.data
    if data is not None:
        documents = _timed(progress, "user data", lambda: user_documents(Path(data)))
        by_domain: dict[str, list[Document]] = {}
        for document in documents:
            by_domain.setdefault(document.domain, []).append(document)
        return by_domain
    budget = arguments.bytes_per_domain
    prose = _timed(progress, "prose", lambda: prose_documents(budget))
    code = _timed(progress, "code", lambda: code_documents(budget))
    # Without a budget, math matches the larger of the other two domains.
    math_bytes = budget if budget is not None else max(_count_bytes(prose), _count_bytes(code))
    n_math = arguments.math_docs if arguments.math_docs is not None else _math_docs_for(math_bytes, arguments)
    math = _timed(progress, "math", lambda: math_documents(n_math, arguments.seed, arguments.math_difficulty))
    return {domain: docs for domain, docs in (("prose", prose), ("code", code), ("math", math)) if docs}


def _math_docs_for(target_bytes: int, arguments: _Arguments) -> int:
    """How many math documents add up to about target_bytes."""
    sample = math_documents(_MATH_SAMPLE_DOCS, arguments.seed, arguments.math_difficulty)
    return max(1, round(target_bytes * len(sample) / _count_bytes(sample)))


def _more_text_hint(arguments: _Arguments) -> str:
    """How to get more documents: more user text, or a bigger budget for the built-in corpus."""
    if arguments.data is not None:
        return "give more text (plain text is cut every ~8 KB)"
    return "raise --bytes-per-domain (built-in documents are up to 8-16 KB each)"


def _split_documents(
    by_domain: dict[str, list[Document]], fractions: tuple[float, float, float], seed: int, hint: str
) -> SplitDocuments:
    """Each domain's documents shuffled with a fixed seed and cut into train, val and test."""
    documents: SplitDocuments = {split: {} for split in SPLITS}
    for domain, domain_documents in by_domain.items():
        # Seeding per domain keeps one domain's split unchanged when another domain changes.
        rng = random.Random(f"{seed}:{domain}")
        for split, part in zip(SPLITS, _split_domain(domain, domain_documents, fractions, rng, hint)):
            documents[split][domain] = part
    empty = [split for split in SPLITS if not _concatenated(documents[split])]
    if empty:
        raise DynamoeError(
            f"too few documents for a {' and '.join(empty)} split: a domain needs at least 3 documents, so {hint}"
        )
    return documents


def _split_domain(
    domain: str, documents: list[Document], fractions: tuple[float, float, float], rng: random.Random, hint: str
) -> tuple[list[Document], list[Document], list[Document]]:
    """(train, val, test) of one domain, with at least one val and one test document when it has 3 or more."""
    count = len(documents)
    if count < 3:
        return documents, [], []  # nothing can be held out and still leave something to train on
    order = list(range(count))
    rng.shuffle(order)
    n_val = max(1, round(count * fractions[1]))
    n_test = max(1, round(count * fractions[2]))
    if count - n_val - n_test < 1:
        raise DynamoeError(f"domain {domain!r} has {count} documents, too few for splits {fractions}: {hint}")
    val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    return _in_source_order(documents, train), _in_source_order(documents, val), _in_source_order(documents, test)


def _in_source_order(documents: list[Document], indexes: list[int]) -> list[Document]:
    """The chosen documents in their original order, so that each split reads like the corpus did."""
    return [documents[index] for index in sorted(indexes)]


def _timed(progress: bool, label: str, collect: Callable[[], list[Document]]) -> list[Document]:
    """Run one collection stage and report its size and duration."""
    started = time.perf_counter()
    documents = collect()
    megabytes = _count_bytes(documents) / 1e6
    _report(progress, f"{label}: {len(documents)} documents, {megabytes:.2f} MB ({_since(started)})")
    return documents


def _count_bytes(documents: list[Document]) -> int:
    """Total UTF-8 size of the documents."""
    return sum(len(document.text.encode("utf-8")) for document in documents)


def _concatenated(by_domain: dict[str, list[Document]]) -> list[Document]:
    """All domains' documents in one list, domain after domain."""
    return [document for documents in by_domain.values() for document in documents]


def _since(started: float) -> str:
    """Seconds since started, for progress lines."""
    return f"{time.perf_counter() - started:.1f} s"


def _report(progress: bool, message: str) -> None:
    """One progress line on stderr, unless progress is off."""
    if progress:
        print(f"data: {message}", file=sys.stderr, flush=True)
