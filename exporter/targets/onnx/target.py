"""ONNX target: one graph with explicit past/present KV under onnxruntime-genai's names.

    inputs   input_ids int64 [1, T], attention_mask int64 [1, P+T], position_ids int64 [1, T],
             past_key_values.N.key [1, Hc, P, Dk], past_key_values.N.value [1, Hc, P, Dv]
    outputs  logits [1, T, V], present.N.key [1, Hc, P+T, Dk], present.N.value [1, Hc, P+T, Dv]

present = concat(past, new) (genai's past_present_share_buffer=false form); P and T are dynamic
and P may be 0. The stages are separate functions (build_onnx -> [quantise] -> save_onnx) so a
post-export step that rewrites the onnx_ir model can slot in between.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from cpm_mobile.exporter.models.attention import Attend
from cpm_mobile.exporter.models.kv_cache import grouped_sdpa
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.targets.onnx.quant import check_blocks_fit, check_grid, onnx_twin, quantize_onnx
from cpm_mobile.exporter.targets.base import (
    ArtifactInfo, ExportContext, ExportedArtifact, Progress, StructuralFault, check_model_dtype, exported_with_twin,
    no_progress, refusals_of,
)
from cpm_mobile.exporter.targets.onnx.spec import OnnxSpec
from cpm_mobile.exporter.targets.onnx.genai_config import GENAI_CONFIG_FILE, genai_config
from cpm_mobile.exporter.targets.onnx.linear_attention import (
    PAST_CONV, PAST_RECURRENT, PRESENT_CONV, PRESENT_RECURRENT, TRANSLATIONS, PastPresentRecurrence,
)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DEFAULT_OPSET = 20

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
SEQ, PAST, TOTAL = "sequence_length", "past_sequence_length", "total_sequence_length"

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16"}


@dataclass(frozen=True)
class CacheLayout:
    """What the graph's past/present tensors hold: [1, heads, length, dim] per layer.

    value_dim is the stored width; for MLA it is padded with zeros up to key_dim when
    pad_values is set (genai sizes keys and values with one head_size). The padding is exact:
    zero value columns give zero output columns, which the graph slices off.
    """

    layers: int
    heads: int
    key_dim: int
    value_dim: int
    model_value_dim: int
    dtype: torch.dtype
    # Hybrid backbones: which layers hold a linear-attention state instead of a KV cache, and its shapes.
    linear_layers: tuple[int, ...] = ()
    conv_shape: tuple[int, ...] = ()
    recurrent_shape: tuple[int, ...] = ()

    @classmethod
    def of(cls, model: CausalLM, dtype: torch.dtype, pad_values: bool) -> "CacheLayout":
        config = model.config
        key_dim, value_dim = config.k_head_dim, config.value_head_dim
        stored = max(key_dim, value_dim) if pad_values else value_dim
        linear = config.linear_layers
        shapes: dict[str, tuple[int, ...]] = {}
        if linear:
            state = model.kv_caches[linear[0]]
            shapes = dict(conv_shape=tuple(state.conv_state.shape), recurrent_shape=tuple(state.recurrent_state.shape))
        return cls(config.num_layers, config.cache_heads, key_dim, stored, value_dim, dtype, linear, **shapes)

    def is_linear(self, layer: int) -> bool:
        return layer in self.linear_layers

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.layers) if i not in self.linear_layers)


class PastPresentLM(nn.Module):
    """forward(input_ids, attention_mask, position_ids, past) -> (logits, present k/v per layer).

    Wraps the caller's CausalLM without changing it: the stack runs through model.decode with one
    attend per layer that concatenates past and new keys/values and masks causally over P+T.
    """

    def __init__(self, model: CausalLM, layout: CacheLayout):
        super().__init__()
        self.model = model
        self.layout = layout
        self.scales = [getattr(cache, "scale", None) for cache in model.kv_caches]
        # Inference graph; set on the wrapper alone, since .eval() would recurse into the caller's model.
        self.training = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...],
    ) -> tuple[torch.Tensor, ...]:
        new_len = input_ids.shape[1]
        past_len = past_key_values[self.layout.attention_layers[0]][0].shape[2]
        # Row t is the token in cache slot past_len + t; it sees slots 0..past_len + t that the
        # attention mask keeps (all of them for genai's batch-1 generation).
        query_slots = torch.arange(new_len, dtype=torch.int64) + past_len
        key_slots = torch.arange(past_len + new_len, dtype=torch.int64)
        mask = (key_slots[None, :] <= query_slots[:, None]) & attention_mask[0].bool()[None, :]
        presents: list[list[torch.Tensor]] = [[None, None] for _ in past_key_values]
        attends = [
            PastPresentRecurrence(past_a, past_b, layer_presents) if self.layout.is_linear(i)
            else self._attend(past_a, past_b, mask, scale, layer_presents)
            for i, ((past_a, past_b), scale, layer_presents) in enumerate(zip(past_key_values, self.scales, presents))
        ]
        logits = self.model.decode(input_ids, position_ids[0], attends)
        return (logits, *(tensor for layer in presents for tensor in layer))

    def _attend(
        self, past_k: torch.Tensor, past_v: torch.Tensor, mask: torch.Tensor, scale: float, presents: list[torch.Tensor]
    ) -> Attend:
        layout = self.layout
        pad = layout.value_dim - layout.model_value_dim

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if pad:
                v = F.pad(v, (0, pad))
            key = torch.cat((past_k, k.transpose(1, 2).to(past_k.dtype)), dim=2)
            value = torch.cat((past_v, v.transpose(1, 2).to(past_v.dtype)), dim=2)
            presents[:] = [key, value]
            out = grouped_sdpa(q.transpose(1, 2), key.to(q.dtype), value.to(q.dtype), mask, scale)
            return out[..., : layout.model_value_dim] if pad else out

        return attend


def example_inputs(layout: CacheLayout, new_len: int = 5, past_len: int = 7) -> tuple[Any, ...]:
    """Tracing inputs. T and P differ (and exceed 1) so torch.export neither merges nor specialises them."""
    past = tuple(
        (
            torch.zeros(layout.conv_shape, dtype=layout.dtype),
            torch.zeros(layout.recurrent_shape, dtype=layout.dtype),
        ) if layout.is_linear(i) else (
            torch.zeros(1, layout.heads, past_len, layout.key_dim, dtype=layout.dtype),
            torch.zeros(1, layout.heads, past_len, layout.value_dim, dtype=layout.dtype),
        )
        for i in range(layout.layers)
    )
    input_ids = torch.zeros(1, new_len, dtype=torch.int64)
    attention_mask = torch.ones(1, past_len + new_len, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + new_len, dtype=torch.int64)[None]
    return input_ids, attention_mask, position_ids, past


def input_names(layout: CacheLayout) -> list[str]:
    caches = [name % i for i in range(layout.layers)
              for name in ((PAST_CONV, PAST_RECURRENT) if layout.is_linear(i) else (PAST_KEY, PAST_VALUE))]
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *caches]


def output_names(layout: CacheLayout) -> list[str]:
    return [LOGITS, *(name % i for i in range(layout.layers)
                      for name in ((PRESENT_CONV, PRESENT_RECURRENT) if layout.is_linear(i)
                                   else (PRESENT_KEY, PRESENT_VALUE)))]


def build_onnx(model: CausalLM, layout: CacheLayout, opset: int = DEFAULT_OPSET) -> ir.Model:
    """torch.export + the dynamo ONNX exporter; the model is only read."""
    max_len = model.max_seq_len
    seq = torch.export.Dim(SEQ, min=1, max=max_len)
    past = torch.export.Dim(PAST, min=0, max=max_len - 1)
    dynamic_shapes = {
        INPUT_IDS: {1: seq},
        ATTENTION_MASK: {1: torch.export.Dim.AUTO},
        POSITION_IDS: {1: seq},
        "past_key_values": tuple(({}, {}) if layout.is_linear(i) else ({2: past}, {2: past})
                                 for i in range(layout.layers)),
    }
    with torch.no_grad(), warnings.catch_warnings():
        # input_ids and position_ids share the sequence dim by design; the exporter warns about it.
        warnings.filterwarnings("ignore", message="# The axis name: .* will not be used")
        program = torch.onnx.export(
            PastPresentLM(model, layout),
            example_inputs(layout),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names(layout),
            output_names=output_names(layout),
            custom_translation_table=TRANSLATIONS if layout.linear_layers else None,
            verbose=False,
        )
    onnx_model = program.model
    _name_total_length(onnx_model)
    return onnx_model


def _name_total_length(onnx_model: ir.Model) -> None:
    """The exporter names P+T 'past_sequence_length + sequence_length' (and the mask's length
    an opaque 's..'); give graph inputs and outputs genai's dimension names."""
    graph = onnx_model.graph
    for value in [*graph.inputs, *graph.outputs]:
        if value.name == ATTENTION_MASK:
            value.shape = ir.Shape([1, TOTAL])
        elif value.name.startswith("present."):
            dims = list(value.shape)
            dims[2] = TOTAL
            value.shape = ir.Shape(dims)


