"""Token shards on disk: one flat memory-mapped token file per split, plus a per-document index."""

from __future__ import annotations

import json
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

from dynamoe.data.documents import Document
from dynamoe.data.tokenizer import encode_documents
from dynamoe.errors import DynamoeError

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val", "test")
# Documents per encode_batch call: enough to keep the Rust threads busy, few enough to stream.
_ENCODE_BATCH = 256
_REBUILD_HINT = "rebuild it with `dynamoe data build --force`"
_REQUIRED_META = ("domains", "vocab_size", "dtype")

SplitCounts = dict[str, dict[str, int]]  # domain -> {"documents": n, "tokens": n, "bytes": n}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokens_path(data_dir: Path, split: str) -> Path:
    """Where a split's flat token file lives."""
    return Path(data_dir) / f"{split}.bin"


def index_path(data_dir: Path, split: str) -> Path:
    """Where a split's [n_docs, 3] (start, length, domain) index lives."""
    return Path(data_dir) / f"{split}.docs.npy"


def write_split(
    out_dir: Path, split: str, documents: Iterable[Document], tokenizer: Tokenizer, domains: list[str]
) -> SplitCounts:
    """Tokenize documents into {split}.bin (each followed by EOS) and {split}.docs.npy; return per-domain counts."""
    domain_index = {domain: index for index, domain in enumerate(domains)}
    dtype = token_dtype(tokenizer.get_vocab_size())
    rows: list[tuple[int, int, int]] = []
    counts = {domain: {"documents": 0, "tokens": 0, "bytes": 0} for domain in domains}
    offset = 0
    with open(tokens_path(out_dir, split), "wb") as out:
        for batch in _batches(documents, _ENCODE_BATCH):
            ids_per_document = encode_documents(tokenizer, [document.text for document in batch])
            out.write(np.fromiter(chain.from_iterable(ids_per_document), dtype=dtype).tobytes())
            for document, ids in zip(batch, ids_per_document):
                length = len(ids)
                rows.append((offset, length, _domain_number(domain_index, document.domain)))
                offset += length
                _count(counts[document.domain], length, document)
    np.save(index_path(out_dir, split), np.array(rows, dtype=np.int64).reshape(-1, 3))
    return counts


def read_meta(data_dir: Path) -> dict[str, Any]:
    """The meta.json of a built corpus, or a DynamoeError saying how to build one."""
    data_dir = Path(data_dir)
    path = data_dir / META_FILE
    if not path.is_file():
        raise DynamoeError(f"no built corpus in {data_dir} (no {META_FILE}): run `dynamoe data build` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DynamoeError(f"{path} is unreadable: {_REBUILD_HINT}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise DynamoeError(f"{data_dir} holds a corpus of another format (need version {FORMAT_VERSION}): {_REBUILD_HINT}")
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise DynamoeError(f"{path} lacks {', '.join(missing)}: {_REBUILD_HINT}")
    _check_meta_values(path, meta)
    return meta


class TokenDataset:
    """One split of a built corpus: random training windows and per-domain tokens, read from a memmap."""

    def __init__(self, data_dir: Path, split: str) -> None:
        if split not in SPLITS:
            raise DynamoeError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        meta = read_meta(data_dir)
        self.data_dir = Path(data_dir)
        self.split = split
        self.domains: list[str] = list(meta["domains"])
        self.vocab_size = int(meta["vocab_size"])
        self.docs = _load_index(index_path(data_dir, split))
        self.tokens = _load_tokens(tokens_path(data_dir, split), np.dtype(meta["dtype"]))
        indexed = int(self.docs[:, 1].sum())
        if len(self.tokens) != indexed:
            raise DynamoeError(
                f"{tokens_path(data_dir, split)} has {len(self.tokens)} tokens but its index says {indexed}: {_REBUILD_HINT}"
            )
        # Once, up front: a stray id would otherwise surface as an IndexError in the middle of training.
        check_token_ids(self.tokens, self.vocab_size, f"{tokens_path(data_dir, split)} (vocabulary of {META_FILE})",
                        _REBUILD_HINT)

    @property
    def n_tokens(self) -> int:
        """Tokens in the split, end-of-text tokens included."""
        return len(self.tokens)

    def __len__(self) -> int:
        return self.n_tokens

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, int64 [batch_size, seq_len], from windows chosen by (seed, step) alone."""
        if min(step, seed) < 0 or min(batch_size, seq_len) < 1:
            raise DynamoeError(
                f"need step, seed >= 0 and batch_size, seq_len >= 1, got {step}, {seed}, {batch_size}, {seq_len}"
            )
        self.check_window(seq_len)
        window = seq_len + 1
        # Seeding with (seed, step) rather than carrying a generator along means a resumed run
        # replays exactly the batches it would have seen, with no sampler state to save.
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.n_tokens - window + 1, size=batch_size)
        rows = np.asarray(self.tokens[starts[:, None] + np.arange(window)], dtype=np.int64)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def check_window(self, seq_len: int) -> None:
        """Raise a DynamoeError unless the split holds at least one window of seq_len + 1 tokens."""
        if self.n_tokens < seq_len + 1:
            raise DynamoeError(
                f"the {self.split} split of {self.data_dir} has {self.n_tokens} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}: use a smaller --seq-len or build a bigger corpus (more data or --bytes-per-domain)"
            )

    def domain_tokens(self, domain: str) -> np.ndarray:
        """The tokens of one domain's documents, concatenated in document order (EOS tokens included)."""
        if domain not in self.domains:
            raise DynamoeError(f"domain {domain!r} is not in this corpus: it has {', '.join(self.domains)}")
        rows = self.docs[self.docs[:, 2] == self.domains.index(domain)]
        pieces = [self.tokens[start : start + length] for start, length in rows[:, :2]]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.tokens.dtype)


