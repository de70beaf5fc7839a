"""Linear-attention layers (Gated DeltaNet) in the form Core ML runs: fp16 states and a MIL while_loop.

The state (the conv's last K-1 inputs and the recurrent matrix) lives in two fp16 Core ML states, read
widened to the compute dtype and written back whole each call, zeroed by a call at position 0. The causal
conv is K shifted slices multiplied and summed (the same sum as the reference conv1d, no conv op needed).
The recurrence, cpm_mobile::gated_delta_rule, converts to a MIL while_loop over the T tokens of the call
(registered with coremltools below), so one program prefills any T and decodes one token.

Why by hand: coremltools converts no recurrence, and a MIL loop is the only form of one that a flexible T
allows; the loop body is the recurrence's own per-token update.
"""
from __future__ import annotations

import torch

from cpm_mobile.exporter.kernels import ops
from cpm_mobile.exporter.models.linear_attention import BoundState, LinearAttentionState

STATE_DTYPE = torch.float16


class _CoreMLBound(BoundState):
    def _past(self, buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # A product with 0/1 (coremltools converts no where with a scalar): Core ML states start zeroed.
        return buffer.to(dtype) * self.continuing.to(dtype)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        past = self._past(self.owner.conv_state, x.dtype)  # [1, C, K-1]
        window = torch.cat((past, x.transpose(1, 2)), dim=2)  # [1, C, K-1+T]
        kernel = weight.shape[-1]
        length = x.shape[1]
        taps = weight.to(x.dtype)[:, 0, :]  # [C, K]
        out = window[:, :, 0:length] * taps[None, :, 0:1]
        for j in range(1, kernel):
            out = out + window[:, :, j:j + length] * taps[None, :, j:j + 1]
        # reshape: the slice's length is symbolic to coremltools (the window's is), the state's is not
        self.owner.conv_state.copy_(window[:, :, -(kernel - 1):].reshape(self.owner.conv_state.shape).to(STATE_DTYPE))
        return out.transpose(1, 2)


class CoreMLLinearState(LinearAttentionState):
    """Both states fp16 (Core ML states must be), read through _CoreMLBound."""

    Bound = _CoreMLBound

    def __init__(self, spec, dtype: torch.dtype = STATE_DTYPE, recurrent_dtype: torch.dtype = STATE_DTYPE):
        super().__init__(spec, dtype, recurrent_dtype)

    @classmethod
    def like(cls, state: LinearAttentionState) -> "CoreMLLinearState":
        return cls(state.spec)


def register_converter() -> None:
    """cpm_mobile::gated_delta_rule as a MIL while_loop over the call's tokens (idempotent)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    name = f"{ops.NAMESPACE}::{ops.GATED_DELTA_OP}"
    if name in _TORCH_OPS_REGISTRY:
        return

    @register_torch_op(torch_alias=[name])
    def cpm_gated_delta_rule(context, node):
        q, k, v, g, beta, state, scale = _get_inputs(context, node, expected=7)
        scale = float(scale.val)
        dtype = v.dtype
        q, k, v, g, beta = (mb.squeeze(x=x, axes=[0]) for x in (q, k, v, g, beta))  # [T, H, D] / [T, H]
        g = mb.cast(x=g, dtype=_dtype_name(dtype))
        beta = mb.cast(x=beta, dtype=_dtype_name(dtype))
        state = mb.cast(x=mb.squeeze(x=state, axes=[0]), dtype=_dtype_name(dtype))  # [H, Dk, Dv]
        tokens = mb.gather(x=mb.shape(x=v), indices=0, axis=0)
        heads, dk, dv = (int(d) for d in state.shape)
        out = mb.fill(shape=mb.shape(x=v), value=0.0)
        out = mb.cast(x=out, dtype=_dtype_name(dtype))

        def condition(i, s, acc):
            return mb.less(x=i, y=tokens)

        def body(i, s, acc):
            q_t = mb.reshape(x=mb.gather(x=q, indices=i, axis=0), shape=[heads, 1, dk])
            k_t = mb.gather(x=k, indices=i, axis=0)  # [H, Dk]
            v_t = mb.gather(x=v, indices=i, axis=0)  # [H, Dv]
            decay = mb.reshape(x=mb.exp(x=mb.gather(x=g, indices=i, axis=0)), shape=[heads, 1, 1])
            rate = mb.reshape(x=mb.gather(x=beta, indices=i, axis=0), shape=[heads, 1])
            s = mb.mul(x=s, y=decay)
            memory = mb.reshape(x=mb.matmul(x=mb.reshape(x=k_t, shape=[heads, 1, dk]), y=s), shape=[heads, dv])
            delta = mb.mul(x=mb.sub(x=v_t, y=memory), y=rate)
            s = mb.add(x=s, y=mb.mul(x=mb.reshape(x=k_t, shape=[heads, dk, 1]),
                                     y=mb.reshape(x=delta, shape=[heads, 1, dv])))
            o_t = mb.mul(x=mb.reshape(x=mb.matmul(x=q_t, y=s), shape=[1, heads, dv]), y=scale)
            acc = mb.scatter(data=acc, indices=mb.reshape(x=i, shape=[1]), updates=o_t, axis=0, mode="update")
            return mb.add(x=i, y=1), s, acc

        _, final_state, result = mb.while_loop(_cond=condition, _body=body, loop_vars=(0, state, out))
        result = mb.expand_dims(x=result, axes=[0], name=node.name + "_out")
        final_state = mb.expand_dims(x=mb.cast(x=final_state, dtype="fp32"), axes=[0], name=node.name + "_state")
        context.add((result, final_state), torch_name=node.name)


def _dtype_name(dtype) -> str:
    from coremltools.converters.mil.mil import types

    return {types.fp16: "fp16", types.fp32: "fp32"}[dtype]
