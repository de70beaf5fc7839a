"""A vision-language model -> three ML Programs for iOS 18 / macOS 15, one per half of the join.

    vision.mlpackage        pixel_values float32[1, 3, H, W] -> image_features [1, N, hidden]
                            (H, W flexible RangeDims in side_multiple..max_side; the fold needs multiples of
                            side_multiple, which the manifest states: Core ML cannot express it)
    embedding.mlpackage     tokens int32[1, T] -> embeddings [1, T, hidden]
    text_decoder.mlpackage  embeddings [1, T, hidden], input_pos int32[1] -> logits, the KV cache and any
                            linear-attention state in fp16 Core ML states (target.py's text program, from
                            embeddings)

Three packages rather than one multifunction package: each has its own inputs, and the vision one has no
state. The rank of every tensor stays <= 5 (Core ML's limit; models/vision.py folds windows that way).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import Dim

from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.models.vision import VisionEncoder
from cpm_mobile.exporter.models.vlm import TextDecoder, TokenEmbedding
from cpm_mobile.exporter.targets.base import check_model_dtype
from cpm_mobile.exporter.targets.coreml.spec import CoreMLSpec
from cpm_mobile.exporter.targets.coreml.package import (
    INPUT_POS, LOGITS, SEQ, TOKENS, coreml_ready, io_contract, package_size, save_package,
)

VISION_PACKAGE, EMBEDDING_PACKAGE, DECODER_PACKAGE = "vision.mlpackage", "embedding.mlpackage", "text_decoder.mlpackage"
PIXEL_VALUES, IMAGE_FEATURES, EMBEDDINGS = "pixel_values", "image_features", "embeddings"


def _export(module: torch.nn.Module, args: tuple, dynamic: Any):
    with torch.no_grad(), torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        return torch.export.export(module, args, dynamic_shapes=dynamic, strict=False).run_decompositions({})


def _convert(program, spec: CoreMLSpec, inputs=None, outputs=None):
    import coremltools as ct

    from cpm_mobile.exporter.targets.coreml.linear_state import register_converter

    register_converter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Input, 'model\.kv_caches\.", category=UserWarning)
        return ct.convert(program, convert_to="mlprogram",
                          minimum_deployment_target=getattr(ct.target, spec.options.deployment_target),
                          compute_precision={"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}[spec.precision],
                          inputs=inputs, outputs=outputs, skip_model_load=True)


def export_multimodal(model: CausalLM, vision: VisionEncoder, out_dir: Path, spec: CoreMLSpec,
                      max_side: int) -> dict[str, Any]:
    import coremltools as ct

    check_model_dtype(model, "coreml")
    if spec.quantization is not None:
        raise ValueError("vision-language Core ML export is unquantised so far")
    out_dir.mkdir(parents=True, exist_ok=True)
    hidden, max_len = model.config.hidden_size, model.max_seq_len
    seq = Dim(SEQ, min=1, max=max_len)
    flexible = ct.RangeDim(1, max_len, default=1, symbol=SEQ)

    decoder = _export(TextDecoder(coreml_ready(model)), (torch.zeros(1, 2, hidden), torch.zeros(1, dtype=torch.int64)),
                      ({1: seq}, None))
    decoder = _convert(decoder, spec, [ct.TensorType(name=EMBEDDINGS, shape=(1, flexible, hidden), dtype=np.float32),
                                       ct.TensorType(name=INPUT_POS, shape=(1,), dtype=np.int32)],
                       [ct.TensorType(name=LOGITS, dtype=np.float32)])
    save_package(decoder, out_dir / DECODER_PACKAGE)

    embedding = _export(TokenEmbedding(model), (torch.zeros(1, 2, dtype=torch.int64),), ({1: seq},))
    embedding = _convert(embedding, spec, [ct.TensorType(name=TOKENS, shape=(1, flexible), dtype=np.int32)],
                         [ct.TensorType(name=EMBEDDINGS, dtype=np.float32)])
    save_package(embedding, out_dir / EMBEDDING_PACKAGE)

    step = vision.config.side_multiple(vision.mode)
    pixels, dims, largest = vision.slice_shapes(max_side)
    encoder = _convert(_export(vision, (pixels,), (dims,)), spec)
    save_package(encoder, out_dir / VISION_PACKAGE)

    files = [DECODER_PACKAGE, EMBEDDING_PACKAGE, VISION_PACKAGE]
    io = io_contract(decoder, model)
    io["function"] = "main"
    io["inputs"][0] = {"name": EMBEDDINGS, "dtype": "float32", "shape": [1, SEQ, hidden]}
    vision_spec = encoder.get_spec().description
    return {
        "target": "coreml", "files": files, "entry": DECODER_PACKAGE, "io": io,
        "metadata": {
            "format": "mlprogram", "deployment_target": spec.options.deployment_target,
            "compute_precision": spec.precision, "precision": spec.precision, "quantization": None,
            "size_bytes": sum(package_size(out_dir / name) for name in files),
            "vision_model": VISION_PACKAGE, "embedding_model": EMBEDDING_PACKAGE,
            "vision_input": {"name": vision_spec.input[0].name, "output": vision_spec.output[0].name,
                             "shape": [1, vision.config.num_channels, "H", "W"], "dtype": "float32",
                             "side_multiple": step, "max_side": largest},
        },
    }
