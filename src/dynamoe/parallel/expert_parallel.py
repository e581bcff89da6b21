"""Expert parallelism: each rank of an expert group stores E / ep experts of every MoE layer, and each
selected (token, expert) pair travels to the rank that owns its expert, is computed there, and comes back.

Shape legend: T tokens, K routing slots, S = T K slots, D model dim, E experts, R ranks of the expert
group, L experts per rank (E = R L), P pairs this rank sends, Q pairs this rank's experts compute.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torch.distributed import ProcessGroup

from dynamoe.errors import DynamoeError
from dynamoe.model import Experts, MoE, Routing, Transformer
from dynamoe.parallel.comm import all_to_all, exchange_counts, gather_to_first
from dynamoe.parallel.mesh import Mesh


class ExpertParallelDispatcher:
    """The Dispatcher of sharded experts: `experts` holds this rank's block of L consecutive experts."""

    def __init__(self, n_experts: int, group: ProcessGroup) -> None:
        self.n_experts, self.group = n_experts, group

    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
        R, E = self.group.size(), self.n_experts
        # Pairs sorted by expert are sorted by owning rank too; padding slots get id E and sort last.
        slot_ids_S = torch.where(routing.mask_TK, routing.experts_TK, E).flatten()
        order_S = torch.argsort(slot_ids_S, stable=True)
        sent_E = torch.bincount(slot_ids_S, minlength=E + 1)[:E]
        received_RL = exchange_counts(sent_E.view(R, E // R), self.group)
        counts = torch.cat([sent_E, received_RL.flatten()]).tolist()  # the one host sync
        sent_R, received_R = _block_sums(counts[:E], R), _block_sums(counts[E:], R)

        order_P = order_S[:sum(sent_R)]
        token_P, weight_P = order_P // routing.experts_TK.shape[1], routing.weights_TK.flatten()[order_P]
        # index_select, not x_TD[token_P]: its backward adds repeated rows in a fixed order (reproducible).
        x_QD = all_to_all(x_TD.index_select(0, token_P), received_R, sent_R, self.group)
        y_QD = _run_local_experts(x_QD, received_RL, counts[E:], experts)
        y_PD = all_to_all(y_QD, sent_R, received_R, self.group)
        return torch.zeros_like(x_TD).index_add_(0, token_P, y_PD * weight_P[:, None])


def _block_sums(counts: list[int], blocks: int) -> list[int]:
    """Sums of `blocks` equal consecutive blocks of counts: pairs per rank from pairs per expert."""
    size = len(counts) // blocks
    return [sum(counts[b * size:(b + 1) * size]) for b in range(blocks)]


def _run_local_experts(x_QD: torch.Tensor, received_RL: torch.Tensor, received: list[int], experts: Experts) -> torch.Tensor:
    """Each local expert on its rows; rows arrive grouped by source rank and leave in that same order."""
    R, L = received_RL.shape
    order_Q = expert_major_order(received_RL, x_QD.shape[0])
    x_sorted_QD = x_QD.index_select(0, order_Q)
    outputs, start = [], 0
    for expert in range(L):
        count = sum(received[r * L + expert] for r in range(R))
        if count:
            outputs.append(experts.forward_expert(expert, x_sorted_QD[start:start + count]))
            start += count
    if not outputs:
        # Still a function of x_QD: every rank must run both all-to-alls in backward, even with nothing to compute.
        return x_QD * 0
    y_sorted_QD = torch.cat(outputs)
    return torch.zeros_like(y_sorted_QD).index_copy(0, order_Q, y_sorted_QD)


def expert_major_order(counts_RL: torch.Tensor, total: int) -> torch.Tensor:
    """Indices that regroup rows laid out by source rank then expert (blocks of counts_RL) by expert then source rank."""
    counts = counts_RL.flatten()
    starts_RL = (counts.cumsum(0) - counts).view_as(counts_RL)  # where each (rank, expert) block starts now
    counts_B, starts_B = counts_RL.t().flatten(), starts_RL.t().flatten()  # the blocks in their new order
    new_starts_B = counts_B.cumsum(0) - counts_B
    shift_Q = torch.repeat_interleave(starts_B - new_starts_B, counts_B, output_size=total)
    return shift_Q + torch.arange(total, device=counts_RL.device)


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of a model, in depth order."""
    return [module for module in model.modules() if isinstance(module, MoE)]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The stacked expert weights of every MoE layer (sharded under expert parallelism)."""
    return [param for moe in moe_layers(model) for param in moe.experts.parameters()]


def apply_expert_parallel(model: Transformer, mesh: Mesh) -> Transformer:
    """Keep only this rank's block of experts in every MoE layer, and route through the all-to-all dispatcher.

    Each Experts module then stacks L = E / ep experts (its n_experts says so) and local expert l is
    global expert expert_rank * L + l; the router still chooses among all E.
    """
    if mesh.expert_parallel == 1:
        return model
    for moe in moe_layers(model):
        experts = moe.experts
        n_experts = experts.n_experts
        if n_experts % mesh.expert_parallel:
            raise DynamoeError(f"n_experts={n_experts} is not divisible by --expert-parallel {mesh.expert_parallel}; "
                               "choose an expert-parallel size that divides the number of experts")
        local = n_experts // mesh.expert_parallel
        first = mesh.expert_rank * local
        for name, param in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, nn.Parameter(param.detach()[first:first + local].clone(), param.requires_grad))
        experts.n_experts = local
        moe.dispatcher = ExpertParallelDispatcher(n_experts, mesh.expert_group)
    return model


@contextmanager
def full_experts(model: Transformer, mesh: Mesh) -> Iterator[bool]:
    """Inside, rank 0's model holds every expert (the layout of checkpoints); yields whether this is rank 0.

    A collective over rank 0's expert group; other ranks yield False at once.
    """
    if mesh.expert_parallel == 1 or mesh.rank >= mesh.expert_parallel:
        yield mesh.is_main
        return
    shards: list[tuple[Experts, dict[str, nn.Parameter], int]] = []
    for moe in moe_layers(model):
        experts = moe.experts
        full = {name: gather_to_first(param.detach(), mesh.expert_group, "gathering the experts for a checkpoint")
                for name, param in experts.named_parameters(recurse=False)}
        if mesh.is_main:
            shards.append((experts, dict(experts.named_parameters(recurse=False)), experts.n_experts))
            for name, tensor in full.items():
                setattr(experts, name, nn.Parameter(tensor, requires_grad=False))
            experts.n_experts *= mesh.expert_parallel
    try:
        yield mesh.is_main
    finally:
        for experts, params, n_experts in shards:
            for name, param in params.items():
                setattr(experts, name, param)
            experts.n_experts = n_experts


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: Transformer, mesh: Mesh) -> dict[str, Any] | None:
    """optimizer.state_dict() with every expert's moments on rank 0 (the checkpoint layout); None on other ranks."""
    state = optimizer.state_dict()
    if mesh.expert_parallel == 1 or mesh.rank >= mesh.expert_parallel:
        return state if mesh.is_main else None
    expert_indices = _expert_indices(optimizer, model)
    gathered = {index: {key: _gather(value, expert_indices.get(index), mesh) for key, value in param_state.items()}
                for index, param_state in state["state"].items()}
    return {**state, "state": gathered} if mesh.is_main else None


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: Transformer,
                          mesh: Mesh) -> dict[str, Any]:
    """The inverse of full_optimizer_state: keep this rank's block of each expert tensor of a full state."""
    if mesh.expert_parallel == 1:
        return state
    expert_indices = _expert_indices(optimizer, model)
    sharded = {}
    for index, param_state in state["state"].items():
        param = expert_indices.get(index)
        sharded[index] = {key: _shard(value, param, mesh) for key, value in param_state.items()}
    return {**state, "state": sharded}


def _expert_indices(optimizer: torch.optim.Optimizer, model: Transformer) -> dict[int, nn.Parameter]:
    """Position in optimizer.state_dict() of each expert parameter."""
    expert_ids = {id(param) for param in expert_parameters(model)}
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return {index: param for index, param in enumerate(params) if id(param) in expert_ids}


def _gather(value: Any, param: nn.Parameter | None, mesh: Mesh) -> Any:
    if param is None or not isinstance(value, torch.Tensor) or value.shape != param.shape:
        return value  # a replicated tensor, or a scalar such as Adam's step
    return gather_to_first(value, mesh.expert_group, "gathering the optimizer state for a checkpoint")


def _shard(value: Any, param: nn.Parameter | None, mesh: Mesh) -> Any:
    if param is None or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    local = param.shape[0]
    if value.shape[0] != local * mesh.expert_parallel:
        raise DynamoeError(f"an optimizer state of shape {list(value.shape)} does not hold {local * mesh.expert_parallel} "
                           "experts; resume from a checkpoint of this model")
    return value[mesh.expert_rank * local:(mesh.expert_rank + 1) * local].clone()
