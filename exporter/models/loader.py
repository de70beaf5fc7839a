"""Checkpoint -> validated state dict -> CausalLM. Strict: every tensor accounted for."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.checkpoint import (
    FLOAT_DTYPES,
    IGNORED_SUFFIXES,
    Checkpoint,
    CheckpointFiles,
    find_files,
    read_all_tensors,
)
from cpm_mobile.exporter.models.config import ModelConfig
from cpm_mobile.exporter.models.grid import detect_grid
from cpm_mobile.exporter.models.gptq import is_gptq, read_gptq
from cpm_mobile.exporter.models.transformer import CausalLM

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
SHOWN_NAMES = 4


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes CausalLM holds for this config (built on the meta device: free)."""
    with torch.device("meta"):
        module = CausalLM(config, max_seq_len=1)
    return {_hf_name(name): tensor.shape for name, tensor in module.state_dict().items()}


def _hf_name(module_name: str) -> str:
    # CausalLM mirrors the HF layout under "model." except the head.
    return module_name if module_name.startswith("lm_head") else f"model.{module_name}"


def _module_name(hf_name: str) -> str:
    return hf_name if hf_name.startswith("lm_head") else hf_name.removeprefix("model.")


def canonical_state(
    raw: dict[str, torch.Tensor], origin: dict[str, Path], config: ModelConfig, expected: dict[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Rename the real checkpoints' variants to one naming: fused projections, BlockFFN's bare names.

    Returns the state and, for each canonical name, the file its tensor came from.
    """
    state: dict[str, torch.Tensor] = {}
    state_origin: dict[str, Path] = {}
    for disk, tensor in raw.items():
        before = set(state)
        name = _text_model_name(disk, config)
        if name is None or name.endswith(IGNORED_SUFFIXES):
            continue
        path = origin[disk]
        if zero_centered(name, config):
            tensor = tensor.float() + 1.0  # (1 + w) as transformers computes it, in fp32, folded once
        kind = name.rsplit(".", 1)[-1]  # weight or bias: fused biases split like their weights
        if name.endswith(f"self_attn.qkv_proj.{kind}"):
            prefix = name.removesuffix(f"qkv_proj.{kind}")
            sizes = [config.num_heads * config.head_dim] + [config.num_kv_heads * config.head_dim] * 2
            parts = _split_rows(tensor, sizes, name, path)
            state.update({f"{prefix}{p}_proj.{kind}": t for p, t in zip("qkv", parts)})
        elif name.endswith(f"mlp.gate_up_proj.{kind}"):
            prefix = name.removesuffix(f"gate_up_proj.{kind}")
            sizes = [config.intermediate_size] * 2
            gate, up = _split_rows(tensor, sizes, name, path)
            state[f"{prefix}gate_proj.{kind}"], state[f"{prefix}up_proj.{kind}"] = gate, up
        elif name not in expected and f"{name}.weight" in expected:
            state[f"{name}.weight"] = tensor  # BlockFFN writes mlp.up_proj / mlp.down_proj without ".weight"
        else:
            state[name] = tensor
        state_origin.update({new: path for new in set(state) - before})
    return state, state_origin


# Norms that scale by (1 + weight) in Qwen3.5 (Qwen3_5RMSNorm); the gated norm inside linear_attn does not.
ZERO_CENTERED_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                       "self_attn.k_norm.weight")
FINAL_NORM = "model.norm.weight"
# Tensors of a Qwen3.5 folder that the text model does not use (transformers ignores them too):
# the multi-token-prediction head.
TEXT_IGNORED_PREFIXES = ("mtp.",)


def zero_centered(name: str, config: ModelConfig) -> bool:
    return config.zero_centered_norms and (name == FINAL_NORM or name.endswith(ZERO_CENTERED_NORMS))


def _text_model_name(name: str, config: ModelConfig) -> str | None:
    """The canonical name of a text-model tensor, or None for one the text model does not use
    (a VL folder's vision tower and merger, Qwen3.5's MTP head)."""
    if name.startswith(LM_HEAD.removesuffix("weight")):
        return name
    if config.family == "qwen3_5" and name.startswith(TEXT_IGNORED_PREFIXES):
        return None
    if config.weight_prefix == "model.":
        return name
    return "model." + name.removeprefix(config.weight_prefix) if name.startswith(config.weight_prefix) else None


def _split_rows(tensor: torch.Tensor, sizes: list[int], name: str, path: Path) -> tuple[torch.Tensor, ...]:
    if tensor.dim() not in (1, 2) or tensor.shape[0] != sum(sizes):
        raise InputError(path, f"fused tensor '{name}' has shape {tuple(tensor.shape)}, expected {sum(sizes)} rows")
    return tuple(tensor.split(sizes, dim=0))


def _names(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


def validate_state(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Size], config: ModelConfig, files: CheckpointFiles,
    origin: dict[str, Path],
) -> bool:
    """Checks names, shapes, dtypes and finiteness; returns whether the head is tied to the embedding."""
    where = files.index or (files.weights[0] if len(files.weights) == 1 else files.folder)
    tied = LM_HEAD not in state
    if tied and not config.tie_word_embeddings:
        raise InputError(where, f"missing tensor '{LM_HEAD}' (config.json sets tie_word_embeddings=false)")
    missing = [n for n in expected if n not in state and not (tied and n == LM_HEAD)]
    if missing:
        raise InputError(where, f"missing {len(missing)} tensor(s): {_names(missing)}")
    unexpected = [n for n in state if n not in expected]
    if unexpected:
        raise InputError(where, f"{len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
    for name, tensor in state.items():
        path = origin.get(name, where)
        if tensor.shape != expected[name]:
            raise InputError(
                path, f"tensor '{name}' has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name])}"
            )
        if tensor.dtype not in FLOAT_DTYPES:
            raise InputError(path, f"tensor '{name}' has dtype {tensor.dtype}, expected bf16, fp16 or fp32")
        if not torch.isfinite(tensor).all():
            raise InputError(path, f"tensor '{name}' holds NaN or Inf values")
    return tied


def load_checkpoint(path: str | Path) -> Checkpoint:
    files = find_files(path)
    config = ModelConfig.from_file(files.config)
    raw, origin = read_all_tensors(files)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in raw.values()})
    expected = expected_shapes(config)
    grid = None
    if is_gptq(config):
        raw, origin, grid = read_gptq(raw, origin, config, files.config, set(expected))
    state, origin = canonical_state(raw, origin, config, expected)
    tied = validate_state(state, expected, config, files, origin)
    if grid is None:
        grid = _float_grid(state, config)
    else:
        _check_grid_names(grid, expected, files)
    if grid is not None:
        config = replace(config, weight_grid=grid)
    return Checkpoint(files=files, config=config, state=state, tied=tied, dtypes_on_disk=dtypes)


def _linear_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The body's linear weights (module names): every 2-d weight but the embedding and the head."""
    return [name for name, tensor in state.items() if tensor.dim() == 2 and name not in (EMBED, LM_HEAD)]


def _float_grid(state: dict[str, torch.Tensor], config: ModelConfig):
    """A grid the float linears already lie on (QAT / BitCPM checkpoints); their weights in `state`
    become the grid's exact values (they differ by the storage dtype's rounding)."""
    names = _linear_names(state)
    dtypes = {state[name].dtype for name in names}
    if len(dtypes) != 1:
        return None
    grid = detect_grid({_module_name(name): state[name] for name in names}, dtypes.pop())
    if grid is not None:
        for name in names:
            state[name] = grid.linears[_module_name(name)].dequantize()
    return grid


def _check_grid_names(grid, expected: dict[str, torch.Size], files: CheckpointFiles) -> None:
    unknown = [name for name in grid.linears if _hf_name(name) not in expected]
    if unknown:
        raise InputError(files.index or files.folder, f"GPTQ linears the model does not have: {_names(unknown)}")


def build_model(checkpoint: Checkpoint, max_seq_len: int = 512, dtype: torch.dtype = torch.float32) -> CausalLM:
    """CausalLM holding the checkpoint's weights (cast to dtype), in eval mode, caches empty."""
    with torch.device("meta"):
        model = CausalLM(checkpoint.config, max_seq_len=max_seq_len, dtype=dtype)
    weights = {
        _module_name(name): tensor.to(dtype) for name, tensor in checkpoint.state.items() if name != LM_HEAD or not checkpoint.tied
    }
    result = model.load_state_dict(weights, strict=False, assign=True)
    leftover = [k for k in result.missing_keys if not (checkpoint.tied and k == LM_HEAD)]
    if leftover or result.unexpected_keys:  # validate_state already ruled this out
        raise AssertionError(f"state/module mismatch: {leftover} {result.unexpected_keys}")
    if checkpoint.tied:
        model.tie_embeddings()
    model.init_buffers()
    model.requires_grad_(False)
    return model.eval()


def load_model(path: str | Path, max_seq_len: int = 512, dtype: torch.dtype = torch.float32) -> tuple[CausalLM, Checkpoint]:
    checkpoint = load_checkpoint(path)
    return build_model(checkpoint, max_seq_len=max_seq_len, dtype=dtype), checkpoint


def checkpoint_state(model: CausalLM) -> dict[str, torch.Tensor]:
    """The module's weights named as the real checkpoints name them on disk (inverse of loading).

    Tied heads are left out (as MiniCPM writes them); BlockFFN expert matrices lose ".weight".
    """
    state = {}
    for name, tensor in model.state_dict().items():
        hf_name = _hf_name(name)
        if hf_name == LM_HEAD and model.tied:
            continue
        tensor = tensor.detach().clone()
        if zero_centered(hf_name, model.config):
            tensor = tensor - 1.0
        state[disk_name(hf_name, model.config)] = tensor
    return state

def disk_name(name: str, config: ModelConfig) -> str:
    """The name a real checkpoint of this family uses for a canonical tensor name."""
    if config.weight_prefix != "model." and name.startswith("model."):
        return config.weight_prefix + name.removeprefix("model.")
    if config.ffn != "blockffn":
        return name
    # Released BlockFFN checkpoints store the expert matrices without the ".weight" suffix.
    for bare in ("mlp.up_proj", "mlp.down_proj"):
        if name.endswith(f"{bare}.weight"):
            return name.removesuffix(".weight")
    return name
