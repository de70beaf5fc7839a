"""Linear-attention layers in the ONNX graph: explicit conv and recurrent states, and the recurrence
as onnxruntime's com.microsoft LinearAttention (update_rule gated_delta).

Each linear layer i takes past.i.conv [1, C, K-1] and past.i.recurrent [1, H, Dk, Dv] and returns
present.i.conv / present.i.recurrent of the same shapes: onnxruntime-genai's names for Qwen3.5
(models/builders/base.py), fixed shapes that a generic client starts at zero. The conv is plain
ONNX (Concat + grouped Conv + Slice). The recurrence is one contrib op for any T, so prefill and
decode share one graph without a loop over a dynamic length.

onnx's schema registry does not hold onnxruntime's contrib ops, and registering one named like the
standard opset-27 LinearAttention breaks onnx.reference; so the schema the translation binds its
arguments with is built here and never registered (same inputs, outputs and attributes as the
contrib op's, checked against onnxruntime's own schema in tests).
"""
from __future__ import annotations

import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset20 as op

from cpm_mobile.exporter.kernels import ops
from cpm_mobile.exporter.models.linear_attention import causal_conv

MS_DOMAIN = "com.microsoft"
PAST_CONV, PAST_RECURRENT = "past.%d.conv", "past.%d.recurrent"
PRESENT_CONV, PRESENT_RECURRENT = "present.%d.conv", "present.%d.recurrent"


def _linear_attention_schema() -> OpSchema:
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attribute = OpSchema.Attribute
    return OpSchema(
        "LinearAttention", MS_DOMAIN, 1,
        inputs=[param("query", "T"), param("key", "T"), param("value", "T"),
                param("past_state", "T", param_option=optional), param("decay", "T", param_option=optional),
                param("beta", "T", param_option=optional)],
        outputs=[param("output", "T"), param("present_state", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[attribute("q_num_heads", OpSchema.AttrType.INT, ""),
                    attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
                    attribute("update_rule", OpSchema.AttrType.STRING, ""),
                    attribute("scale", OpSchema.AttrType.FLOAT, ""),
                    attribute("chunk_size", OpSchema.AttrType.INT, "")],
    )


LINEAR_ATTENTION_SCHEMA = _linear_attention_schema()
_LINEAR_ATTENTION = onnxscript.values.Op(onnxscript.values.Opset(MS_DOMAIN, 1), "LinearAttention",
                                         op_schema=LINEAR_ATTENTION_SCHEMA)


def gated_delta_rule_onnx(q, k, v, g, beta, state, scale: float):
    """cpm_mobile::gated_delta_rule as LinearAttention: [1, T, H, D] in, packed [1, T, H*D] for the op."""
    heads = q.shape[2]
    packed = op.Constant(value_ints=[0, 0, -1])
    # The op takes one dtype throughout; the decay is computed in fp32 (and the state kept fp32) even
    # when the activations are fp16.
    out, new_state = _LINEAR_ATTENTION(
        op.Reshape(q, packed), op.Reshape(k, packed), op.Reshape(v, packed), op.CastLike(state, v),
        op.CastLike(g, v), op.CastLike(beta, v),
        q_num_heads=heads, kv_num_heads=heads, update_rule="gated_delta", scale=scale,
    )
    return op.Reshape(out, op.Shape(v)), op.CastLike(new_state, state)


TRANSLATIONS = {torch.ops.cpm_mobile.gated_delta_rule.default: gated_delta_rule_onnx}


class PastPresentRecurrence:
    """A linear layer's Recurrence over explicit past tensors; the new states go to `presents`."""

    def __init__(self, past_conv: torch.Tensor, past_recurrent: torch.Tensor, presents: list[torch.Tensor]):
        self.past_conv = past_conv
        self.past_recurrent = past_recurrent
        self.presents = presents

    def convolve(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out, present = causal_conv(self.past_conv, x, weight)
        self.presents[0] = present.to(self.past_conv.dtype)
        return out

    def recur(self, q, k, v, g, beta, scale: float) -> torch.Tensor:
        out, present = ops.gated_delta_rule(q, k, v, g, beta, self.past_recurrent, scale)
        self.presents[1] = present
        return out
