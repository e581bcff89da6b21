"""Shared fixtures: a tiny built-in corpus, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: a second thread buys little and suffers most from a busy machine


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small three-domain corpus with a 512-token vocabulary."""
    from dynamoe.data import build_corpus

    return build_corpus(tmp_path_factory.mktemp("corpus") / "tiny", vocab_size=512,
                        bytes_per_domain=40_000, seed=0, progress=False)
