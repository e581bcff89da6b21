"""The model: layers, routers, dispatch, experts, MoE layer, transformer."""

from dynamoe.model.dispatch import LocalDispatcher, reference_dispatch
from dynamoe.model.experts import Experts
from dynamoe.model.moe import MoE
from dynamoe.model.router import Routing, build_router
from dynamoe.model.transformer import Dial, ModelOutput, Transformer

__all__ = ["Dial", "Experts", "LocalDispatcher", "MoE", "ModelOutput", "Routing", "Transformer", "build_router",
           "reference_dispatch"]
