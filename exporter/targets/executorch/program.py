"""The steps every ExecuTorch program of ours takes, shared by the text program (target.py) and the
vision-language one (multimodal.py): the export cache form, emission, an atomic write, and the values
ExecuTorch's LLM runners read from the program."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cpm_mobile.exporter.models.linear_attention import LinearAttentionState
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.models.variant import derive
from cpm_mobile.exporter.targets.base import ExportContext

PTE_NAME = "model.pte"
ATTENTION_CUSTOM = "custom_sdpa"
ATTENTION_PLAIN = "plain"


def export_ready(model: CausalLM, attention: str) -> CausalLM:
    """A variant of the model with the chosen export cache form (weights shared, caches its own)."""
    if attention == ATTENTION_CUSTOM:
        from cpm_mobile.exporter.targets.executorch.cache import CustomOpKVCache

        return derive(model, caches=CustomOpKVCache.like)
    return derive(model)


def emit(edge):
    """Memory-planned ExecuTorch program. Planning uses the dynamic dims' upper bounds."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    return edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )


def write_program(executorch_program, path: Path) -> int:
    """Write through a temporary name so an interrupted save never leaves a truncated model.pte."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            executorch_program.write_to_file(handle)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path.stat().st_size


def constant_methods(model: CausalLM, context: ExportContext, attention: str) -> dict[str, Any]:
    """Values ExecuTorch's LLM runner reads from the program (plus a few for other apps)."""
    methods: dict[str, Any] = {
        "get_max_seq_len": model.max_seq_len,
        "get_max_context_len": model.max_seq_len,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,  # the whole prompt in one forward call
        "use_sdpa_with_kv_cache": attention == ATTENTION_CUSTOM,
        "get_vocab_size": model.config.vocab_size,
        "get_n_layers": model.config.num_layers,
    }
    if context.eos_ids:
        methods["get_eos_ids"] = list(context.eos_ids)
    if context.bos_id is not None:
        methods["get_bos_id"] = context.bos_id
    return methods


def cache_description(model: CausalLM, attention: str) -> dict[str, Any]:
    heads, k_dim, v_dim = model.config.cache_heads, model.config.k_head_dim, model.config.value_head_dim
    stored_v_dim = k_dim if attention == ATTENTION_CUSTOM else v_dim
    layout = "[1, max_seq_len, heads, dim]" if attention == ATTENTION_CUSTOM else "[1, heads, max_seq_len, dim]"
    return {
        "kind": "mutable_buffers",  # inside the program; persists across execute calls
        "layout": layout,
        "layers": model.config.num_layers,
        "heads": heads,
        "key_dim": k_dim,
        "value_dim": v_dim,
        "stored_value_dim": stored_v_dim,
        "max_seq_len": model.max_seq_len,
        "dtype": str(next(c.k_cache.dtype for c in model.kv_caches
                          if not isinstance(c, LinearAttentionState))).removeprefix("torch."),
    }
