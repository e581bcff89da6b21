"""What a command needs from the machine, checked before its work starts: memory for a model, write access
and free space for its outputs; and a failed write (disk full, permission denied) as a one-line error."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from dynamoe.config import ModelConfig
from dynamoe.errors import DynamoeError

RETRY = "run the command again"  # how to carry on once a full disk has room again, unless a caller knows better
REPORT_BYTES = 2**20  # a report folder (JSON, markdown, a few plots) takes some hundred KB
FLOAT_BYTES = 4  # weights, gradients and optimizer moments are float32
# Bytes per parameter while training: the weight, its gradient and AdamW's two moments.
TRAINING_BYTES_PER_PARAMETER = 4 * FLOAT_BYTES
_REASONS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk full (quota exceeded)", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.EROFS: "read-only file system"}
# How libraries report those errors without an errno: safetensors ("I/O error: No space left on device (os
# error 28)") and torch.save, whose zip writer fails on a short write ("[enforce fail at inline_container.cc:...]
# unexpected pos 576 vs 534"); a short write is what a full disk causes.
_MESSAGES = {"No space left on device": "disk full", "Disk quota exceeded": "disk full (quota exceeded)",
             "unexpected pos": "disk full", "Permission denied": "permission denied",
             "Read-only file system": "read-only file system"}


def check_writable(folder: Path, bytes_needed: int = 0, what: str = "the output") -> None:
    """Raise a DynamoeError unless folder (or the folder it would be created in) can be written and has
    bytes_needed free."""
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise DynamoeError(f"{folder} cannot be a folder because {existing} is a file; choose another output folder")
    try:  # a probe file tells what no permission bit does: ACLs, read-only mounts, root-squashed shares
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".dynamoe-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise DynamoeError(f"cannot write to {folder}: {write_failure(error) or error.strerror} ({existing}); "
                           "choose another output folder or fix its permissions") from None
    free = shutil.disk_usage(existing).free
    if free < bytes_needed:
        raise DynamoeError(f"not enough disk space in {folder}: {what} needs about {_bytes(bytes_needed)} but "
                           f"{_bytes(free)} are free; free some space or choose another output folder")


def write_failure(error: BaseException) -> str | None:
    """'disk full', 'permission denied' or 'read-only file system' when error is a failed write of that kind."""
    code = getattr(error, "errno", None)
    if code in _REASONS:
        return _REASONS[code]
    text = str(error)
    return next((reason for fragment, reason in _MESSAGES.items() if fragment in text), None)


@contextmanager
def writing(folder: Path, what: str, then: str = RETRY) -> Iterator[None]:
    """Turn a disk-full, permission or read-only error raised inside into one DynamoeError naming folder;
    `then` says how to carry on once the disk has room."""
    try:
        yield
    except DynamoeError:
        raise
    except Exception as error:  # safetensors' own error type is no OSError
        reason = write_failure(error)
        if reason is None:
            raise
        fix = f"free some space, then {then}" if reason.startswith("disk full") else \
            "fix its permissions or choose another output folder"
        file = getattr(error, "filename", None)
        raise DynamoeError(f"{reason} while writing {what} to {folder}{f' ({file})' if file else ''}; {fix}") from None


def model_bytes(cfg: ModelConfig) -> int:
    """A lower bound of the memory a model with cfg holds: its weights and its RoPE tables."""
    return FLOAT_BYTES * (cfg.weight_count() + 2 * cfg.max_seq_len * cfg.head_dim)


def training_bytes(cfg: ModelConfig, batch_size: int, seq_len: int, shards: int = 1) -> int:
    """A lower bound of the memory one process takes to train cfg on batch_size rows: its share of the weights,
    gradients and AdamW moments (split over `shards` processes at most), one activation per layer and the logits."""
    activations = batch_size * seq_len * (cfg.dim * cfg.n_layers + cfg.vocab_size)
    return (TRAINING_BYTES_PER_PARAMETER * cfg.weight_count()) // shards + FLOAT_BYTES * activations


def check_memory(bytes_needed: int, device: torch.device, what: str, fix: str) -> None:
    """Raise a DynamoeError, before anything is allocated, when bytes_needed exceeds the device's whole memory."""
    total = device_memory(device)
    if bytes_needed > total:
        raise DynamoeError(f"{what} needs at least {_bytes(bytes_needed)} of memory, more than the {_bytes(total)} "
                           f"of {device.type}; {fix}")


def device_memory(device: torch.device) -> int:
    """Total memory of a CUDA device, or of this machine for the CPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _bytes(n_bytes: int) -> str:
    """A byte count exactly, and in the largest binary unit that keeps it at least 1 (up to PiB)."""
    exponent = min(5, max(0, (n_bytes.bit_length() - 1) // 10))
    if exponent == 0:
        return f"{n_bytes:,} bytes"
    return f"{n_bytes:,} bytes ({n_bytes / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB', 'TiB', 'PiB')[exponent - 1]})"
