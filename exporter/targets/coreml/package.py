"""What the text program (target.py) and the vision-language packages (multimodal.py) share: the Core ML
variant of the module (fp16 states), an atomic package save, and the I/O description read off a program."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.models.variant import derive
from cpm_mobile.exporter.targets.coreml.cache import CoreMLKVCache

FUNCTION = "main"
TOKENS, INPUT_POS, LOGITS = "tokens", "input_pos", "logits"
SEQ = "T"


def coreml_ready(model: CausalLM) -> CausalLM:
    """A variant with Core ML caches (fp16 states written by slice update) and linear-attention states
    (fp16 states written whole), weights shared."""
    from cpm_mobile.exporter.targets.coreml.linear_state import CoreMLLinearState

    return derive(model, caches=CoreMLKVCache.like, linear_states=CoreMLLinearState.like)


def save_package(mlmodel, path: Path) -> int:
    """Write through a temporary name in the same folder so a failed save never leaves a package."""
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        # Without its MIL program the model saves no debug map for ExecuTorch's Core ML delegate: a build
        # by-product we do not ship, which coremltools cannot build for a program with loops anyway.
        program, mlmodel._mil_program = mlmodel._mil_program, None
        try:
            mlmodel.save(str(temporary))
        finally:
            mlmodel._mil_program = program
        if path.exists():
            shutil.rmtree(path)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary.parent, ignore_errors=True)
    return package_size(path)


def package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def array_dtype_name(array_type: Any) -> str:
    """'float16', 'int32', ... for a multiArray/state description's data type."""
    from coremltools.proto import FeatureTypes_pb2

    name = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array_type.dataType)
    return {"DOUBLE": "float64"}.get(name, name.lower())


def _array_entry(name: str, array_type: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "dtype": array_dtype_name(array_type)}
    shape: list[Any] = list(array_type.shape)
    if array_type.WhichOneof("ShapeFlexibility") == "shapeRange":
        ranges = array_type.shapeRange.sizeRanges
        shape = [r.lowerBound if r.lowerBound == r.upperBound else SEQ for r in ranges]
    entry["shape"] = shape
    return entry


def io_contract(mlmodel, model: CausalLM) -> dict[str, Any]:
    spec = mlmodel.get_spec()
    description = spec.description
    states = [_array_entry(s.name, s.type.stateType.arrayType) for s in description.state]
    config = model.config
    return {
        "function": FUNCTION,
        "inputs": [
            {"name": TOKENS, "dtype": "int32", "shape": [1, SEQ]},
            {"name": INPUT_POS, "dtype": "int32", "shape": [1], "meaning": "position of tokens[0, 0]"},
        ],
        "outputs": [{"name": LOGITS, "dtype": "float32", "shape": [1, SEQ, model.config.vocab_size]}],
        "states": states,
        "dynamic_dims": {SEQ: {"min": 1, "max": model.max_seq_len, "kind": "RangeDim"}},
        "max_seq_len": model.max_seq_len,
        "vocab_size": model.config.vocab_size,
        "constraint": "input_pos + T <= max_seq_len",
        "cache": {
            "kind": "coreml_states",  # one MLState per sequence; slice_update at input_pos
            "layers": config.num_layers,
            "heads": config.cache_heads,
            "key_dim": config.k_head_dim,
            "value_dim": config.value_head_dim,
            "max_seq_len": model.max_seq_len,
            "dtype": "float16",
            "names": {"key": "kv_caches_%d_k_cache", "value": "kv_caches_%d_v_cache"},
        },
        **_recurrent(config),
    }


def _recurrent(config) -> dict[str, Any]:
    """Hybrid backbones: which layers keep a linear-attention state (fp16 states written whole each call,
    zeroed by a call at input_pos 0) instead of a KV cache; such a state continues only from its last position."""
    if not config.is_hybrid:
        return {}
    return {"recurrent": {"layers": list(config.linear_layers), "kind": "coreml_states", "dtype": "float16", "reset": "input_pos == 0",
                          "names": {"conv": "kv_caches_%d_conv_state", "recurrent": "kv_caches_%d_recurrent_state"}}}
