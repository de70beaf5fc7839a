"""config.json contents of the real checkpoints' shapes (facts in shared/research/architecture.md).

Used by the synthetic checkpoint writer for tests and benchmarks; values that the research did
not pin down (LongRoPE factor values, context lengths) are plausible stand-ins, marked so.
"""
from __future__ import annotations

import copy
from typing import Any

MUP = {"scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4}


def _longrope_factors(count: int) -> list[float]:
    # Stand-in values: the real lists rise from ~1 for fast pairs to tens for slow ones.
    return [round(1.0 + 30.0 * (i / max(count - 1, 1)) ** 2, 4) for i in range(count)]


def _longrope(count: int, original: int) -> dict[str, Any]:
    factors = _longrope_factors(count)
    return {
        "rope_type": "longrope",
        "long_factor": factors,
        "short_factor": factors,
        "original_max_position_embeddings": original,
    }


def _minicpm(hidden, layers, heads, kv_heads, intermediate, vocab, eps, **extra) -> dict[str, Any]:
    return {
        "architectures": ["MiniCPMForCausalLM"],
        "model_type": "minicpm",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "rms_norm_eps": eps,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        **MUP,
        **extra,
    }


def _mla(hidden, layers, heads, vocab, **extra) -> dict[str, Any]:
    return {
        "q_lora_rank": 768,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": hidden // heads,
        **extra,
    }


def _blockffn(hidden, layers, heads, experts, expert_size) -> dict[str, Any]:
    return {
        "architectures": ["MiniCPMForCausalLM"],
        "model_type": "minicpm",
        "attention_type": "mla",
        "ffn_type": "block_linear",
        "router_act": "relu",
        "norm_after_router": "rms",
        "num_experts": experts,
        "expert_size": expert_size,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": 768,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "vocab_size": 122753,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        **MUP,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "minicpm-2b": _minicpm(2304, 40, 36, 36, 5760, 122753, 1e-5),
    "minicpm-1b": _minicpm(1536, 52, 24, 8, 3840, 73440, 1e-5),
    "minicpm4-0.5b": _minicpm(
        1024, 24, 16, 2, 4096, 73448, 1e-5, eos_token_id=[2, 73440], max_position_embeddings=32768,
        rope_scaling=_longrope(32, 32768),
    ),
    "minicpm4-8b": _minicpm(
        4096, 32, 32, 2, 16384, 73448, 1e-6, eos_token_id=[2, 73440], max_position_embeddings=32768,
        rope_scaling=_longrope(64, 32768),
        sparse_config={"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                       "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192},
    ),
    "minicpm3-4b": {
        **_minicpm(2560, 62, 40, 40, 6400, 73448, 1e-5, model_type="minicpm3", architectures=["MiniCPM3ForCausalLM"],
                   max_position_embeddings=32768, rope_scaling=_longrope(16, 32768)),
        **_mla(2560, 62, 40, 73448),
    },
    "blockffn-small": _blockffn(768, 16, 6, 48, 64),
    "blockffn-medium": _blockffn(1280, 27, 10, 40, 128),
    "blockffn-large": _blockffn(1536, 32, 12, 48, 128),
    "blockffn-xlarge": _blockffn(1792, 35, 14, 56, 128),
    # MiniCPM-V 4.6's LLM. Published: 24 layers (6 full attention, 3 linear to 1), hidden 1024, 8 query / 2 KV
    # heads, 262,144 positions, vocab 248,320, tied. Stand-ins where the research did not pin them: head_dim 256,
    # intermediate 3584, linear attention 16 key / 16 value heads of 128 (Qwen3.5's family values).
    "qwen3.5-0.8b": {
        "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "hidden_act": "silu",
        "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 256, "intermediate_size": 3584, "vocab_size": 248320, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144, "tie_word_embeddings": True, "bos_token_id": None,
        "eos_token_id": 248044, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
        "full_attention_interval": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    },
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A preset's config.json dict with fields overridden (e.g. fewer layers for a fast test).

    Shrinking hidden_size or heads keeps LongRoPE consistent: factor lists are resized to the
    new rotary dimension.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    config = copy.deepcopy(PRESETS[name])
    config.update(overrides)
    rope = config.get("rope_scaling")
    if rope and rope.get("rope_type") == "longrope":
        if "qk_rope_head_dim" in config:
            rotary = config["qk_rope_head_dim"]
        else:
            rotary = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
        if len(rope["short_factor"]) != rotary // 2:
            rope["short_factor"] = rope["long_factor"] = _longrope_factors(rotary // 2)
    return config
