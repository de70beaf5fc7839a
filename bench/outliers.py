"""A checkpoint with the activation outliers of trained LLMs that computes what the given one computes.

    python -m bench.outliers --model exporter/embedded/minicpm-tiny --out DIR

Trained LLMs carry a few hidden channels whose normed activations are tens of times the others' (large norm
gains; "massive activations") and FFN channels with outsized up-projections. Small models trained here have
none, so 4-bit rounding looks easier on them than on a real checkpoint (a real 135M model loses +60 % perplexity
under llama.cpp's Q4_0). This writes a copy of a MiniCPM / Llama-layout checkpoint in the same layout where, in
every layer, 4 hidden channels' input and post-attention norm gains are x 32 and the columns of the linears that
read them / 32, and 8 FFN channels' up_proj rows are x 32 and down_proj's columns / 32. A power of two: exact in
bf16, so the copy computes exactly the same function, with the outliers' structure for the quantisers to meet.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GAIN = 32.0
HIDDEN_CHANNELS = 4
FFN_CHANNELS = 8
_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


def with_outliers(tensors: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (HF names, GQA attention and a gated MLP) with the outlier channels planted."""
    generator = torch.Generator().manual_seed(seed)
    out = {name: tensor.clone() for name, tensor in tensors.items()}
    layers = sorted({int(name.split(".")[2]) for name in out if name.startswith("model.layers.")})
    hidden = out["model.layers.0.input_layernorm.weight"].numel()
    channels = torch.randperm(hidden, generator=generator)[:HIDDEN_CHANNELS]
    for index in layers:
        prefix = f"model.layers.{index}."
        for norm, readers in _READERS.items():
            missing = [r for r in readers if prefix + r + ".weight" not in out]
            if missing:
                raise ValueError(f"{prefix}{missing[0]}.weight: not a GQA attention / gated MLP layer")
            out[prefix + norm + ".weight"][channels] *= GAIN
            for reader in readers:
                out[prefix + reader + ".weight"][:, channels] /= GAIN
        up, down = prefix + "mlp.up_proj.weight", prefix + "mlp.down_proj.weight"
        inner = torch.randperm(out[up].shape[0], generator=generator)[:FFN_CHANNELS]
        out[up][inner] *= GAIN
        out[down][:, inner] /= GAIN
    return out


def write_outlier_checkpoint(model: Path, out: Path) -> Path:
    weights = model / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{weights}: one model.safetensors expected")
    shutil.copytree(model, out, dirs_exist_ok=True)
    save_file(with_outliers(load_file(str(weights))), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(write_outlier_checkpoint(args.model, args.out))


if __name__ == "__main__":
    main()
