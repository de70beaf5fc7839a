"""Parity with independent implementations: transformers' Llama (muP folded in) and MiniCPM3."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from cpm_mobile.exporter.models import load_model, prompt_logits
from bench.synthetic import write_synthetic_checkpoint
from tests.conftest import TINY_GQA, TINY_MLA

import transformers  # noqa: E402

TOKENS = [1, 17, 4242, 73000, 5, 99, 12345, 2, 600, 31337, 42, 7, 70000, 8, 9, 10, 11, 12, 13, 14]


def _longrope(count: int, original: int) -> dict:
    # Distinct short and long factors, so picking the wrong list fails the test.
    return {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.5 * i for i in range(count)],
        "long_factor": [2.0 + 3.0 * i for i in range(count)],
        "original_max_position_embeddings": original,
    }


def _llama_with_mup_folded(state: dict[str, torch.Tensor], config: dict) -> torch.nn.Module:
    """transformers' LlamaForCausalLM carrying MiniCPM's muP scalings in its weights."""
    layers = config["num_hidden_layers"]
    residual = config["scale_depth"] / math.sqrt(layers)
    divisor = config["hidden_size"] / config["dim_model_base"]
    rope = dict(config["rope_scaling"], rope_theta=config["rope_theta"])
    llama_config = transformers.LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config["max_position_embeddings"],
        rope_parameters=rope,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    folded = dict(state)
    folded["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * config["scale_emb"]
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    folded["lm_head.weight"] = head / divisor
    for name in state:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            folded[name] = state[name] * residual
    model = transformers.LlamaForCausalLM(llama_config).eval()
    model.config._attn_implementation = "eager"
    missing, unexpected = model.load_state_dict(folded, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_minicpm4_matches_transformers_llama_with_mup_folded(tmp_path, tied):
    folder = write_synthetic_checkpoint(
        tmp_path / "ckpt", "minicpm4-0.5b", dtype="float32", tie_word_embeddings=tied,
        max_position_embeddings=4096, rope_scaling=_longrope(16, 4096), **TINY_GQA,
    )
    ours, checkpoint = load_model(folder, max_seq_len=64)
    assert checkpoint.tied is tied
    config = __import__("json").loads((folder / "config.json").read_text())
    reference = _llama_with_mup_folded(load_file(folder / "model.safetensors"), config)
    with torch.no_grad():
        expected = reference(torch.tensor([TOKENS])).logits[0]
    actual = prompt_logits(ours, TOKENS)
    assert expected.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    assert (actual - expected).abs().max().item() <= 1e-4


def test_longrope_factors_matter(tmp_path):
    """Control: with other factors the logits move far past the parity bound."""
    base = dict(dtype="float32", max_position_embeddings=4096, **TINY_GQA)
    a, _ = load_model(write_synthetic_checkpoint(tmp_path / "a", "minicpm4-0.5b", rope_scaling=_longrope(16, 4096), **base), 64)
    b, _ = load_model(write_synthetic_checkpoint(tmp_path / "b", "minicpm4-0.5b", **base), 64)
    assert (prompt_logits(a, TOKENS) - prompt_logits(b, TOKENS)).abs().max() > 1e-2


def test_mla_matches_transformers_minicpm3(tmp_path):
    folder = write_synthetic_checkpoint(
        tmp_path / "ckpt", "minicpm3-4b", dtype="float32", max_position_embeddings=4096,
        rope_scaling=_longrope(4, 4096), intermediate_size=256, **TINY_MLA,
    )
    ours, _ = load_model(folder, max_seq_len=64)
    config = __import__("json").loads((folder / "config.json").read_text())
    hf_config = transformers.MiniCPM3Config(
        **{k: v for k, v in config.items() if k not in ("rope_scaling", "architectures", "model_type", "torch_dtype")},
        rope_parameters=dict(config["rope_scaling"], rope_theta=config["rope_theta"]),
    )
    reference = transformers.MiniCPM3ForCausalLM(hf_config).eval()
    reference.config._attn_implementation = "eager"
    missing, unexpected = reference.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    reference.tie_weights()
    with torch.no_grad():
        expected = reference(torch.tensor([TOKENS])).logits[0]
    actual = prompt_logits(ours, TOKENS)
    assert expected.abs().max() > 1.0
    assert (actual - expected).abs().max().item() <= 1e-4
