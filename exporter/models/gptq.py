"""Read GPTQ-format checkpoints: packed int codes -> the dequantised float weights and their grid.

The layout is AutoGPTQ's, which transformers' / optimum's GPTQ integration and GPTQModel read and
write (OpenBMB's MiniCPM4-0.5B-QAT-Int4-GPTQ-format uses it). Per quantised linear `<prefix>`:
  qweight int32 [in * bits / 32, out]   32 / bits codes per int32 along the input dim, the first in
                                         the lowest bits
  qzeros  int32 [groups, out * bits / 32] zero points packed the same way along the output dim;
                                         checkpoint_format "gptq" (v1, the default) stores zero - 1,
                                         "gptq_v2" the zero itself
  scales  fp16  [groups, out]
  g_idx   int32 [in]                     the group of each input (arange(in) // group_size unless
                                         desc_act reordered them)
  bias    (optional) [out]
weight[o, i] = scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o]). Everything else (embeddings,
lm_head unless quantised too, norms) is stored as floats. Written here rather than imported: the
packing is a few bit shifts, and the libraries that hold it (auto-gptq, gptqmodel, optimum) need
CUDA builds or pull in their own model classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.config import ModelConfig
from cpm_mobile.exporter.models.grid import LinearGrid, WeightGrid

PACKED = ("qweight", "qzeros", "scales", "g_idx")
BITS = (2, 4, 8)  # whole codes per int32; 3-bit GPTQ packs codes across int32 boundaries
FORMATS = ("gptq", "gptq_v2")
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_gptq(config: ModelConfig) -> bool:
    quant = config.quantization_config or {}
    return str(quant.get("quant_method", "")).lower() == "gptq"


def _settings(config: ModelConfig, where: Path) -> dict[str, Any]:
    quant = dict(config.quantization_config or {})
    bits = quant.get("bits")
    if bits not in BITS:
        raise InputError(where, f"quantization_config.bits is {bits!r}; GPTQ checkpoints of {BITS} bits are read "
                                f"(3-bit codes straddle int32 words)")
    group = quant.get("group_size", 128)
    if not isinstance(group, int) or isinstance(group, bool) or (group <= 0 and group != -1):
        raise InputError(where, f"quantization_config.group_size is {group!r}; expected a positive integer or -1")
    checkpoint_format = quant.get("checkpoint_format", "gptq")
    if checkpoint_format not in FORMATS:
        raise InputError(where, f"quantization_config.checkpoint_format is {checkpoint_format!r}; expected one of "
                                f"{', '.join(FORMATS)}")
    for key in ("desc_act", "sym"):
        if not isinstance(quant.get(key, False), bool):
            raise InputError(where, f"quantization_config.{key} must be true or false, got {quant[key]!r}")
    return {"bits": bits, "group_size": group, "desc_act": quant.get("desc_act", False),
            "v1_zeros": checkpoint_format == "gptq"}


def read_gptq(raw: dict[str, torch.Tensor], origin: dict[str, Path], config: ModelConfig, where: Path,
              expected: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, Path], WeightGrid]:
    """The raw tensors with every packed linear replaced by its dequantised fp32 `<prefix>.weight`,
    their origins, and the grid of those linears keyed by CausalLM parameter name.

    AutoGPTQ saves an all-zero bias for linears that have none; those are dropped when the model
    (config.json) has no such bias."""
    settings = _settings(config, where)
    prefixes = sorted(name.removesuffix(".qweight") for name in raw if name.endswith(".qweight"))
    if not prefixes:
        raise InputError(where, "config.json says quant_method gptq but no tensor is named '<linear>.qweight'")
    tensors = dict(raw)
    origins = dict(origin)
    linears: dict[str, LinearGrid] = {}
    for prefix in prefixes:
        parts = {}
        for part in PACKED:
            name = f"{prefix}.{part}"
            if part == "g_idx" and name not in tensors:
                continue  # optional in older AutoGPTQ checkpoints: trivial order
            if name not in tensors:
                raise InputError(origin[f"{prefix}.qweight"], f"GPTQ linear '{prefix}' has qweight but no {part}")
            parts[part] = tensors.pop(name)
            origins.pop(name, None)
        path = origin[f"{prefix}.qweight"]
        weight, grid = _unpack(prefix, parts, settings, path)
        bias = f"{prefix}.bias"
        if bias in tensors and bias not in expected and not bool(tensors[bias].any()):
            del tensors[bias]
            origins.pop(bias, None)
        tensors[f"{prefix}.weight"] = weight
        origins[f"{prefix}.weight"] = path
        if prefix != "lm_head":  # a quantised head is dequantised; the grid covers the body's linears
            linears[prefix.removeprefix("model.") + ".weight"] = grid
    return tensors, origins, WeightGrid("gptq", linears)


def _unpack(prefix: str, parts: dict[str, torch.Tensor], settings: dict[str, Any],
            path: Path) -> tuple[torch.Tensor, LinearGrid]:
    bits = settings["bits"]
    per_word = 32 // bits
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    for part in ("qweight", "qzeros"):
        if parts[part].dtype != torch.int32 or parts[part].dim() != 2:
            raise InputError(path, f"'{prefix}.{part}' is {parts[part].dtype} {tuple(parts[part].shape)}; "
                                   f"GPTQ packs it as a 2-d int32 tensor")
    if scales.dtype not in SCALE_DTYPES or scales.dim() != 2:
        raise InputError(path, f"'{prefix}.scales' is {scales.dtype} {tuple(scales.shape)}; expected 2-d fp16")
    in_features, out_features = qweight.shape[0] * per_word, qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape[1] != out_features or qzeros.shape != (groups, out_features // per_word) \
            or out_features % per_word or in_features % groups:
        raise InputError(path, f"GPTQ linear '{prefix}': qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} "
                               f"and scales {tuple(scales.shape)} do not describe one {bits}-bit [in, out] weight")
    group = in_features // groups
    expected_group = in_features if settings["group_size"] == -1 else settings["group_size"]
    if group != expected_group:
        raise InputError(path, f"GPTQ linear '{prefix}' has {groups} groups over {in_features} inputs (groups of "
                               f"{group}), quantization_config.group_size says {settings['group_size']}")
    trivial = torch.arange(in_features, dtype=torch.int64) // group
    g_idx = parts.get("g_idx")
    if g_idx is None:
        g_idx = trivial
    elif g_idx.shape != (in_features,) or g_idx.dtype not in (torch.int32, torch.int64) \
            or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise InputError(path, f"'{prefix}.g_idx' must be {in_features} group indices in [0, {groups}), "
                               f"got {g_idx.dtype} {tuple(g_idx.shape)}")
    g_idx = g_idx.to(torch.int64)
    act_order = settings["desc_act"] or not torch.equal(g_idx, trivial)

    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    codes = ((qweight.unsqueeze(1) >> shifts[None, :, None]) & mask).reshape(in_features, out_features)
    zeros = ((qzeros.unsqueeze(2) >> shifts[None, None, :]) & mask).reshape(groups, out_features)
    if settings["v1_zeros"]:
        zeros = zeros + 1  # v1 stores zero - 1 (so a zero of 0 reads back as 2**bits)
    scale32 = scales.to(torch.float32)
    # Exact in fp32: an fp16 scale times an integer below 2**9 needs at most 20 significant bits.
    weight = (scale32[g_idx] * (codes.to(torch.float32) - zeros[g_idx].to(torch.float32))).T.contiguous()
    grid = LinearGrid(codes.T.contiguous().to(torch.uint8), scale32.T.contiguous(), zeros.T.contiguous().to(torch.uint8),
                      bits, group, scales.dtype, act_order)
    return weight, grid
