"""The PyTorch reference every check compares against: logits step by step, and greedy generation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from cpm_mobile.exporter.models.transformer import CausalLM


@dataclass
class ReferenceRun:
    """What the reference computed for one prompt: prompt logits, then one row per decoded token."""

    prompt: list[int]
    generated: list[int]
    prefill_logits: torch.Tensor  # [T, V]
    decode_logits: torch.Tensor  # [N, V]: logits after feeding generated[i]


@torch.no_grad()
def prompt_logits(model: CausalLM, tokens: Sequence[int]) -> torch.Tensor:
    """Logits [T, V] of one full-sequence forward from an empty cache."""
    model.reset_cache()
    return model(torch.tensor([list(tokens)]), torch.tensor([0]))[0]


@torch.no_grad()
def greedy_generate(
    model: CausalLM, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> ReferenceRun:
    """Prefill the prompt, then decode one token at a time with the KV cache, argmax each step.

    Stops after max_new_tokens, at a stop id (kept), or when the cache is full.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    budget = min(max_new_tokens, model.max_seq_len - len(prompt))
    if budget < 0:
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_seq_len {model.max_seq_len}")
    model.reset_cache()
    prefill = model(torch.tensor([list(prompt)]), torch.tensor([0]))[0]
    generated: list[int] = []
    decode_rows: list[torch.Tensor] = []
    next_logits = prefill[-1]
    for step in range(budget):
        token = int(next_logits.argmax())
        generated.append(token)
        if token in stop_ids or step == budget - 1 or len(prompt) + len(generated) >= model.max_seq_len:
            break
        position = len(prompt) + len(generated) - 1
        next_logits = model(torch.tensor([[token]]), torch.tensor([position]))[0, -1]
        decode_rows.append(next_logits)
    decode = torch.stack(decode_rows) if decode_rows else prefill.new_zeros((0, prefill.shape[-1]))
    return ReferenceRun(list(prompt), generated, prefill, decode)
