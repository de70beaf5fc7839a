"""MiniCPM5 / plain Llama checkpoints: config fields, every rope_scaling type, parity with transformers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import transformers
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models import ModelConfig, greedy_generate, load_model, prompt_logits
from bench.synthetic import llama_config, random_state, write_checkpoint

# Tiny but complete: GQA 4/2, head_dim 48 that is not hidden/heads, so a wrong default shows.
TINY_LLAMA = dict(
    num_hidden_layers=2, hidden_size=128, head_dim=48, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=256, vocab_size=512, rms_norm_eps=1e-5,
)
PROMPT = [1, 17, 42, 300, 5, 99, 123, 2, 60, 311, 42, 7, 500, 8, 9, 10, 11, 12, 13, 14]

ROPE_TYPES = {
    "default": (64, None),
    "linear": (64, {"rope_type": "linear", "factor": 4.0}),
    "dynamic": (64, {"rope_type": "dynamic", "factor": 4.0}),
    "llama3": (256, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 32}),
    "yarn": (256, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                   "beta_slow": 1}),
    "yarn-mscale": (256, {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 0.707,
                          "mscale_all_dim": 1.0, "truncate": False}),
    # max_position_embeddings past the original context: transformers uses the short factors (the
    # sequence fits the original context) with the attention factor of 128/32.
    "longrope": (128, {"rope_type": "longrope", "original_max_position_embeddings": 32,
                       "short_factor": [1.0 + 0.25 * i for i in range(24)],
                       "long_factor": [3.0 + 2.0 * i for i in range(24)]}),
}


def _checkpoint(folder, rope_type="default", tied=False, bias=False, rope_theta=10000.0, seed=0):
    positions, scaling = ROPE_TYPES[rope_type]
    config = llama_config(
        **TINY_LLAMA, max_position_embeddings=positions, rope_scaling=scaling, rope_theta=rope_theta,
        tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias,
    )
    return write_checkpoint(folder, config, random_state(config, seed), dtype="float32")


def _transformers_llama(folder) -> torch.nn.Module:
    """transformers' own LlamaForCausalLM from the same config.json and weights."""
    config = transformers.LlamaConfig.from_pretrained(folder)
    model = transformers.LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "eager"
    missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _max_error(folder, tokens, max_seq_len):
    ours, checkpoint = load_model(folder, max_seq_len=max_seq_len)
    with torch.no_grad():
        expected = _transformers_llama(folder)(torch.tensor([tokens])).logits[0]
    actual = prompt_logits(ours, tokens)
    assert expected.abs().max() > 1.0  # not two near-zero tensors
    return (actual - expected).abs().max().item(), ours


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_every_rope_type_matches_transformers_llama(tmp_path, rope_type):
    folder = _checkpoint(tmp_path / "ckpt", rope_type)
    assert ModelConfig.from_file(folder / "config.json").rope.kind == rope_type.split("-")[0]
    error, _ = _max_error(folder, PROMPT, max_seq_len=32)
    assert error <= 1e-4, error


@pytest.mark.parametrize("tied,bias", [(False, True), (True, False), (True, True)])
def test_tied_untied_and_biases_match_transformers_llama(tmp_path, tied, bias):
    folder = _checkpoint(tmp_path / "ckpt", "llama3", tied=tied, bias=bias)
    names = set(load_file(folder / "model.safetensors"))
    assert ("lm_head.weight" in names) is not tied
    assert ("model.layers.0.self_attn.o_proj.bias" in names) is bias
    assert ("model.layers.1.mlp.down_proj.bias" in names) is bias
    error, ours = _max_error(folder, PROMPT, max_seq_len=32)
    assert ours.tied is tied and error <= 1e-4, error