def save_onnx(onnx_model: ir.Model, folder: Path, external_data: bool, progress: Progress | None = None) -> list[str]:
    """Write model.onnx (+ model.onnx.data) into folder; returns the file names written."""
    path = folder / MODEL_FILE
    if not external_data:
        ir.save(onnx_model, path)
        return [MODEL_FILE]
    callback = None
    if progress is not None:
        written = 0

        def callback(tensor: ir.TensorProtocol, info: Any) -> None:
            nonlocal written  # callbacks may arrive out of index order: count them
            written += 1
            progress(f"onnx: writing {DATA_FILE}", 0.6 + 0.35 * written / max(info.total, 1))

    ir.save(onnx_model, path, external_data=DATA_FILE, callback=callback, alignment=1 << 16)
    return [MODEL_FILE, DATA_FILE]


def initializer_bytes(onnx_model: ir.Model) -> int:
    return sum(value.const_value.nbytes for value in onnx_model.graph.initializers.values() if value.const_value)


def io_contract(layout: CacheLayout, vocab_size: int, max_seq_len: int) -> dict[str, Any]:
    cache_dtype = DTYPE_NAMES[layout.dtype]

    def cache(name: str, index: int, length: str, dim: int) -> dict[str, Any]:
        return {"name": name % index, "dtype": cache_dtype, "shape": [1, layout.heads, length, dim]}

    inputs = [
        {"name": INPUT_IDS, "dtype": "int64", "shape": [1, SEQ]},
        {"name": ATTENTION_MASK, "dtype": "int64", "shape": [1, TOTAL]},
        {"name": POSITION_IDS, "dtype": "int64", "shape": [1, SEQ]},
    ]
    outputs = [{"name": LOGITS, "dtype": cache_dtype, "shape": [1, SEQ, vocab_size]}]
    def state(name: str, index: int, shape: tuple[int, ...]) -> dict[str, Any]:
        return {"name": name % index, "dtype": cache_dtype, "shape": list(shape)}

    for i in range(layout.layers):
        if layout.is_linear(i):
            inputs += [state(PAST_CONV, i, layout.conv_shape), state(PAST_RECURRENT, i, layout.recurrent_shape)]
            outputs += [state(PRESENT_CONV, i, layout.conv_shape),
                        state(PRESENT_RECURRENT, i, layout.recurrent_shape)]
            continue
        inputs += [cache(PAST_KEY, i, PAST, layout.key_dim), cache(PAST_VALUE, i, PAST, layout.value_dim)]
        outputs += [cache(PRESENT_KEY, i, TOTAL, layout.key_dim), cache(PRESENT_VALUE, i, TOTAL, layout.value_dim)]
    recurrent = {}
    if layout.linear_layers:
        # Linear-attention layers carry fixed-size states instead of a KV cache; a client starts them
        # at zero and feeds each call's present back as the next call's past.
        recurrent = {"recurrent": {
            "layers": list(layout.linear_layers),
            "conv_shape": list(layout.conv_shape),
            "recurrent_shape": list(layout.recurrent_shape),
            "names": {"past_conv": PAST_CONV, "past_recurrent": PAST_RECURRENT,
                      "present_conv": PRESENT_CONV, "present_recurrent": PRESENT_RECURRENT},
        }}
    return {
        "inputs": inputs,
        "outputs": outputs,
        "names": {
            "input_ids": INPUT_IDS,
            "attention_mask": ATTENTION_MASK,
            "position_ids": POSITION_IDS,
            "past_key": PAST_KEY,
            "past_value": PAST_VALUE,
            "logits": LOGITS,
            "present_key": PRESENT_KEY,
            "present_value": PRESENT_VALUE,
        },
        "cache": {
            "kind": "past_present",  # present = concat(past, new); the caller feeds it back as past
            "layers": layout.layers,
            "heads": layout.heads,
            "key_dim": layout.key_dim,
            "value_dim": layout.model_value_dim,
            "stored_value_dim": layout.value_dim,  # > value_dim: zero padding, see CacheLayout
            "max_seq_len": max_seq_len,
            "dtype": cache_dtype,
        },
        "vocab_size": vocab_size,
        "max_seq_len": max_seq_len,
        **recurrent,
    }


