"""Corpora for dynamoe: documents, verifiable math, a byte-level BPE tokenizer and memory-mapped token shards."""

from dynamoe.data.build import build_corpus
from dynamoe.data.documents import Document, code_documents, prose_documents, user_documents
from dynamoe.data.mathgen import check_answer, generate_problem, math_documents
from dynamoe.data.shards import TokenDataset
from dynamoe.data.tokenizer import (EOS_TOKEN, encode_documents, eos_id, load_tokenizer, tokenizer_digest,
                                    train_tokenizer)

__all__ = [
    "Document",
    "prose_documents",
    "code_documents",
    "user_documents",
    "math_documents",
    "generate_problem",
    "check_answer",
    "train_tokenizer",
    "load_tokenizer",
    "eos_id",
    "encode_documents",
    "tokenizer_digest",
    "EOS_TOKEN",
    "TokenDataset",
    "build_corpus",
]
