"""bench.ggml against llama-quantize itself, tensor by tensor, byte for byte.

python -m bench.ggml_parity --model exporter/embedded/minicpm-tiny
python -m bench.ggml_parity --preset minicpm4-0.5b --layers 2      # hidden 1024: the Q6_K output path
python -m bench.ggml_parity --write-q6k-fixture tests/data/q6_k_llamacpp.npz

Converts the checkpoint to GGUF F32 with llama.cpp's converter, quantises it to Q8_0 and Q4_0 (default
and --pure), and for every tensor checks (1) that llama-quantize chose the type tensor_types() says
and (2) that quantising the F32 GGUF's own tensor in torch gives exactly llama-quantize's bytes.
Prints one JSON line per file and exits 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench import llamacpp
from cpm_mobile.exporter.models import load_model
from bench.synthetic import write_synthetic_checkpoint
from bench import ggml

_GGUF_TO_OURS = {"token_embd": "embed_tokens", "output": "lm_head", "attn_q": "self_attn.q_proj",
                 "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def our_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{_GGUF_TO_OURS[parts[2]]}.weight"
    return f"{_GGUF_TO_OURS[parts[0]]}.weight"


def compare(f32: Path, quantized: Path, expected: dict[str, str]) -> dict:
    from gguf import GGUFReader

    source = {t.name: t for t in GGUFReader(f32).tensors}
    checked, type_mismatch, byte_mismatch = 0, [], []
    for tensor in GGUFReader(quantized).tensors:
        kind = tensor.tensor_type.name
        if len(tensor.shape) < 2:
            continue  # norms and rope factors: never quantised
        want = expected[our_name(tensor.name)]
        if kind != want:
            type_mismatch.append(f"{tensor.name}: llama-quantize {kind}, tensor_types {want}")
            continue
        weight = torch.from_numpy(np.array(source[tensor.name].data, dtype=np.float32))
        stored = np.array(tensor.data)
        if kind in ggml.QUANTIZERS:
            mine = ggml.gguf_blocks(ggml.QUANTIZERS[kind](weight))
            same = np.array_equal(mine, stored.reshape(mine.shape))
        else:
            same = np.array_equal(ggml.round_like_ggml(weight, kind).numpy(), stored.astype(np.float32))
        checked += 1
        if not same:
            byte_mismatch.append(tensor.name)
    return {"checked": checked, "types": sorted({t.tensor_type.name for t in GGUFReader(quantized).tensors}),
            "type_mismatch": type_mismatch, "byte_mismatch": byte_mismatch}


def parity(checkpoint: Path, folder: Path, llama: llamacpp.LlamaCpp) -> list[dict]:
    model = load_model(checkpoint, max_seq_len=16)[0]
    f32 = llamacpp.convert(llama, checkpoint, folder / "F32.gguf")
    results = []
    for ftype in ggml.FTYPES:
        for pure in (False, True):
            out = llamacpp.quantize(llama, f32, folder / f"{ftype}{'-pure' * pure}.gguf", ftype, pure=pure)
            result = compare(f32, out, ggml.tensor_types(model, ftype, pure))
            results.append({"model": checkpoint.name, "ftype": ftype, "pure": pure, **result})
    return results


def write_q6k_fixture(path: Path, folder: Path, llama: llamacpp.LlamaCpp, rows: int = 96) -> None:
    """A tied embedding with 256-wide rows, which llama-quantize Q4_0 stores as Q6_K: its first rows
    are made hard (zeros, sign ties, near-empty sub-blocks, huge and tiny values), then the F32 rows
    and llama-quantize's Q6_K blocks of the first `rows` rows are saved."""
    from gguf import GGUFReader

    from bench.presets import preset_config
    from bench.synthetic import random_state, write_checkpoint

    config = preset_config("minicpm4-0.5b", num_hidden_layers=1, hidden_size=256, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=256, vocab_size=4096)
    state = random_state(config, seed=3)
    embedding = state["model.embed_tokens.weight"]
    generator = torch.Generator().manual_seed(11)
    embedding[0] = 0
    embedding[1, ::16], embedding[1, 8::16] = 0.25, -0.25
    embedding[2, :128] = 0
    embedding[3] *= 1e4
    embedding[4] *= 1e-20
    embedding[5] = torch.randint(-40, 40, (256,), generator=generator).float() / 8
    embedding[6, 17] = 3.0
    embedding[7, :240] = 1e-3 * torch.randn(240, generator=generator)
    checkpoint = write_checkpoint(folder / "q6k", config, state, dtype="float32")
    f32 = llamacpp.convert(llama, checkpoint, folder / "q6k-F32.gguf")
    out = llamacpp.quantize(llama, f32, folder / "q6k-Q4_0.gguf", "Q4_0")
    tensor = next(t for t in GGUFReader(out).tensors if t.name == "token_embd.weight")
    if tensor.tensor_type.name != "Q6_K":
        sys.exit(f"expected llama-quantize to store token_embd.weight as Q6_K, got {tensor.tensor_type.name}")
    blocks_per_row = 256 // ggml.SUPER_BLOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, weight=embedding[:rows].numpy().astype(np.float32),
                        blocks=np.array(tensor.data)[: rows * blocks_per_row].reshape(rows * blocks_per_row, -1))
    print(f"wrote {path} ({rows} rows, llama.cpp {llama.commit})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", default=[])
    parser.add_argument("--preset", action="append", default=[])
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--write-q6k-fixture", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    llama = llamacpp.find_or_build()
    failed = False
    with tempfile.TemporaryDirectory(prefix="cpm-ggml-parity-") as temp:
        folder = Path(temp)
        if args.write_q6k_fixture:
            write_q6k_fixture(args.write_q6k_fixture, folder, llama)
        checkpoints = list(args.model)
        for preset in args.preset:
            overrides = {"num_hidden_layers": args.layers} if args.layers else {}
            checkpoints.append(write_synthetic_checkpoint(folder / preset, preset, dtype="float32", **overrides))
        for checkpoint in checkpoints:
            work = folder / f"work-{checkpoint.name}"
            work.mkdir()
            for result in parity(checkpoint, work, llama):
                print(json.dumps(result))
                failed |= bool(result["type_mismatch"] or result["byte_mismatch"])
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