class OnnxTarget:
    """The spec's options: opset (>= 20), external_data_threshold_bytes, pad_mla_values (default
    true: MLA value heads zero-padded to the key width so onnxruntime-genai can run it)."""

    name = "onnx"

    def export(
        self, model: CausalLM, out_dir: Path, spec: OnnxSpec | None = None,
        context: ExportContext = ExportContext(None, ()), progress: Progress = no_progress,
    ) -> ExportedArtifact:
        spec = spec or OnnxSpec.model_construct()
        options = spec.options
        out_dir = Path(out_dir)
        check_model_dtype(model, self.name)
        onnx_model, layout = self._graph(model, spec, progress)
        size = initializer_bytes(onnx_model)
        external = size > options.external_data_threshold_bytes
        progress("onnx: saving", 0.6)
        out_dir.mkdir(parents=True, exist_ok=True)
        io = io_contract(layout, model.config.vocab_size, model.max_seq_len)
        genai, genai_note = _genai_config(model, context, io)
        staging = Path(tempfile.mkdtemp(prefix=".onnx-", dir=out_dir))
        try:
            files = save_onnx(onnx_model, staging, external, progress)
            if genai is not None:
                (staging / GENAI_CONFIG_FILE).write_text(json.dumps(genai, indent=4) + "\n")
                files.append(GENAI_CONFIG_FILE)
            _move_into(staging, out_dir, files, stale=[DATA_FILE, GENAI_CONFIG_FILE])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        progress("onnx: done", 1.0)
        info = ArtifactInfo(
            target=self.name,
            files=files,
            entry=MODEL_FILE,
            io=io,
            metadata={
                "opset": options.opset,
                "precision": spec.precision,
                "external_data": external,
                "external_data_threshold_bytes": options.external_data_threshold_bytes,
                "size_bytes": sum((out_dir / name).stat().st_size for name in files),
                "genai_config": GENAI_CONFIG_FILE if genai is not None else None,
                "genai": genai_note,
                "value_padding": layout.value_dim - layout.model_value_dim,
                "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
                "quantization": spec.quantization.model_dump() if spec.quantization is not None else None,
            },
        )
        return exported_with_twin(self, model, spec, out_dir, info)

    def validate(self, model: CausalLM, spec: OnnxSpec) -> list[str]:
        if spec.quantization is None:
            return []
        return refusals_of(lambda: check_grid(model, spec.quantization, spec.precision),
                           lambda: check_blocks_fit(model, spec.quantization))

    def _graph(self, model: CausalLM, spec: OnnxSpec, progress: Progress) -> tuple[ir.Model, CacheLayout]:
        """The graph, quantised when the spec asks."""
        converted, _ = self._converted(model, spec)
        layout = CacheLayout.of(converted, TORCH_DTYPES[spec.precision], pad_values=spec.options.pad_mla_values)
        if spec.quantization is not None:
            check_grid(model, spec.quantization, spec.precision)  # the checkpoint's grid, before any work
        progress("onnx: exporting graph (torch.export + dynamo)", 0.0)
        onnx_model = build_onnx(converted, layout, spec.options.opset)
        if spec.quantization is None:
            return onnx_model, layout
        progress(f"onnx: quantising ({spec.quantization.scheme})", 0.5)
        return quantize_onnx(onnx_model, spec.quantization, model.config.weight_grid), layout

    def twin(self, model: CausalLM, spec: OnnxSpec, bundle_dir: Path, artifact: dict[str, Any]) -> tuple[CausalLM, str]:
        """What the graph computes. Quantised: the weights read back from the stored graph (every
        MatMulNBits' and GatherBlockQuantized's codes, scales and zero points, dequantised), with
        MatMulNBits' int8 activation rounding."""
        converted, description = self._converted(model, spec)
        if spec.quantization is None:
            return converted, description
        try:
            stored = ir.load(Path(bundle_dir) / artifact["entry"])
            twin = onnx_twin(converted, stored, spec.quantization)
        except ValueError as error:  # a quantised weight missing from the graph, or one it cannot name
            raise StructuralFault(f"stored_quantised: {error}") from None
        return twin, (f"eager model with the graph's dequantised {spec.quantization.scheme} weights"
                      " and MatMulNBits' int8 activation rounding")

    def structure(self, bundle_dir: Path, artifact: dict[str, Any], twin: CausalLM) -> list[str]:
        """Reading the twin back from the graph checks what it stores (see twin()); where its kernels round
        activations, the stored weights are also checked exactly through the fp32 path (exact.py)."""
        if artifact.get("metadata", {}).get("quantization") is not None:
            from cpm_mobile.exporter.targets.onnx.exact import exact_weight_faults

            return exact_weight_faults(ir.load(Path(bundle_dir) / artifact["entry"]), artifact, twin)
        return []

    def _converted(self, model: CausalLM, spec: OnnxSpec) -> tuple[CausalLM, str]:
        """The graph computes the module itself (its past/present wrapper only moves the cache to
        the graph's inputs and outputs), in the spec's precision."""
        if spec.precision == "fp32":
            return model, "eager fp32 model"
        # A converted copy: Module.to() would convert shared parameters in place.
        return copy.deepcopy(model).to(TORCH_DTYPES[spec.precision]), f"eager {spec.precision} model"


