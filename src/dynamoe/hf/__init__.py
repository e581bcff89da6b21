"""Hugging Face interop: import Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints with exact parity; export back."""

from dynamoe.hf.exporter import Exported, export_hf
from dynamoe.hf.families import FAMILIES, Family
from dynamoe.hf.importer import Imported, import_hf, load_hf

__all__ = ["FAMILIES", "Exported", "Family", "Imported", "export_hf", "import_hf", "load_hf"]
