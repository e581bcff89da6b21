"""dynamoe: Mixture-of-Experts language models whose router decides, per token, how many experts run."""

from dynamoe.config import ModelConfig, preset
from dynamoe.errors import DynamoeError
from dynamoe.hf import load_hf
from dynamoe.model import Routing, Transformer

__version__ = "0.1.0"
__all__ = ["DynamoeError", "ModelConfig", "Routing", "Transformer", "load_hf", "preset"]