def test_biases_change_the_logits(tmp_path):
    """Control for the bias parity: dropping the checkpoint's biases moves the logits far past the bound."""
    folder = _checkpoint(tmp_path / "ckpt", "default", bias=True)
    with_bias, _ = load_model(folder, max_seq_len=32)
    without = _checkpoint(tmp_path / "plain", "default", bias=False)  # same seed: same weights, no biases
    plain, _ = load_model(without, max_seq_len=32)
    assert (prompt_logits(with_bias, PROMPT) - prompt_logits(plain, PROMPT)).abs().max() > 1e-2


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_matches_transformers_at_the_longest_cache(tmp_path, rope_type):
    """dynamic NTK and transformers' LongRoPE are exact up to the cache limit, decode included."""
    folder = _checkpoint(tmp_path / "ckpt", rope_type)
    limit = 64 if rope_type == "dynamic" else 32
    tokens = (PROMPT * 4)[: limit - 8]
    ours, _ = load_model(folder, max_seq_len=limit)
    run = greedy_generate(ours, tokens, 8)
    full = tokens + run.generated[:-1]
    assert len(full) == limit - 1
    with torch.no_grad():
        expected = _transformers_llama(folder)(torch.tensor([full])).logits[0]
    ours_logits = torch.cat([run.prefill_logits, run.decode_logits])
    assert (ours_logits - expected).abs().max().item() <= 1e-4
    with pytest.raises(InputError, match="static cache cannot reproduce"):
        load_model(folder, max_seq_len=limit + 1)


def test_theta_and_head_dim_are_read(tmp_path):
    config = ModelConfig.from_file(_checkpoint(tmp_path / "ckpt", rope_theta=500000.0) / "config.json")
    assert (config.family, config.head_dim, config.rope.theta) == ("llama", 48, 500000.0)
    assert not config.tie_word_embeddings  # LlamaConfig's default is an untied head


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"rope_type": "su"}}, "rope type 'su' is not supported"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs 'factor'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}}, "needs 'high_freq_factor'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
])
def test_unsupported_llama_fields_are_refused(change, message):
    with pytest.raises(InputError, match=message):
        ModelConfig.from_hf_dict(llama_config(**TINY_LLAMA, **change))


def test_quantization_config_stays_readable():
    quant = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    config = ModelConfig.from_hf_dict(llama_config(**TINY_LLAMA, quantization_config=quant))
    assert config.quantization_config == quant


def test_minicpm5_shape_counts_its_published_parameters():
    """The MiniCPM5-1B writer's shape reproduces the released parameter counts."""
    from cpm_mobile.exporter.models.loader import expected_shapes

    shapes = expected_shapes(ModelConfig.from_hf_dict(llama_config()))
    total = sum(torch.Size(s).numel() for s in shapes.values())
    embedding = sum(shapes[n].numel() for n in ("model.embed_tokens.weight", "lm_head.weight"))
    assert (total, total - embedding) == (1_080_632_832, 679_552_512)


def test_inspect_names_rope_and_biases(tmp_path):
    from cpm_mobile.exporter.inspect import summarize

    facts = summarize(_checkpoint(tmp_path / "ckpt", "yarn", bias=True))
    assert facts.family == "llama" and facts.biases == "attention, mlp"
    assert facts.rope == "yarn, theta 10000, factor 4, original context 64"
    assert facts.max_seq_len == 256 and facts.tied_embeddings is False


@pytest.mark.slow
def test_llama_checkpoint_exports_with_the_default_recipe(tmp_path, tokenizer_dir):
    """A Llama layout with biases, GQA, explicit head_dim and yarn rope through every target, check passed."""
    from cpm_mobile.exporter.pipeline import export_bundle
    from cpm_mobile.recipes import load_recipe
    from tests.conftest import with_tokenizer

    folder = with_tokenizer(_checkpoint(tmp_path / "ckpt", "yarn", bias=True), tokenizer_dir)
    result = export_bundle(folder, load_recipe("fp32"), tmp_path / "out")
    assert result.passed, {t: a["breaches"] for t, a in result.report["artifacts"].items()}
    assert set(result.report["artifacts"]) == {"executorch", "onnx", "coreml"}
    assert result.manifest["source"]["family"] == "llama"
    for target in ("executorch", "onnx"):
        assert result.report["artifacts"][target]["fidelity"]["metrics"]["max_abs_logits"] <= 1e-4


def test_rope_types_differ_from_plain_rope(tmp_path):
    """Control for the parity tests: each scaling type moves the logits (dynamic is plain by design here)."""
    plain, _ = load_model(_checkpoint(tmp_path / "default", "default"), max_seq_len=32)
    base = prompt_logits(plain, PROMPT)
    for rope_type in ROPE_TYPES:
        if rope_type == "default":
            continue
        ours, _ = load_model(_checkpoint(tmp_path / rope_type, rope_type), max_seq_len=32)
        moved = (prompt_logits(ours, PROMPT) - base).abs().max().item()
        assert (moved == 0.0) if rope_type == "dynamic" else (moved > 1e-3), (rope_type, moved)
