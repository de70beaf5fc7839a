"""Checkpoint loading and the export-friendly MiniCPM / BlockFFN module."""
from exporter.models.checkpoint import Checkpoint, find_files
from exporter.models.config import ModelConfig
from exporter.models.loader import build_model, load_checkpoint, load_model
from exporter.models.reference import ReferenceRun, greedy_generate, prompt_logits
from exporter.models.synthetic import write_synthetic_checkpoint
from exporter.models.transformer import CausalLM

__all__ = [
    "CausalLM",
    "Checkpoint",
    "ModelConfig",
    "ReferenceRun",
    "build_model",
    "find_files",
    "greedy_generate",
    "load_checkpoint",
    "load_model",
    "prompt_logits",
    "write_synthetic_checkpoint",
]
