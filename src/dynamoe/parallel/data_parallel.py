"""Data parallelism: every rank trains on its slice of the global batch, and the ranks together take the
step one process would take on the whole batch.

Three things make that so: the routers' balance loss counts expert use over the global batch (it is
not linear in the tokens, so a mean of per-rank losses would differ); gradients are summed over the
ranks holding each weight and divided by the world size (each rank's loss is a mean over its slice);
and the gradient norm that clipping uses covers every expert, wherever it lives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dynamoe.model import Transformer
from dynamoe.parallel.comm import all_reduce_sum_, all_reduce_sum_flat_, broadcast_from_first_
from dynamoe.parallel.expert_parallel import expert_parameters
from dynamoe.parallel.mesh import Mesh


def apply_data_parallel(model: Transformer, mesh: Mesh) -> Transformer:
    """Make replicas equal (dense weights from rank 0, each expert block from its first holder), and give the
    routers the expert counts of the global batch."""
    dense, experts = _split_parameters(model)
    with torch.no_grad():
        for params, group in ((dense, dist.group.WORLD), (experts, mesh.replica_group)):
            for param in params:
                broadcast_from_first_(param, group, "copying rank 0's weights")
        for buffer in model.buffers():
            broadcast_from_first_(buffer, dist.group.WORLD, "copying rank 0's buffers")
    for router in model.routers():
        router.reduce_expert_counts = sum_over_ranks
    return model


def sum_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    """Counts summed over every rank (in place)."""
    return all_reduce_sum_(counts, what="summing the routers' expert counts")


def reduce_gradients(model: Transformer, mesh: Mesh) -> None:
    """Each gradient becomes that of the mean loss over the global batch: summed over the weight's replicas, / world size."""
    dense, experts = _split_parameters(model)
    for param in experts:
        # A rank whose experts received no rows has no gradient for them; its replicas may have one.
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    for params, group in ((dense, dist.group.WORLD), (experts, mesh.replica_group)):
        grads = [param.grad for param in params if param.grad is not None]
        for grad in grads:
            grad.div_(mesh.world_size)
        all_reduce_sum_flat_(grads, group, "averaging the gradients")


def clip_grad_norm_(model: Transformer, max_norm: float, mesh: Mesh) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole model, experts of every rank included; returns the norm."""
    dense, experts = _split_parameters(model)
    device = next(model.parameters()).device
    # Dense gradients are equal on every rank after reduce_gradients; the experts are split over the expert group.
    expert_square = _norm(experts, device) ** 2
    if mesh.expert_parallel > 1:
        all_reduce_sum_(expert_square, mesh.expert_group, "summing the expert gradient norms")
    total_norm = (_norm(dense, device) ** 2 + expert_square).sqrt()
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total_norm)
    return total_norm


def _norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    grads = [param.grad for param in params if param.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)


def _split_parameters(model: Transformer) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated parameters, expert parameters): they are reduced over different groups."""
    experts = expert_parameters(model)
    expert_ids = {id(param) for param in experts}
    return [param for param in model.parameters() if id(param) not in expert_ids], experts
