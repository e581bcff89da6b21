"""Byte-level BPE that encodes any text, splits numbers into single digits, and decodes back exactly."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dynamoe.errors import DynamoeError

EOS_TOKEN = "<|endoftext|>"
# End-of-text spellings of imported tokenizers (Mixtral "</s>", Llama 3, chat models, Gemma), tried after ours.
OTHER_EOS_TOKENS = ("</s>", "<|end_of_text|>", "<|im_end|>", "<eos>")
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB_SIZE = 256 + 1  # every byte plus the end-of-text token
MAX_VOCAB_SIZE = 2**32  # token shards store ids as uint32 at most


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """A byte-level BPE tokenizer with vocab_size entries (fewer if the texts run out of merges)."""
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    # Single digits make every number spell out the same way, which arithmetic needs; no prefix
    # space and no normalizer, so that decoding gives back exactly the text that was encoded.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # The whole byte alphabet, seen in the corpus or not, so that any text can be encoded.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _literal_special_tokens(tokenizer)


def check_vocab_size(vocab_size: int) -> None:
    """Raise a DynamoeError when vocab_size cannot hold every byte and the end-of-text token, or its ids no shard."""
    if not isinstance(vocab_size, int) or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise DynamoeError(f"vocab_size must be an integer from {MIN_VOCAB_SIZE} (256 bytes + {EOS_TOKEN}) to "
                           f"{MAX_VOCAB_SIZE} (ids stored as uint32), got {vocab_size!r}")


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer saved at path (a tokenizer.json, or a corpus folder holding one)."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise DynamoeError(f"no tokenizer at {file}: run `dynamoe data build` first")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # the Rust side raises a bare Exception for every kind of bad file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DynamoeError(f"{file} is not a valid tokenizer ({reason}): rebuild with `dynamoe data build --force`") from None
    eos_id(tokenizer)
    return _literal_special_tokens(tokenizer)


def tokenizer_digest(path: Path) -> str:
    """A sha256 of the tokenizer saved at path that changes exactly when its vocabulary, merges or settings do."""
    # Hashing the re-serialized tokenizer rather than the file's bytes ignores formatting that
    # differs between `tokenizers` versions but means the same tokenizer.
    return hashlib.sha256(load_tokenizer(path).to_str().encode("utf-8")).hexdigest()


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids followed by EOS, exactly as the token shards store a document."""
    eos = eos_id(tokenizer)
    return [encoding.ids + [eos] for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


def eos_id(tokenizer: Tokenizer) -> int:
    """The id of the end-of-text token that separates documents (ours, or a known spelling of an imported one)."""
    for token in (EOS_TOKEN, *OTHER_EOS_TOKENS):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DynamoeError(f"the tokenizer has no end-of-text token (none of {', '.join((EOS_TOKEN, *OTHER_EOS_TOKENS))}); "
                       "for a corpus, rebuild it with `dynamoe data build --force`; for an imported model, add one to "
                       "its tokenizer.json")


def _literal_special_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """Make text that spells out <|endoftext|> encode as plain bytes, so only the shard writer adds EOS."""
    # Without this, a document quoting the token would gain a document boundary and lose the text
    # on decoding. The setting is not saved in tokenizer.json, so loading sets it again.
    tokenizer.encode_special_tokens = True
    return tokenizer
