"""The gated delta rule over T tokens in chunks: the eager form of cpm_mobile::gated_delta_rule for long calls.

The token-by-token recurrence (ops.gated_delta_recurrence) is the definition and what the kernels compute; in eager
PyTorch it is a Python loop of small ops per token, which makes twins, references and GPTQ calibration on 256-token
windows of a deep hybrid model take minutes. The chunked form (Yang et al., "Gated Delta Networks", 2024; the form
of transformers' torch_chunk_gated_delta_rule) computes the same sums with matrix products per chunk of C tokens:
inside a chunk, the WY representation of the C rank-one updates is (I + L)^-1 with L strictly lower triangular,
solved here with torch.linalg.solve_triangular (transformers runs the same forward substitution row by row); the
state is carried from chunk to chunk. Layout and dtypes as the op: [1, T, H, D] in and out, fp32 arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64


def gated_delta_chunked(q, k, v, g, beta, state, scale: float, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = v.dtype
    q, k, v = (x[0].float().transpose(0, 1) for x in (q, k, v))  # [H, T, D]
    g, beta = (x[0].float().transpose(0, 1) for x in (g, beta))  # [H, T]
    s = state[0].float()  # [H, Dk, Dv]
    heads, length = q.shape[:2]
    pad = (-length) % chunk
    # padded tokens have beta 0 and decay exp(0) = 1: they leave the state as it is
    q, k, v = (F.pad(x, (0, 0, 0, pad)).reshape(heads, -1, chunk, x.shape[-1]) for x in (q * scale, k, v))
    g, beta = (F.pad(x, (0, pad)).reshape(heads, -1, chunk) for x in (g, beta))
    g = g.cumsum(-1)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    # decay from token j to token i of a chunk (i >= j), 0 above the diagonal; tril before exp keeps it finite
    decay = (g[..., :, None] - g[..., None, :]).tril().exp().tril()
    lower = ((k_beta @ k.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(chunk, dtype=lower.dtype)
    inverse = torch.linalg.solve_triangular(eye + lower, eye.expand_as(lower), upper=False, unitriangular=True)
    u = inverse @ v_beta
    w = inverse @ (k_beta * g.exp()[..., None])
    outs = []
    for c in range(q.shape[1]):
        q_c, k_c, g_c = q[:, c], k[:, c], g[:, c]
        v_new = u[:, c] - w[:, c] @ s
        within = (q_c @ k_c.transpose(-1, -2)) * decay[:, c]
        outs.append((q_c * g_c.exp()[..., None]) @ s + within @ v_new)
        to_end = (g_c[:, -1:] - g_c).exp()[..., None]
        s = s * g_c[:, -1].exp()[:, None, None] + (k_c * to_end).transpose(-1, -2) @ v_new
    out = torch.cat(outs, dim=1)[:, :length]
    return out.transpose(0, 1)[None].to(dtype), s[None].to(state.dtype)
