"""The collectives dynamoe uses, each failing with a one-line CollectiveError instead of a backend trace."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from dynamoe.parallel.mesh import collective

BUCKET_ELEMENTS = 2**24  # flat buffers of at most this many elements (64 MiB of fp32) per all-reduce


def all_to_all(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group: ProcessGroup) -> torch.Tensor:
    """Rows input_splits[r] go to rank r, rows output_splits[r] come from rank r; differentiable."""
    return _AllToAll.apply(x_ND, output_splits, input_splits, group)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends the gradients back along the same routes."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x_ND: torch.Tensor, output_splits: list[int],
                input_splits: list[int], group: ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _exchange(x_ND, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_ND: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        output_splits, input_splits = ctx.splits
        return _exchange(grad_ND.contiguous(), input_splits, output_splits, ctx.group), None, None, None


def _exchange(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group: ProcessGroup) -> torch.Tensor:
    out_ND = x_ND.new_empty((sum(output_splits), *x_ND.shape[1:]))
    with collective("the expert-parallel all-to-all"):
        dist.all_to_all_single(out_ND, x_ND.contiguous(), output_splits, input_splits, group=group)
    return out_ND


def exchange_counts(counts_RL: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Row r of counts_RL goes to rank r; row r of the result came from rank r (equal splits, not differentiable)."""
    received_RL = torch.empty_like(counts_RL)
    with collective("exchanging the expert counts"):
        dist.all_to_all_single(received_RL, counts_RL.contiguous(), group=group)
    return received_RL


def all_reduce_sum_(tensor: torch.Tensor, group: ProcessGroup | None = None, what: str = "an all-reduce") -> torch.Tensor:
    """Sum a tensor over the group in place, and return it."""
    with collective(what):
        dist.all_reduce(tensor, group=group)
    return tensor


def all_reduce_max(value: int, device: torch.device, what: str) -> int:
    """The largest of every rank's integer."""
    tensor = torch.tensor([value], device=device)
    with collective(what):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_sum_flat_(tensors: list[torch.Tensor], group: ProcessGroup, what: str) -> None:
    """Sum many tensors over the group in place, a few flat buffers at a time (few collectives, bounded memory)."""
    bucket: list[torch.Tensor] = []
    for tensor in tensors:
        if bucket and (tensor.dtype != bucket[0].dtype or sum(t.numel() for t in bucket) + tensor.numel() > BUCKET_ELEMENTS):
            _all_reduce_bucket(bucket, group, what)
            bucket = []
        bucket.append(tensor)
    if bucket:
        _all_reduce_bucket(bucket, group, what)


def _all_reduce_bucket(tensors: list[torch.Tensor], group: ProcessGroup, what: str) -> None:
    flat = all_reduce_sum_(torch.cat([t.flatten() for t in tensors]), group, what)
    for tensor, reduced in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(reduced.view_as(tensor))


def broadcast_from_first_(tensor: torch.Tensor, group: ProcessGroup, what: str) -> None:
    """Overwrite tensor with the group's first rank's copy."""
    with collective(what):
        dist.broadcast(tensor, group=group, group_src=0)


def gather_to_first(tensor: torch.Tensor, group: ProcessGroup, what: str) -> torch.Tensor | None:
    """Concatenate every rank's tensor along dim 0 on the group's first rank (None on the others)."""
    first = dist.get_group_rank(group, dist.get_rank()) == 0
    pieces = [torch.empty_like(tensor) for _ in range(group.size())] if first else None
    with collective(what):
        dist.gather(tensor.contiguous(), pieces, group=group, group_dst=0)
    return torch.cat(pieces) if pieces is not None else None
