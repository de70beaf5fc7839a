"""Checkpoint loading and the export-friendly MiniCPM / BlockFFN module."""
from cpm_mobile.exporter.models.checkpoint import Checkpoint, find_files
from cpm_mobile.exporter.models.config import ModelConfig
from cpm_mobile.exporter.models.loader import build_model, load_checkpoint, load_model
from cpm_mobile.exporter.models.reference import ReferenceRun, greedy_generate, prompt_logits
from cpm_mobile.exporter.models.transformer import CausalLM

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
]
