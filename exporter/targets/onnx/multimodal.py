"""A vision-language model -> onnxruntime-genai's multimodal layout: three graphs in one folder.

    vision.onnx     pixel_values float32[B, 3, H, W] -> image_features [B, N, hidden]  (one slice shape a call)
    embedding.onnx  input_ids int64[1, T]             -> inputs_embeds [1, T, hidden]
    model.onnx      inputs_embeds [1, T, hidden], attention_mask, position_ids, past -> logits, present
                    (the text model's past/present graph, target.py, from embeddings)

An app runs vision.onnx on each slice, embedding.onnx on the prompt, puts each slice's features on
its run of image tokens, and runs model.onnx from those embeddings; decode steps embed one token.
H and W are dynamic multiples of the fold (side_multiple) up to max_side; B is dynamic (a batch of
equal-shape slices). onnxruntime-genai's own image processors do not implement MiniCPM-V's slicing,
so no genai_config.json is written: the bundle's preprocessing (runtimes/image_slicing.py) is the one.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.models.vision import VisionEncoder
from cpm_mobile.exporter.models.vlm import TokenEmbedding
from cpm_mobile.exporter.targets.base import check_model_dtype
from cpm_mobile.exporter.targets.onnx.spec import OnnxSpec
from cpm_mobile.exporter.targets.onnx.graph import (
    DATA_FILE, INPUT_IDS, INPUTS_EMBEDS, MODEL_FILE, TORCH_DTYPES, CacheLayout, build_onnx, initializer_bytes,
    io_contract, save_onnx,
)

VISION_FILE = "vision.onnx"
EMBEDDING_FILE = "embedding.onnx"
PIXEL_VALUES, IMAGE_FEATURES = "pixel_values", "image_features"


def _export(module: torch.nn.Module, args: tuple, dynamic: Any, inputs: list[str], outputs: list[str], opset: int):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="# The axis name: .* will not be used")
        return torch.onnx.export(module, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
                                 input_names=inputs, output_names=outputs, verbose=False).model


class _Wrapped(torch.nn.Module):
    """The module as `.model`: the exported graph's name scopes then name each MatMul's linear as the text
    graph's do (nodes.module_path), which the quantisers and the twin read."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.model = module

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)


def export_multimodal(model: CausalLM, vision: VisionEncoder, out_dir: Path, spec: OnnxSpec,
                      max_side: int, vision_grid: Any = None) -> dict[str, Any]:
    """vision_grid: the vision encoder's 8-bit grid (models/vision_grid.py), stored as MatMulNBits."""
    import onnx_ir as ir

    from cpm_mobile.exporter.targets.onnx.quant import (
        quantize_embedding_onnx, quantize_onnx, quantize_vision_onnx,
    )

    check_model_dtype(model, "onnx")
    if spec.precision != "fp32":
        raise ValueError(f"vision-language ONNX export is fp32 only so far, not {spec.precision}")
    opset, scheme = spec.options.opset, spec.quantization
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = CacheLayout.of(model, TORCH_DTYPES[spec.precision], pad_values=spec.options.pad_mla_values)
    text = build_onnx(model, layout, opset, from_embeddings=True)
    if scheme is not None:
        text = quantize_onnx(text, scheme, model.config.weight_grid)
    files = save_onnx(text, out_dir, initializer_bytes(text) > spec.options.external_data_threshold_bytes)

    seq = Dim("sequence_length", min=1, max=model.max_seq_len)
    embedding = _export(TokenEmbedding(model), (torch.zeros(1, 3, dtype=torch.int64),), ({1: seq},),
                        [INPUT_IDS], [INPUTS_EMBEDS], opset)
    if scheme is not None and scheme.embedding_bits is not None:
        embedding = quantize_embedding_onnx(embedding, scheme)
    ir.save(embedding, out_dir / EMBEDDING_FILE)

    step = vision.config.side_multiple(vision.mode)
    pixels, dims, largest = vision.slice_shapes(max_side, batch=2)  # a batch of equal-shape slices per call
    graph = _export(_Wrapped(vision), (pixels,), (dims,), [PIXEL_VALUES], [IMAGE_FEATURES], opset)
    if vision_grid is not None:
        graph = quantize_vision_onnx(graph, vision_grid)
    ir.save(graph, out_dir / VISION_FILE)
    files += [EMBEDDING_FILE, VISION_FILE]

    io = io_contract(layout, model.config.vocab_size, model.max_seq_len)
    io["inputs"][0] = {"name": INPUTS_EMBEDS, "dtype": "float32", "shape": [1, "sequence_length",
                                                                            model.config.hidden_size]}
    io["names"] = {**io["names"], "inputs_embeds": INPUTS_EMBEDS}
    return {
        "target": "onnx", "files": files, "entry": MODEL_FILE, "io": io,
        "metadata": {
            "opset": opset, "precision": spec.precision,
            "quantization": scheme.model_dump() if scheme is not None else None,
            "vision_quantization": None if vision_grid is None else vision_grid.describe(),
            "external_data": DATA_FILE in files,
            "size_bytes": sum((out_dir / name).stat().st_size for name in files),
            "vision_model": VISION_FILE, "embedding_model": EMBEDDING_FILE,
            "vision_input": {"name": PIXEL_VALUES, "shape": ["slices", vision.config.num_channels, "H", "W"],
                             "dtype": "float32", "side_multiple": step, "max_side": largest,
                             "output": IMAGE_FEATURES},
            "genai": "not written: onnxruntime-genai's image processors do not implement MiniCPM-V's slicing",
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        },
    }
