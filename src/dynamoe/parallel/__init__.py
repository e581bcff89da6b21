"""Data and expert parallelism on torch.distributed, applied to a built model (the model code never imports it).

    torchrun --nproc_per_node N -m dynamoe train ... --expert-parallel EP

`init_mesh` joins the processes torchrun started and builds the dp x ep process groups;
`apply_expert_parallel` keeps E / EP experts per rank and swaps in the all-to-all dispatcher;
`apply_data_parallel` makes replicas equal and the routers' balance statistics global;
`reduce_gradients` and `clip_grad_norm_` give every rank the step one process would take on the global batch.
"""

from dynamoe.parallel.data_parallel import apply_data_parallel, clip_grad_norm_, reduce_gradients
from dynamoe.parallel.expert_parallel import ExpertParallelDispatcher, apply_expert_parallel, full_experts
from dynamoe.parallel.mesh import CollectiveError, Mesh, init_mesh, make_mesh, world_size_from_env
from dynamoe.parallel.training import Distributed, Parallelism, SingleProcess, distributed

__all__ = ["CollectiveError", "Distributed", "ExpertParallelDispatcher", "Mesh", "Parallelism", "SingleProcess",
           "apply_data_parallel", "apply_expert_parallel", "clip_grad_norm_", "distributed", "full_experts", "init_mesh",
           "make_mesh", "reduce_gradients", "world_size_from_env"]