def _genai_config(model: CausalLM, context: ExportContext, io: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    cache = io["cache"]
    if "recurrent" in io:
        return None, "not supported: the hybrid (linear-attention) layers' states need genai's qwen3_5_text model type"
    if cache["key_dim"] != cache["stored_value_dim"]:
        return None, (
            f"not supported: onnxruntime-genai sizes key and value caches with one head_size, but keys are "
            f"{cache['key_dim']} wide and values {cache['stored_value_dim']} (MLA); export with pad_mla_values=true"
        )
    config = model.config
    genai = genai_config(
        model_file=MODEL_FILE,
        io=io,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        context_length=model.max_seq_len,
        vocab_size=config.vocab_size,  # the logits' width, which is what genai reads it as
        bos_id=context.bos_id,
        eos_ids=context.eos_ids,
    )
    padded = cache["stored_value_dim"] - cache["value_dim"]
    note = "supported (model.type llama, past_present_share_buffer false)"
    if padded:
        note += f"; value heads zero-padded {cache['value_dim']} -> {cache['stored_value_dim']} to match head_size"
    return genai, note


def _move_into(staging: Path, out_dir: Path, files: Sequence[str], stale: Sequence[str]) -> None:
    """Atomic per file: each name appears complete or not at all. A companion file this export did
    not write (an old model.onnx.data) is removed so it cannot be mistaken for ours."""
    for name in stale:
        if name not in files and (out_dir / name).exists():
            (out_dir / name).unlink()
    # Data first: a model.onnx that is visible always finds its weights.
    for name in sorted(files, key=lambda n: n != DATA_FILE):
        os.replace(staging / name, out_dir / name)


TARGET = OnnxTarget