def check_token_ids(tokens: np.ndarray, vocab_size: int, source: str, fix: str) -> None:
    """Raise a DynamoeError when a token id is negative or not below vocab_size."""
    if len(tokens) == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise DynamoeError(f"{source} holds token id {bad}, outside the vocabulary of {vocab_size} tokens: {fix}")


def _batches(items: Iterable[Document], size: int) -> Iterator[list[Document]]:
    """Consecutive lists of up to size items."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _check_meta_values(path: Path, meta: dict[str, Any]) -> None:
    """Raise a DynamoeError when meta.json's vocab_size, dtype or domains cannot describe a corpus."""
    vocab_size, dtype, domains = meta["vocab_size"], meta["dtype"], meta["domains"]
    # bool is an int subclass, but `true` is no vocabulary size.
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise DynamoeError(f"{path} has vocab_size={vocab_size!r}, not a positive integer: {_REBUILD_HINT}")
    expected = token_dtype(vocab_size).name
    if dtype != expected:
        raise DynamoeError(f"{path} has dtype={dtype!r} but vocab_size={vocab_size} is stored as {expected!r}: {_REBUILD_HINT}")
    if not isinstance(domains, list) or not domains or not all(isinstance(domain, str) for domain in domains):
        raise DynamoeError(f"{path} has domains={domains!r}, not a list of names: {_REBUILD_HINT}")


def _domain_number(domain_index: dict[str, int], domain: str) -> int:
    """The position of a document's domain in the domains list."""
    if domain not in domain_index:
        raise DynamoeError(f"a document has domain {domain!r}, which is not among {', '.join(domain_index)}")
    return domain_index[domain]


def _count(counts: dict[str, int], n_tokens: int, document: Document) -> None:
    """Add one document to its domain's counts."""
    counts["documents"] += 1
    counts["tokens"] += n_tokens
    counts["bytes"] += len(document.text.encode("utf-8"))


def _load_index(path: Path) -> np.ndarray:
    """A split's document index, checked to be an [n, 3] integer array."""
    if not path.is_file():
        raise DynamoeError(f"{path} is missing: run `dynamoe data build` first")
    try:
        index = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        raise DynamoeError(f"{path} is unreadable: {_REBUILD_HINT}") from None
    if index.ndim != 2 or index.shape[1] != 3 or index.dtype.kind != "i":
        raise DynamoeError(f"{path} is not a document index: {_REBUILD_HINT}")
    return index


def _load_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    """A split's tokens memory-mapped read-only, so a corpus larger than RAM costs nothing to open."""
    if not path.is_file():
        raise DynamoeError(f"{path} is missing: run `dynamoe data build` first")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)  # mmap refuses empty files
    try:
        return np.memmap(path, dtype=dtype, mode="r")
    except ValueError:  # a size that is not a whole number of tokens: a truncated write
        raise DynamoeError(f"{path} is truncated: {_REBUILD_HINT}") from None
