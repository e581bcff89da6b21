"""What the training loop asks of its parallelism, in one process or many; the loop reads the same either way."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterator, Protocol

import torch

from dynamoe.model import Transformer
from dynamoe.parallel import data_parallel, expert_parallel
from dynamoe.parallel.comm import all_reduce_max, all_reduce_sum_
from dynamoe.parallel.mesh import Mesh, destroy_mesh, init_mesh


class Parallelism(Protocol):
    """The hooks of the training loop; SingleProcess makes each the identity."""

    world_size: int
    is_main: bool  # this process writes logs and checkpoints

    def parallelize(self, model: Transformer) -> Transformer: ...
    def local_rows(self, batch_B: torch.Tensor) -> torch.Tensor: ...
    def mean(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def max_over_ranks(self, value: int) -> int: ...
    def reduce_gradients(self, model: Transformer) -> None: ...
    def clip_grad_norm_(self, model: Transformer, max_norm: float) -> torch.Tensor: ...
    def full_optimizer_state(self, optimizer: torch.optim.Optimizer, model: Transformer) -> dict[str, Any] | None: ...
    def shard_optimizer_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer,
                              model: Transformer) -> dict[str, Any]: ...
    def full_model(self, model: Transformer) -> AbstractContextManager[bool]: ...  # yields is_main


class SingleProcess:
    """One process trains on the whole batch."""

    world_size = 1
    is_main = True

    def parallelize(self, model: Transformer) -> Transformer:
        """The model unchanged."""
        return model

    def local_rows(self, batch_B: torch.Tensor) -> torch.Tensor:
        """The whole batch."""
        return batch_B

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor itself."""
        return tensor

    def max_over_ranks(self, value: int) -> int:
        """The value itself."""
        return value

    def reduce_gradients(self, model: Transformer) -> None:
        """Nothing to reduce."""

    def clip_grad_norm_(self, model: Transformer, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ on every parameter."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer, model: Transformer) -> dict[str, Any] | None:
        """optimizer.state_dict()."""
        return optimizer.state_dict()

    def shard_optimizer_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer,
                              model: Transformer) -> dict[str, Any]:
        """The state unchanged."""
        return state

    @contextmanager
    def full_model(self, model: Transformer) -> Iterator[bool]:
        """The model already holds every expert."""
        yield True


class Distributed:
    """world_size processes, each on its slice of every batch; experts split over expert groups of the mesh."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh, self.world_size, self.is_main = mesh, mesh.world_size, mesh.is_main

    def parallelize(self, model: Transformer) -> Transformer:
        """Shard the experts, then make replicas equal and the routers' statistics global."""
        model = expert_parallel.apply_expert_parallel(model, self.mesh)
        return data_parallel.apply_data_parallel(model, self.mesh)

    def local_rows(self, batch_B: torch.Tensor) -> torch.Tensor:
        """This rank's consecutive slice of a global batch's rows."""
        rows = batch_B.shape[0] // self.world_size
        return batch_B[self.mesh.rank * rows:(self.mesh.rank + 1) * rows]

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over every rank (ranks hold equal shares of the batch, so means of means are means)."""
        return all_reduce_sum_(tensor.clone(), what="averaging the losses") / self.world_size

    def max_over_ranks(self, value: int) -> int:
        """The largest of every rank's value, so that what one rank saw (a stop signal) every rank acts on."""
        return all_reduce_max(value, self.mesh.device, "agreeing on a stop signal")

    def reduce_gradients(self, model: Transformer) -> None:
        """Gradients of the mean loss over the global batch."""
        data_parallel.reduce_gradients(model, self.mesh)

    def clip_grad_norm_(self, model: Transformer, max_norm: float) -> torch.Tensor:
        """Clip by the global norm, experts on every rank included; returns it."""
        return data_parallel.clip_grad_norm_(model, max_norm, self.mesh)

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer, model: Transformer) -> dict[str, Any] | None:
        """The optimizer state with every expert's moments on rank 0, None elsewhere (a collective)."""
        return expert_parallel.full_optimizer_state(optimizer, model, self.mesh)

    def shard_optimizer_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer,
                              model: Transformer) -> dict[str, Any]:
        """This rank's part of a full optimizer state."""
        return expert_parallel.shard_optimizer_state(state, optimizer, model, self.mesh)

    def full_model(self, model: Transformer) -> AbstractContextManager[bool]:
        """Context in which rank 0's model holds every expert; yields is_main (a collective)."""
        return expert_parallel.full_experts(model, self.mesh)


@contextmanager
def distributed(expert_parallel_size: int, device_type: str, timeout_s: float) -> Iterator[Distributed]:
    """Join the processes torchrun started, for the duration of a training run."""
    try:
        yield Distributed(init_mesh(expert_parallel_size, device_type, timeout_s))
    finally:
        destroy_mesh()
