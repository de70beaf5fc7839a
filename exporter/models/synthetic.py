"""Write random-weight checkpoints in the real checkpoints' on-disk layouts, for tests and benchmarks."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from exporter.models.config import ModelConfig
from exporter.models.loader import LM_HEAD, expected_shapes
from exporter.models.presets import preset_config

# MiniCPM5-1B as released: a plain LlamaForCausalLM (model_type llama, 24 layers, GQA 16/2, 131,072
# positions). hidden 1536, head_dim 128, intermediate 4608 and an untied 130,560-token vocab are
# derived from the published counts (1,080,632,832 parameters, 679,552,512 non-embedding), not
# read from the real config.json.
MINICPM5_1B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 1536,
    "head_dim": 128,
    "intermediate_size": 4608,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 130560,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def llama_config(**overrides: Any) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM checkpoint (MiniCPM5-1B's shape unless overridden)."""
    return {**MINICPM5_1B, **overrides}


Layout = Literal["safetensors", "sharded-safetensors", "bin", "sharded-bin", "hub-cache"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def random_state(config_dict: dict[str, Any], seed: int = 0, fused: bool = False) -> dict[str, torch.Tensor]:
    """Random fp32 weights named as the real checkpoints name them.

    Linear weights ~ N(0, 1/fan_in) so activations keep their scale through depth; norm weights
    around 1 (not exactly 1, so a missing norm shows up in parity tests).
    """
    config = ModelConfig.from_hf_dict(config_dict)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    tied = config_dict.get("tie_word_embeddings", True)
    for name, shape in expected_shapes(config).items():
        if name == LM_HEAD and tied:
            continue
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name == "model.embed_tokens.weight":
            tensor = torch.randn(shape, generator=generator) / config.scale_emb
        else:
            tensor = torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
        state[name] = tensor
    state = {disk_name(n, config): t for n, t in state.items()}
    if fused and config.attention == "gqa":
        state = _fuse(state, config)
    return state


def disk_name(name: str, config: ModelConfig) -> str:
    """The name a real checkpoint of this family uses for a canonical tensor name."""
    if config.ffn != "blockffn":
        return name
    # Released BlockFFN checkpoints store the expert matrices without the ".weight" suffix.
    for bare in ("mlp.up_proj", "mlp.down_proj"):
        if name.endswith(f"{bare}.weight"):
            return name.removesuffix(".weight")
    return name


def _fuse(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    fused: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("self_attn.q_proj.weight"):
            prefix = name.removesuffix("q_proj.weight")
            fused[f"{prefix}qkv_proj.weight"] = torch.cat([state[f"{prefix}{p}_proj.weight"] for p in "qkv"])
        elif name.endswith("mlp.gate_proj.weight") and config.ffn == "gated":
            prefix = name.removesuffix("gate_proj.weight")
            fused[f"{prefix}gate_up_proj.weight"] = torch.cat([tensor, state[f"{prefix}up_proj.weight"]])
        elif not name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")) or (
            name.endswith("mlp.up_proj.weight") and config.ffn != "gated"
        ):
            fused[name] = tensor
    return fused


def write_checkpoint(
    folder: str | Path,
    config_dict: dict[str, Any],
    state: dict[str, torch.Tensor],
    dtype: str = "bfloat16",
    layout: Layout = "safetensors",
    shards: int = 2,
) -> Path:
    """Write config.json and weights in one of the real layouts; returns the folder to load from."""
    folder = Path(folder)
    if layout == "hub-cache":
        return _write_hub_cache(folder, config_dict, state, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    config_dict = {**config_dict, "torch_dtype": dtype}
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    state = {name: tensor.to(DTYPES[dtype]).contiguous() for name, tensor in state.items()}
    if layout == "safetensors":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif layout in ("sharded-safetensors", "sharded-bin"):
        _write_shards(folder, state, shards, safetensors=layout == "sharded-safetensors")
    else:
        raise ValueError(f"unknown layout '{layout}'")
    return folder


def _write_shards(folder: Path, state: dict[str, torch.Tensor], shards: int, safetensors: bool) -> None:
    names = list(state)
    per_shard = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    for index in range(shards):
        chunk = {n: state[n] for n in names[index * per_shard : (index + 1) * per_shard]}
        if safetensors:
            file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            save_file(chunk, str(folder / file_name), metadata={"format": "pt"})
        else:
            file_name = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
            torch.save(chunk, folder / file_name)
        weight_map.update({n: file_name for n in chunk})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index_name = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _write_hub_cache(root: Path, config_dict: dict[str, Any], state: dict[str, torch.Tensor], dtype: str) -> Path:
    """models--org--name/{blobs,refs/main,snapshots/<rev>/ -> ../../blobs/<hash>} as huggingface_hub lays it out."""
    import hashlib

    staging = root / ".staging"
    write_checkpoint(staging, config_dict, state, dtype=dtype, layout="safetensors")
    revision = "0123456789abcdef0123456789abcdef01234567"
    blobs, snapshot = root / "blobs", root / "snapshots" / revision
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    for file in staging.iterdir():
        blob_name = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.move(str(file), blobs / blob_name)
        os.symlink(Path("..") / ".." / "blobs" / blob_name, snapshot / file.name)
    staging.rmdir()
    return root


def write_synthetic_checkpoint(
    folder: str | Path,
    preset: str | dict[str, Any],
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    layout: Layout = "safetensors",
    fused: bool = False,
    **overrides: Any,
) -> Path:
    """A random checkpoint of a named preset (e.g. 'minicpm4-0.5b', 'blockffn-small') or a config dict."""
    config_dict = preset_config(preset, **overrides) if isinstance(preset, str) else {**preset, **overrides}
    return write_checkpoint(folder, config_dict, random_state(config_dict, seed, fused), dtype=dtype, layout=layout)


def write_trained_like_checkpoint(
    folder: str | Path, preset: str, *, logit_max: float = 30.0, seed: int = 0, **overrides: Any
) -> Path:
    """A random checkpoint of a preset's depth with logits as large as a trained model's.

    Random weights give logits of |x| ~ 1-3, where trained LMs reach 20-40 at real depth; fp32
    rounding noise in the logits scales with that magnitude, so bounds measured on random-scale
    logits would be too lax. The lm_head (untied) is scaled so max |logit| on a short prompt is
    `logit_max`; the rest of the stack keeps the preset's depth and scalings.
    """
    from exporter.models.loader import build_model, load_checkpoint

    config_dict = preset_config(preset, **{"tie_word_embeddings": False, **overrides})
    state = random_state(config_dict, seed)
    path = write_checkpoint(folder, config_dict, state, dtype="float32")
    model = build_model(load_checkpoint(path), max_seq_len=16)
    generator = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, model.config.vocab_size, (1, 16), generator=generator)
    with torch.no_grad():
        current = float(model(tokens, torch.tensor([0])).abs().max())
    state[disk_name(LM_HEAD, model.config)] = state[disk_name(LM_HEAD, model.config)] * (logit_max / current)
    return write_checkpoint(folder, config_dict, state, dtype="float32")
