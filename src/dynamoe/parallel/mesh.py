"""Process groups for data and expert parallelism, set up from the environment torchrun provides.

Layout: world = dp x ep ranks, expert-parallel index fastest. Ranks d*ep ... d*ep + ep - 1 split the
experts between them (consecutive ranks, so that the all-to-all traffic stays inside a node when ep
divides the GPUs per node); ranks e, e + ep, e + 2 ep, ... hold the same experts (their replicas).
Every rank trains on its own slice of the global batch.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from dynamoe.errors import DynamoeError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class CollectiveError(DynamoeError):
    """A collective failed: another rank died, or stalled past the timeout."""


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the dp x ep layout and the process groups it talks over."""

    rank: int
    world_size: int
    expert_parallel: int
    device: torch.device
    expert_group: ProcessGroup  # the ranks that split the experts between them
    replica_group: ProcessGroup  # the ranks that hold the same experts as this one

    @property
    def expert_rank(self) -> int:
        """This rank's index inside its expert group: it owns that block of experts."""
        return self.rank % self.expert_parallel

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise DynamoeError(f"WORLD_SIZE={value!r} is not a positive number of processes; unset it or launch with torchrun")
    return int(value)


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn the failure of a collective into a one-line CollectiveError naming this rank."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:  # gloo and nccl report a dead or stalled peer as RuntimeError
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        raise CollectiveError(f"rank {rank}: {what} failed ({_first_sentence(error)}); another rank died or stalled "
                              "past --dist-timeout: see its output") from None


def init_mesh(expert_parallel: int, device_type: str, timeout_s: float) -> Mesh:
    """Join the process group torchrun describes in the environment and build the dp x ep groups."""
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise DynamoeError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun "
                           "(torchrun --nproc_per_node N -m dynamoe train ...)")
    world_size, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    check_layout(world_size, expert_parallel)
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device(device_type)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DynamoeError(f"process LOCAL_RANK={local_rank} has no GPU of its own: this machine has "
                               f"{torch.cuda.device_count()}; start at most that many processes per machine")
        torch.cuda.set_device(device)
    with collective(f"joining the {world_size} processes at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"):
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return make_mesh(expert_parallel, device, timeout_s)


def check_layout(world_size: int, expert_parallel: int) -> None:
    """Raise DynamoeError unless expert_parallel divides the world."""
    if expert_parallel < 1 or world_size % expert_parallel:
        raise DynamoeError(f"--expert-parallel {expert_parallel} must divide the {world_size} processes; "
                           f"choose a divisor of {world_size}")


def make_mesh(expert_parallel: int, device: torch.device, timeout_s: float) -> Mesh:
    """The dp x ep groups over the initialised default process group (a collective: every rank calls it)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    check_layout(world_size, expert_parallel)
    timeout = timedelta(seconds=timeout_s)
    with collective("creating the process groups"):
        # new_group is itself a collective: every rank creates every group, in the same order.
        for first in range(0, world_size, expert_parallel):
            ranks = range(first, first + expert_parallel)
            group = dist.new_group(list(ranks), timeout=timeout)
            if rank in ranks:
                expert_group = group
        for offset in range(expert_parallel):
            ranks = range(offset, world_size, expert_parallel)
            group = dist.new_group(list(ranks), timeout=timeout)
            if rank in ranks:
                replica_group = group
    return Mesh(rank, world_size, expert_parallel, device, expert_group, replica_group)


def destroy_mesh() -> None:
    """Leave the process group (safe to call after a failure)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_sentence(error: BaseException) -> str:
    """The useful part of a backend error: its first sentence, without the source location gloo puts first."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ")[0].rstrip(".")
