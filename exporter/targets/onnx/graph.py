"""The ONNX text graph: one graph with explicit past/present KV under onnxruntime-genai's names.

    inputs   input_ids int64 [1, T], attention_mask int64 [1, P+T], position_ids int64 [1, T],
             past_key_values.N.key [1, Hc, P, Dk], past_key_values.N.value [1, Hc, P, Dv]
    outputs  logits [1, T, V], present.N.key [1, Hc, P+T, Dk], present.N.value [1, Hc, P+T, Dv]

present = concat(past, new) (genai's past_present_share_buffer=false form); P and T are dynamic
and P may be 0. The stages are separate functions (build_onnx -> [quantise] -> save_onnx) so a
post-export step that rewrites the onnx_ir model can slot in between.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from cpm_mobile.exporter.models.attention import Attend
from cpm_mobile.exporter.models.kv_cache import grouped_sdpa
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.targets.base import Progress
from cpm_mobile.exporter.targets.onnx.linear_attention import (
    PAST_CONV, PAST_RECURRENT, PRESENT_CONV, PRESENT_RECURRENT, TRANSLATIONS, PastPresentRecurrence,
)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DEFAULT_OPSET = 20

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
INPUTS_EMBEDS = "inputs_embeds"
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

    def __init__(self, model: CausalLM, layout: CacheLayout, from_embeddings: bool = False):
        super().__init__()
        self.model = model
        self.layout = layout
        self.from_embeddings = from_embeddings  # first input: inputs_embeds [1, T, hidden] instead of input_ids
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
        if self.from_embeddings:
            logits = self.model.decode_embeddings(input_ids, position_ids[0], attends)
        else:
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


def example_inputs(layout: CacheLayout, new_len: int = 5, past_len: int = 7,
                   embeddings_width: int | None = None) -> tuple[Any, ...]:
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
    input_ids = (torch.zeros(1, new_len, dtype=torch.int64) if embeddings_width is None
                 else torch.zeros(1, new_len, embeddings_width, dtype=layout.dtype))
    attention_mask = torch.ones(1, past_len + new_len, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + new_len, dtype=torch.int64)[None]
    return input_ids, attention_mask, position_ids, past


def input_names(layout: CacheLayout, first: str = INPUT_IDS) -> list[str]:
    caches = [name % i for i in range(layout.layers)
              for name in ((PAST_CONV, PAST_RECURRENT) if layout.is_linear(i) else (PAST_KEY, PAST_VALUE))]
    return [first, ATTENTION_MASK, POSITION_IDS, *caches]


def output_names(layout: CacheLayout) -> list[str]:
    return [LOGITS, *(name % i for i in range(layout.layers)
                      for name in ((PRESENT_CONV, PRESENT_RECURRENT) if layout.is_linear(i)
                                   else (PRESENT_KEY, PRESENT_VALUE)))]


def build_onnx(model: CausalLM, layout: CacheLayout, opset: int = DEFAULT_OPSET,
               from_embeddings: bool = False) -> ir.Model:
    """torch.export + the dynamo ONNX exporter; the model is only read. from_embeddings: the graph takes
    inputs_embeds [1, T, hidden] (a vision-language model's text half) instead of input_ids."""
    max_len = model.max_seq_len
    seq = torch.export.Dim(SEQ, min=1, max=max_len)
    past = torch.export.Dim(PAST, min=0, max=max_len - 1)
    first = INPUTS_EMBEDS if from_embeddings else INPUT_IDS
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
            PastPresentLM(model, layout, from_embeddings),
            example_inputs(layout, embeddings_width=model.config.hidden_size if from_embeddings else None),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names(layout, first),
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
            progress(f"writing {DATA_FILE}", 0.6 + 0.35 * written / max(info.total, 1))

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


