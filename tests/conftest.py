"""Shared fixtures: small synthetic checkpoints in the real layouts."""
from __future__ import annotations

import torch

torch.manual_seed(0)
torch.set_num_threads(2)

# Small but complete versions of the real shapes: every feature of the family, fewer/narrower layers.
TINY_GQA = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
TINY_MLA = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                q_lora_rank=64, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
TINY_BLOCKFFN = dict(TINY_MLA, num_experts=8, expert_size=16)
