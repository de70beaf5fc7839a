"""A vision-language model -> one model.pte with the three methods ExecuTorch's MultimodalRunner runs.

    vision_encoder(image float32[1, 3, H, W]) -> embeddings float32[1, N, hidden]
    token_embedding(tokens int64[1, T])        -> embeddings float32[1, T, hidden]
    text_decoder(embeddings [1, T, hidden], input_pos int64[1]) -> logits float32[1, T, vocab]

The runner feeds each input of a prompt in order (text as tokens, each image slice as an image)
through its encoder and then text_decoder at the running position, so MiniCPM-V's placeholder
layout is a list of inputs: tokens up to and including <image>, the overview, tokens
</image><slice>, the first slice, ... The image is the slice as the bundle's preprocessing
gives it (normalised, sides multiples of `side_multiple`). H and W are dynamic within
[side_multiple, max_side]; ExecuTorch plans memory for the bound.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim, ExportedProgram

from cpm_mobile.exporter.models.grid import WeightGrid
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.models.vision_grid import gridded
from cpm_mobile.exporter.models.vision import SelfAttention, VisionEncoder
from cpm_mobile.exporter.models.vlm import TextDecoder, TokenEmbedding
from cpm_mobile.exporter.contract import (
    DECODER_METHOD, EMBEDDING_METHOD, VISION_MAX_SIDE, VISION_METHOD, VISION_SIDE_MULTIPLE,
)
from cpm_mobile.exporter.targets.base import ExportContext, check_model_dtype
from cpm_mobile.exporter.targets.executorch.spec import ExecuTorchSpec
from cpm_mobile.exporter.targets.executorch.program import (
    ATTENTION_CUSTOM, PTE_NAME, cache_description, constant_methods, emit, export_ready, write_program,
)



def _export(module: torch.nn.Module, args: tuple, dynamic: Any) -> ExportedProgram:
    with torch.no_grad(), torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        return torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)


@contextmanager
def vision_attention(vision: VisionEncoder, kernel: str) -> Iterator[VisionEncoder]:
    """The encoder with its attention through `kernel` while the program is captured (models/vision.py)."""
    layers = [m for m in vision.modules() if isinstance(m, SelfAttention)]
    before = [m.kernel for m in layers]
    for layer in layers:
        layer.kernel = kernel
    try:
        yield vision
    finally:
        for layer, kernel_before in zip(layers, before):
            layer.kernel = kernel_before


def capture_vision(vision: VisionEncoder, max_side: int) -> ExportedProgram:
    example, dims, _ = vision.slice_shapes(max_side)
    return _export(vision, (example,), (dims,))


def capture_text(model: CausalLM) -> tuple[ExportedProgram, ExportedProgram]:
    seq = Dim("T", min=1, max=model.max_seq_len)
    tokens = torch.zeros(1, min(2, model.max_seq_len), dtype=torch.int64)
    embedding = _export(TokenEmbedding(model), (tokens,), ({1: seq},))
    embeddings = torch.zeros(1, tokens.shape[1], model.config.hidden_size)
    decoder = _export(TextDecoder(model), (embeddings, torch.zeros(1, dtype=torch.int64)), ({1: seq}, None))
    return embedding, decoder


def weight_only_vision(vision: VisionEncoder, grid: WeightGrid) -> VisionEncoder:
    """The encoder with its gridded linears as our weight-only kernel's modules (linear_q8x4: the grid's int8
    codes and fp16 scales exactly, fp32 activations), so the program computes the grid's twin exactly."""
    from cpm_mobile.exporter.targets.executorch.quant import grid_weight_only

    return gridded(vision, grid, grid_weight_only)


def export_multimodal(model: CausalLM, vision: VisionEncoder, out_dir: Path, spec: ExecuTorchSpec,
                      context: ExportContext, max_side: int, vision_grid: WeightGrid | None = None) -> dict[str, Any]:
    """Write out_dir/model.pte; returns its manifest entry (io: text_decoder's contract). `model` is the text
    model as the program stores it (the target's quantised variant when the recipe quantises); `vision_grid`:
    the vision encoder's 8-bit grid (models/vision_grid.py), carried by our weight-only kernel."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    check_model_dtype(model, "executorch")
    attention = spec.options.attention
    step = vision.config.side_multiple(vision.mode)
    methods = {**constant_methods(model, context, attention),
               VISION_SIDE_MULTIPLE: step, VISION_MAX_SIDE: vision.slice_shapes(max_side)[2]}
    text = export_ready(model, attention)
    embedding, decoder = capture_text(text)
    stored_vision = vision if vision_grid is None else weight_only_vision(vision, vision_grid)
    with vision_attention(stored_vision, "custom_sdpa" if attention == ATTENTION_CUSTOM else "sdpa"):
        encoder = capture_vision(stored_vision, max_side)
    programs = {VISION_METHOD: encoder, EMBEDDING_METHOD: embedding, DECODER_METHOD: decoder}
    edge = to_edge_transform_and_lower(
        programs,
        partitioner={name: [XnnpackPartitioner()] for name in programs},
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
        constant_methods=methods,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    size = write_program(emit(edge), out_dir / PTE_NAME)
    config = model.config
    return {
        "target": "executorch", "files": [PTE_NAME], "entry": PTE_NAME,
        "io": {
            "method": DECODER_METHOD,
            "inputs": [{"name": "embeddings", "dtype": "float32", "shape": [1, "T", config.hidden_size]},
                       {"name": "input_pos", "dtype": "int64", "shape": [1], "meaning": "position of row 0"}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "T", config.vocab_size]}],
            "cache": cache_description(model, attention),
            "max_seq_len": model.max_seq_len,
            "dynamic_dims": {"T": {"min": 1, "max": model.max_seq_len}},
            "constraint": "input_pos + T <= max_seq_len",
        },
        "metadata": {
            "methods": [VISION_METHOD, EMBEDDING_METHOD, DECODER_METHOD],
            "vision_input": {"shape": [1, vision.config.num_channels, "H", "W"], "dtype": "float32",
                             "side_multiple": step, "max_side": methods[VISION_MAX_SIDE]},
            "backend": spec.options.backend, "attention": attention, "precision": spec.precision,
            "quantization": spec.quantization.model_dump() if spec.quantization is not None else None,
            "vision_quantization": None if vision_grid is None else vision_grid.describe(),
            "constant_methods": methods, "size_bytes": size,
        },
    }
