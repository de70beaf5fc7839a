"""CausalLM: one export-friendly decoder for MiniCPM 1B/2B, MiniCPM4, MiniCPM3 (MLA) and BlockFFN.

Contract: forward(tokens int64[1, T], input_pos int64[1]) -> logits float[1, T, V], with a static
KV cache of max_seq_len held as buffers. No Python-side state and no data-dependent branches,
so torch.export captures one graph with a dynamic T.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.attention import Attend, build_attention
from cpm_mobile.exporter.models.config import ModelConfig
from cpm_mobile.exporter.models.ffn import build_ffn
from cpm_mobile.exporter.models.kv_cache import StaticKVCache, causal_mask
from cpm_mobile.exporter.models.linear_attention import GatedDeltaNet, LinearAttentionState
from cpm_mobile.exporter.models.norm import RMSNorm
from cpm_mobile.exporter.models.rope import exact_rope_limit, rope_tables


class DecoderLayer(nn.Module):
    """Token mixer + FFN. The mixer is softmax attention (`self_attn`, given an Attend over its KV
    cache) or, in hybrid backbones, Gated DeltaNet (`linear_attn`, given its Recurrence)."""

    def __init__(self, config: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.linear = config.layer_kind(index) == "linear_attention"
        if self.linear:
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = build_attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = build_ffn(config)
        self.residual_scale = config.residual_scale

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = self.input_layernorm(h)
        mixed = self.linear_attn(x, attend) if self.linear else self.self_attn(x, cos, sin, attend)
        h = h + mixed * self.residual_scale
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale


def max_supported_seq_len(config: ModelConfig) -> int:
    """Longest cache this module computes exactly as the original model does."""
    return _seq_len_limit(config)[0]


def _seq_len_limit(config: ModelConfig) -> tuple[int, str | None]:
    limit, reason = config.max_position_embeddings, None
    if config.sparse_attention is not None and config.sparse_attention.dense_len < limit:
        # InfLLM v2 switches to block-sparse attention above dense_len; we implement the dense part.
        limit = config.sparse_attention.dense_len
        reason = f"InfLLM v2 sparse attention above dense_len={limit} is not implemented"
    rope_limit = exact_rope_limit(config)
    if rope_limit is not None and rope_limit[0] <= limit:
        limit, reason = rope_limit[0], f"{rope_limit[1]}, which a static cache cannot reproduce"
    return limit, reason


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_seq_len: int = 512, dtype: torch.dtype = torch.float32):
        super().__init__()
        limit, why = _seq_len_limit(config)
        if not 0 < max_seq_len <= limit:
            reason = why if why is not None and max_seq_len > limit else f"must be in 1..{limit}"
            raise InputError("max_seq_len", f"{max_seq_len} not supported: {reason}")
        self.config = config
        self.max_seq_len = max_seq_len
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tied = False
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        scale = config.qk_head_dim**-0.5
        # One state per layer: a KV cache for attention layers, conv + recurrent state for linear ones.
        self.kv_caches = nn.ModuleList(
            LinearAttentionState(config.linear_attention, dtype) if config.layer_kind(i) == "linear_attention"
            else StaticKVCache(config.cache_heads, config.k_head_dim, config.value_head_dim, max_seq_len, scale, dtype)
            for i in range(config.num_layers)
        )
        self.to(dtype)

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        return rope_tables(config.rope, config.rotary_dim, config.max_position_embeddings, self.max_seq_len)

    def init_buffers(self) -> None:
        """Real rope tables and empty caches, for a module whose weights were assigned from a checkpoint."""
        self.rope_cos, self.rope_sin = self._rope_tables()
        for cache in self.kv_caches:
            for name, buffer in cache.named_buffers():
                setattr(cache, name, torch.zeros(buffer.shape, dtype=buffer.dtype))

    def tie_embeddings(self) -> None:
        self.lm_head.weight = self.embed_tokens.weight
        self.tied = True

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.forward_embeddings(self.embed(tokens), input_pos)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> the first layer's input (a vision-language model puts image embeddings beside these)."""
        return self.embed_tokens(tokens) * self.config.scale_emb

    def forward_embeddings(self, h: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """The stack from embeddings [1, T, hidden] at positions input_pos.. through this model's own state."""
        positions = input_pos + torch.arange(h.shape[1], dtype=input_pos.dtype, device=input_pos.device)
        mask = causal_mask(positions, self.max_seq_len)
        attends = [bind_state(cache, positions, mask) for cache in self.kv_caches]
        return self.decode_embeddings(h, positions, attends)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, attends: Sequence[Attend]) -> torch.Tensor:
        """The stack with an explicit attend per layer: targets pass their own cache forms here."""
        return self.decode_embeddings(self.embed(tokens), positions, attends)

    def decode_embeddings(self, h: torch.Tensor, positions: torch.Tensor, attends: Sequence[Attend]) -> torch.Tensor:
        cos = self.rope_cos.index_select(0, positions)
        sin = self.rope_sin.index_select(0, positions)
        for layer, attend in zip(self.layers, attends):
            h = layer(h, cos, sin, attend)
        return self.lm_head(self.norm(h) / self.config.logits_divisor)

    def reset_cache(self) -> None:
        for cache in self.kv_caches:
            cache.reset()


def bind_state(cache: nn.Module, positions: torch.Tensor, mask: torch.Tensor) -> Attend:
    """What a layer's mixer gets for this call: an Attend over its KV cache, or its linear-attention state."""
    if isinstance(cache, LinearAttentionState):  # in whichever form a target holds it
        return cache.bind(positions)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return cache(q, k, v, positions, mask)

    return attend
