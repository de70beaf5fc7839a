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

from cpm_mobile.exporter.models.config import ModelConfig
from cpm_mobile.exporter.models.loader import LM_HEAD, disk_name, expected_shapes, zero_centered
from bench.presets import preset_config

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
            # Zero-centred norms (Qwen3.5) store w and scale by 1 + w.
            offset = 0.0 if zero_centered(name, config) else 1.0
            tensor = offset + 0.1 * torch.randn(shape, generator=generator)
        elif name == "model.embed_tokens.weight":
            tensor = torch.randn(shape, generator=generator) / config.scale_emb
        else:
            tensor = torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
        state[name] = tensor
    state = {disk_name(n, config): t for n, t in state.items()}
    if fused and config.attention == "gqa":
        state = _fuse(state, config)
    return state



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
    from cpm_mobile.exporter.models.loader import build_model, load_checkpoint

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


# -- quantised layouts: GPTQ packed int codes, and float weights that lie on a grid ----------------

GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def _body_linears(state: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, t in state.items() if t.dim() == 2 and n not in ("model.embed_tokens.weight", LM_HEAD)]


def gptq_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool, g_idx: torch.Tensor):
    """AutoGPTQ's round-to-nearest grid of one [out, in] weight: (codes [in, out], zeros [groups, out],
    fp16 scales [groups, out]); sym puts every zero at 2**(bits-1), as AutoGPTQ does."""
    maxq = (1 << bits) - 1
    out_features, in_features = weight.shape
    groups = in_features // group_size
    by_group = [weight[:, g_idx == g] for g in range(groups)]
    low = torch.stack([b.amin(1).clamp(max=0) for b in by_group])  # [groups, out]
    high = torch.stack([b.amax(1).clamp(min=0) for b in by_group])
    if sym:
        high = torch.maximum(low.abs(), high)
        low = -high
    scale = ((high - low) / maxq).clamp(min=1e-8).to(torch.float16).to(torch.float32)
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-low / scale)
    codes = torch.clamp(torch.round(weight.T / scale[g_idx]) + zero[g_idx], 0, maxq)
    return codes.to(torch.int64), zero.to(torch.int64), scale.to(torch.float16)


def _pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """32 / bits values per int32 along `dim`, the first in the lowest bits (two's complement wrap)."""
    per_word = 32 // bits
    values = values.movedim(dim, 0)
    values = values.reshape(values.shape[0] // per_word, per_word, *values.shape[1:])
    packed = torch.zeros(values.shape[0], *values.shape[2:], dtype=torch.int64)
    for j in range(per_word):
        packed |= (values[:, j] & ((1 << bits) - 1)) << (bits * j)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)
    return packed.to(torch.int32).movedim(0, dim).contiguous()


def write_gptq_checkpoint(
    folder: str | Path, config_dict: dict[str, Any], *, seed: int = 0, bits: int = 4, group_size: int = 128,
    sym: bool = True, desc_act: bool = False, checkpoint_format: str = "gptq",
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A GPTQ-format checkpoint as AutoGPTQ / GPTQModel write it (see exporter/models/gptq.py): every
    body linear as qweight / qzeros / scales / g_idx, everything else fp16, config.json carrying
    quantization_config. desc_act permutes g_idx (act-order); "gptq" stores zeros minus one."""
    state = dict(state if state is not None else random_state(config_dict, seed))
    generator = torch.Generator().manual_seed(seed + 7)
    packed: dict[str, torch.Tensor] = {}
    for name in _body_linears(state):
        weight = state.pop(name).to(torch.float32)
        in_features = weight.shape[1]
        group = in_features if group_size == -1 else group_size
        order = torch.randperm(in_features, generator=generator) if desc_act else torch.arange(in_features)
        g_idx = torch.empty(in_features, dtype=torch.int64)
        g_idx[order] = torch.arange(in_features) // group
        codes, zeros, scales = gptq_quantize(weight, bits, group, sym, g_idx)
        stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
        prefix = name.removesuffix(".weight")
        packed[f"{prefix}.qweight"] = _pack_int32(codes, bits, 0)
        packed[f"{prefix}.qzeros"] = _pack_int32(stored_zeros, bits, 1)
        packed[f"{prefix}.scales"] = scales
        packed[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
    quant = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
             "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": checkpoint_format}
    path = write_checkpoint(folder, {**config_dict, "quantization_config": quant}, state, dtype="float16")
    floats = {name: tensor.to(torch.float16).contiguous() for name, tensor in state.items()}
    save_file({**floats, **packed}, str(Path(path) / "model.safetensors"), metadata={"format": "pt"})
    return path


def grid_state(state: dict[str, torch.Tensor], kind: Literal["int4", "int4-affine", "ternary"],
               group_size: int | None, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The weights a QAT run leaves on its grid (fake-quantised, fp32 scales): every body linear
    replaced by scale * code per group of input columns (None = per output channel).
    int4: symmetric, scale = max |W| / 7; int4-affine: 16 levels from min to max with an integer
    zero point; ternary: BitCPM / BitNet b1.58 absmean, codes clip(round(W / s), -1, 1). Scales are
    rounded to scale_dtype (a run that keeps them in bf16)."""
    result = dict(state)
    for name in _body_linears(state):
        weight = state[name].to(torch.float32)
        rows, columns = weight.shape
        size = group_size or columns
        blocks = weight.reshape(rows, columns // size, size)
        if kind == "ternary":
            scale = blocks.abs().mean(-1, keepdim=True).to(scale_dtype).float()
            snapped = scale * torch.clamp(torch.round(blocks / scale), -1, 1)
        elif kind == "int4":
            scale = (blocks.abs().amax(-1, keepdim=True) / 7).to(scale_dtype).float()
            snapped = scale * torch.clamp(torch.round(blocks / scale), -8, 7)
        else:
            low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
            scale = ((high - low) / 15).to(scale_dtype).float()
            zero = torch.round(-low / scale)
            snapped = scale * (torch.clamp(torch.round(blocks / scale) + zero, 0, 15) - zero)
        result[name] = snapped.reshape(rows, columns)
    return result


def write_grid_checkpoint(
    folder: str | Path, config_dict: dict[str, Any], kind: Literal["int4", "int4-affine", "ternary"] = "int4", *,
    group_size: int | None = 128, seed: int = 0, dtype: str = "bfloat16", scale_dtype: torch.dtype = torch.float32,
) -> Path:
    """A fake-quantised checkpoint (MiniCPM4-0.5B-QAT-Int4-unquantized, BitCPM4): float weights, stored
    in `dtype`, whose body linears lie on a grid (see grid_state)."""
    return write_checkpoint(folder, config_dict, grid_state(random_state(config_dict, seed), kind, group_size,
                                                            scale_dtype), dtype=dtype)
