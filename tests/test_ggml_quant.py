"""llama.cpp's Q8_0 / Q4_0 / Q6_K rounding in torch, bit for bit against llama.cpp's own code.

Q8_0 and Q4_0 are compared with the gguf package's numpy quantisers (ported from ggml-quants.c and
kept bit-exact with it by llama.cpp's CI); Q6_K, which gguf cannot quantise, with blocks that
llama-quantize itself wrote (tests/data/q6_k_llamacpp.npz, made by bench/ggml_parity.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models import CausalLM, ModelConfig
from bench.presets import preset_config
from bench import ggml
from tests.conftest import TINY_BLOCKFFN, TINY_GQA

DATA = Path(__file__).parent / "data"


def hard_weights() -> torch.Tensor:
    """Rows that hit every branch of the C code: all-zero blocks, +/- ties for the peak, values
    that land exactly on a rounding half, tiny and huge magnitudes, and plain Gaussian rows."""
    generator = torch.Generator().manual_seed(7)
    rows = [torch.randn(256, 512, generator=generator) * torch.rand(256, 1, generator=generator) * 4]
    rows.append(torch.zeros(1, 512))
    tie = torch.randn(1, 512, generator=generator) * 0.1
    tie[0, ::32], tie[0, 5::32] = 1.5, -1.5  # equal magnitudes of both signs: the first one wins
    rows.append(tie)
    halves = torch.randint(-16, 16, (4, 512), generator=generator).float() * 0.5 + 0.25
    halves[:, ::32] = 7.75  # d = 7.75/127 or 7.75/-8 makes many x/d land on .5
    rows.append(halves)
    rows.append(torch.randn(2, 512, generator=generator) * 1e-30)
    rows.append(torch.randn(2, 512, generator=generator) * 6e4)
    return torch.cat(rows)


def gguf_blocks(weight: torch.Tensor, qtype: GGMLQuantizationType, block_bytes: int) -> np.ndarray:
    return quants.quantize(weight.numpy(), qtype).reshape(-1, block_bytes)


def test_q8_0_matches_gguf_codes_and_scales():
    weight = hard_weights()
    mine = ggml.quantize_q8_0(weight)
    blocks = gguf_blocks(weight, GGMLQuantizationType.Q8_0, 34)
    assert np.array_equal(mine.d.reshape(-1).numpy().view(np.uint16), blocks[:, :2].copy().view(np.uint16).ravel())
    assert np.array_equal(mine.codes.reshape(-1, 32).numpy(), blocks[:, 2:].view(np.int8))
    assert np.array_equal(ggml.gguf_blocks(mine), blocks)
    values = quants.dequantize(blocks.reshape(weight.shape[0], -1), GGMLQuantizationType.Q8_0)
    assert np.array_equal(ggml.round_like_ggml(weight, "Q8_0").numpy(), values)


def test_q4_0_matches_gguf_codes_and_scales():
    weight = hard_weights()
    mine = ggml.quantize_q4_0(weight)
    blocks = gguf_blocks(weight, GGMLQuantizationType.Q4_0, 18)
    nibbles = blocks[:, 2:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)  # low nibbles hold j, high j + 16
    assert np.array_equal(mine.d.reshape(-1).numpy().view(np.uint16), blocks[:, :2].copy().view(np.uint16).ravel())
    assert np.array_equal(mine.codes.reshape(-1, 32).numpy(), codes)
    assert np.array_equal(ggml.gguf_blocks(mine), blocks)
    values = quants.dequantize(blocks.reshape(weight.shape[0], -1), GGMLQuantizationType.Q4_0)
    assert np.array_equal(ggml.round_like_ggml(weight, "Q4_0").numpy(), values)


def test_q4_0_takes_the_signed_peak_and_rounds_it_to_code_zero():
    block = torch.linspace(-0.5, 0.5, 32)
    block[3], block[9] = -2.0, 2.0  # tie in magnitude: the first (negative) one sets d = -2 / -8
    q = ggml.quantize_q4_0(block[None])
    assert q.d.item() == pytest.approx(0.25)
    assert q.codes[0, 0, 3].item() == 0 and q.codes[0, 0, 9].item() == 15  # +2 = 8 steps up, clamped to 15
    assert ggml.round_like_ggml(block[None], "Q4_0")[0, 9].item() == pytest.approx(1.75)


def test_q6_k_matches_llama_quantize_blocks():
    fixture = np.load(DATA / "q6_k_llamacpp.npz")
    weight = torch.from_numpy(fixture["weight"])
    blocks = fixture["blocks"]  # llama-quantize's Q6_K bytes: ql[128] qh[64] scales[16] d[2] per 256 values
    mine = ggml.quantize_q6_k(weight)
    assert np.array_equal(mine.d.reshape(-1).numpy().view(np.uint16), blocks[:, 208:].copy().view(np.uint16).ravel())
    assert np.array_equal(mine.scales.reshape(-1, 16).numpy(), blocks[:, 192:208].view(np.int8))
    assert np.array_equal(ggml.gguf_blocks(mine), blocks)
    values = quants.dequantize(blocks.reshape(weight.shape[0], -1), GGMLQuantizationType.Q6_K)
    assert np.array_equal(ggml.round_like_ggml(weight, "Q6_K").numpy(), values)
    assert 0.002 < np.abs(values - fixture["weight"]).mean() / np.abs(fixture["weight"]).mean() < 0.05


def _tiny(hidden: int = 128, **extra) -> CausalLM:
    config = preset_config("minicpm4-0.5b", **{**TINY_GQA, "hidden_size": hidden, "vocab_size": 96, **extra})
    model = CausalLM(ModelConfig.from_hf_dict(config), 16)
    model.tie_embeddings()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights at the scale of trained ones, so logits are not one-hot
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=generator) / (12 if "embed" in name else p.shape[-1] ** 0.5))
    return model.eval()


def test_types_follow_llama_quantize_defaults():
    # llama-quant.cpp: the tied embedding is the output; Q4_0 keeps it at Q6_K when rows are a
    # multiple of 256, else Q8_0; Q8_0 keeps it at Q8_0; --pure quantises it like the rest.
    wide = ggml.tensor_types(_tiny(hidden=256), "Q4_0")
    assert wide["embed_tokens.weight"] == "Q6_K" and "lm_head.weight" not in wide
    assert wide["layers.0.self_attn.q_proj.weight"] == "Q4_0" and wide["layers.1.mlp.down_proj.weight"] == "Q4_0"
    assert not any("norm" in name for name in wide)
    assert ggml.tensor_types(_tiny(hidden=128), "Q4_0")["embed_tokens.weight"] == "Q8_0"
    assert ggml.tensor_types(_tiny(hidden=256), "Q8_0")["embed_tokens.weight"] == "Q8_0"
    assert set(ggml.tensor_types(_tiny(hidden=256), "Q4_0", pure=True).values()) == {"Q4_0"}


def test_untied_output_and_fallbacks():
    model = CausalLM(ModelConfig.from_hf_dict(preset_config(
        "minicpm4-0.5b", **{**TINY_GQA, "hidden_size": 256, "vocab_size": 96, "tie_word_embeddings": False})), 16)
    types = ggml.tensor_types(model, "Q4_0")
    assert types["embed_tokens.weight"] == "Q4_0" and types["lm_head.weight"] == "Q6_K"
    odd = ggml.tensor_types(_tiny(hidden=48, num_attention_heads=2, num_key_value_heads=1), "Q4_0")
    assert odd["embed_tokens.weight"] == "F16" and odd["layers.0.self_attn.q_proj.weight"] == "F16"
    assert odd["layers.0.mlp.down_proj.weight"] == "Q4_0"  # intermediate 256: a multiple of 32


def test_blockffn_router_stays_fp32_like_llama_cpp_moe_routers():
    config = preset_config("blockffn-small", **{**TINY_BLOCKFFN, "vocab_size": 96})
    types = ggml.tensor_types(CausalLM(ModelConfig.from_hf_dict(config), 16), "Q4_0", pure=True)
    assert types["layers.0.mlp.router_proj.weight"] == "F32"
    assert types["layers.0.mlp.up_proj.weight"] == "Q4_0"


def test_rounded_copy_keeps_the_tie_and_leaves_the_model_alone():
    model = _tiny(hidden=256)
    before = {name: p.clone() for name, p in model.named_parameters()}
    rounded = ggml.llamacpp_rounded(model, "Q4_0")
    assert rounded.lm_head.weight is rounded.embed_tokens.weight
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert torch.equal(rounded.embed_tokens.weight, ggml.round_like_ggml(model.embed_tokens.weight, "Q6_K"))
    q = rounded.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, ggml.round_like_ggml(model.layers[0].self_attn.q_proj.weight, "Q4_0"))
    assert len(torch.unique(q[0, :32])) <= 16  # 4 bits per block
    assert torch.equal(rounded.norm.weight, model.norm.weight)
    tokens, pos = torch.arange(8)[None], torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        reference = torch.log_softmax(model(tokens, pos), -1)
        q8 = torch.log_softmax(ggml.llamacpp_rounded(model, "Q8_0")(tokens, pos), -1)
        q4 = torch.log_softmax(rounded(tokens, pos), -1)
    kl = lambda p: torch.sum(reference.exp() * (reference - p), -1).mean().item()  # noqa: E731
    assert 0 < kl(q8) < kl(q4)


def test_unknown_ftype_is_an_input_error():
    with pytest.raises(InputError, match="Q5_K.*allowed: Q8_0, Q4_0"):
        ggml.tensor_types(_tiny(), "Q5_K")
