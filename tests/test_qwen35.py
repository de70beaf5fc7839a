"""Qwen3.5 hybrid backbones (Gated DeltaNet + gated attention): intake, the module against transformers'
own classes, and the .pte / .onnx through their own state against transformers (prefill, decode, rewind,
greedy generation, speculative decoding)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import transformers
from transformers.models.qwen3_5 import modeling_qwen3_5

from conftest import short_recipe, train_test_tokenizer
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.kernels import ops
from cpm_mobile.exporter.kernels.gated_delta_chunked import gated_delta_chunked
from cpm_mobile.exporter.models import ModelConfig, load_model
from cpm_mobile.runtimes.base import open_session

# Small but complete: grouped value heads (4 value heads over 2 key heads), partial rotary (32 x 0.25),
# GQA 4/2 in the gated attention layers, and the default 3:1 layer pattern plus a trailing linear layer.
TINY_TEXT = dict(
    vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=5, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=32, linear_value_head_dim=16, linear_conv_kernel_dim=4, max_position_embeddings=1024,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention", "linear_attention"],
)
# The bundles' check plan: shorter than the shipped one (the tolerances stay the shipped ones).
CHECK_PLAN = dict(max_new_tokens=24, heldout_windows=4, heldout_tokens=64)
PROMPT = [1, 17, 42, 300, 5, 99, 123, 2, 60, 311, 42, 7, 250, 8, 9, 10, 11, 12, 13, 14, 101, 102, 103, 7, 7]


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norms away from their identity init and weights scaled up, so every parameter shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(("A_log", "dt_bias")):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
            elif parameter.dim() >= 2:
                parameter.mul_(3.0)
    return model.eval()


def qwen35_checkpoint(folder: Path, seed: int = 0, **changes) -> Path:
    torch.manual_seed(seed)
    config = transformers.Qwen3_5TextConfig(**{**TINY_TEXT, **changes}, bos_token_id=1, eos_token_id=2)
    _perturbed(transformers.Qwen3_5ForCausalLM(config), seed).save_pretrained(folder)
    return folder


def reference(folder: Path) -> torch.nn.Module:
    return transformers.Qwen3_5ForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = qwen35_checkpoint(tmp_path_factory.mktemp("qwen35"))
    return train_test_tokenizer(folder)


@pytest.fixture(scope="module")
def expected(checkpoint) -> torch.Tensor:
    with torch.no_grad():
        logits = reference(checkpoint)(torch.tensor([PROMPT])).logits[0]
    assert logits.abs().max() > 2.0  # not near-zero logits that anything would match
    return logits


def test_config_reads_the_hybrid_fields(checkpoint):
    config = ModelConfig.from_file(checkpoint / "config.json")
    assert config.family == "qwen3_5" and config.is_hybrid
    assert config.layer_types == tuple(TINY_TEXT["layer_types"])
    la = config.linear_attention
    assert (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim, la.conv_kernel) == (2, 4, 32, 16, 4)
    assert la.conv_dim == 2 * 64 + 64
    assert config.rotary_dim == 8 and config.attention_output_gate and config.qk_norm
    assert not config.tie_word_embeddings


def test_config_defaults_are_transformers_defaults():
    """A config.json that leaves fields out means transformers' Qwen3_5TextConfig defaults."""
    config = ModelConfig.from_hf_dict({"model_type": "qwen3_5_text", "num_hidden_layers": 8})
    theirs = transformers.Qwen3_5TextConfig(num_hidden_layers=8)
    assert config.layer_types == tuple(theirs.layer_types)
    assert (config.head_dim, config.num_heads, config.num_kv_heads) == (theirs.head_dim, 16, 4)
    assert config.linear_attention.num_value_heads == theirs.linear_num_value_heads
    assert config.rotary_dim == int(theirs.head_dim * theirs.rope_parameters["partial_rotary_factor"])


@pytest.mark.parametrize("change,message", [
    ({"layer_types": ["linear_attention"] * 3 + ["sliding_attention"]}, "'sliding_attention'"),
    ({"layer_types": ["linear_attention"]}, "must list 4 layer kinds"),
    ({"linear_num_value_heads": 3}, "not a multiple of linear_num_key_heads"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"linear_conv_kernel_dim": 1}, "must be at least 2"),
])
def test_unsupported_fields_are_refused_by_name(change, message):
    raw = {"model_type": "qwen3_5_text", "num_hidden_layers": 4, **change}
    with pytest.raises(InputError, match=message):
        ModelConfig.from_hf_dict(raw)


def test_module_matches_transformers_in_prefill_decode_and_restart(checkpoint, expected):
    model, _ = load_model(checkpoint, max_seq_len=64)
    tokens = torch.tensor([PROMPT])
    scale = expected.abs().max()
    with torch.no_grad():
        prefill = model(tokens, torch.tensor([0]))[0]
        split = [model(tokens[:, :15], torch.tensor([0]))[0]]
        split += [model(tokens[:, t:t + 1], torch.tensor([t]))[0] for t in range(15, len(PROMPT))]
        again = model(tokens, torch.tensor([0]))[0]  # position 0 starts a new sequence: the state resets
    for logits in (prefill, torch.cat(split), again):
        assert (logits - expected).abs().max() / scale < 1e-5


@pytest.mark.parametrize("length", [1, 7, 8, 64, 150])
def test_recurrence_and_chunked_form_match_transformers(length):
    """The op's definition (token by token) and its eager chunked form against transformers' chunked prefill
    (several 64-token chunks, from a non-zero state), on both sides of the length where the op switches form."""
    torch.manual_seed(length)
    heads, dk, dv = 3, 16, 8
    q, k = (torch.nn.functional.normalize(torch.randn(1, length, heads, dk), dim=-1) for _ in range(2))
    v = torch.randn(1, length, heads, dv)
    g = -torch.rand(1, length, heads) * 0.5
    beta = torch.rand(1, length, heads)
    state = torch.randn(1, heads, dk, dv)
    theirs, theirs_state = modeling_qwen3_5.torch_chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=False)
    for form in (ops.gated_delta_rule, ops.gated_delta_recurrence, gated_delta_chunked):
        ours, ours_state = form(q, k, v, g, beta, state, dk**-0.5)
        assert (ours - theirs).abs().max() < 1e-4 and (ours_state - theirs_state).abs().max() < 1e-4, form


def _wrapped_folder(folder: Path, kind: str) -> tuple[Path, torch.nn.Module]:
    """A vision-language folder as transformers saves it, with random weights; its text model's logits."""
    text = {**TINY_TEXT, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(1)
    if kind == "qwen3_5":
        config = transformers.Qwen3_5Config(text_config=text, vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128, patch_size=4,
            spatial_merge_size=2, temporal_patch_size=2))
        model = transformers.Qwen3_5ForConditionalGeneration(config)
    else:
        config = transformers.MiniCPMV4_6Config(text_config=text, vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=8))
        model = transformers.MiniCPMV4_6ForConditionalGeneration(config)
    _perturbed(model, 1).save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("kind", ["qwen3_5", "minicpmv4_6"])
def test_vision_language_folders_load_their_text_model(tmp_path, kind):
    folder, model = _wrapped_folder(tmp_path / kind, kind)
    assert json.loads((folder / "config.json").read_text())["model_type"] == kind
    ours, checkpoint = load_model(folder, max_seq_len=64)
    assert checkpoint.config.weight_prefix == "model.language_model."
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor([PROMPT])).logits[0]
        logits = ours(torch.tensor([PROMPT]), torch.tensor([0]))[0]
    assert theirs.abs().max() > 1.0
    assert (logits - theirs).abs().max() / theirs.abs().max() < 1e-5


def test_onnx_schema_of_linear_attention_is_onnxruntimes():
    """The schema the ONNX translation binds with (built by hand: onnx does not ship contrib schemas)
    names the inputs, outputs and attributes onnxruntime's own LinearAttention has."""
    import onnxruntime.capi.onnxruntime_pybind11_state as ort_state

    from cpm_mobile.exporter.targets.onnx.linear_attention import LINEAR_ATTENTION_SCHEMA as ours

    theirs = next(s for s in ort_state.get_all_operator_schema()
                  if s.domain == "com.microsoft" and s.name == "LinearAttention")
    assert [p.name for p in ours.inputs] == [p.name for p in theirs.inputs]
    assert [p.name for p in ours.outputs] == [p.name for p in theirs.outputs]
    assert set(ours.attributes) <= set(theirs.attributes)


# -- the artifacts -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    from cpm_mobile.exporter.pipeline import export_bundle

    result = export_bundle(checkpoint, short_recipe("fp32", max_seq_len=64, **CHECK_PLAN), tmp_path_factory.mktemp("bundles"))
    assert result.passed, result.report
    return result.bundle


def _artifacts(bundle: Path) -> dict[str, dict]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {artifact["target"]: artifact for artifact in manifest["artifacts"]}


# Core ML keeps every state in fp16 (KV cache, conv and recurrent state): its bound is the fp32 recipe's
# fidelity bound for it (5e-3 relative), measured here at ~5e-4.
BOUNDS = {"executorch": 2e-5, "onnx": 2e-5, "coreml": 5e-3}


@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml"])
def test_artifact_matches_transformers_through_its_own_state(bundle, expected, target):
    artifact = _artifacts(bundle)[target]
    assert artifact["io"]["recurrent"]["layers"] == [0, 1, 2, 4]
    session = open_session(bundle, artifact)
    scale = expected.abs().max().item()
    tokens = np.array(PROMPT, dtype=np.int64)
    prefill = session.forward(tokens, 0)
    session.reset()
    steps = [session.forward(tokens[:10], 0)] + [session.forward(tokens[t:t + 1], t) for t in range(10, len(PROMPT))]
    # Going back re-runs the kept tokens: the same logits as the first time.
    rewound = session.forward(tokens[18:], 18)
    for logits, want in ((prefill, expected), (np.concatenate(steps), expected), (rewound, expected[18:])):
        assert np.abs(logits - want.numpy()).max() / scale < BOUNDS[target]


@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml"])
def test_greedy_generation_equals_transformers(bundle, checkpoint, target):
    from cpm_mobile.exporter.generate import decode_tokens, greedy

    session = open_session(bundle, _artifacts(bundle)[target])
    ours = list(decode_tokens(session, PROMPT[:8], 0, 20, greedy))
    with torch.no_grad():
        theirs = reference(checkpoint).generate(torch.tensor([PROMPT[:8]]), max_new_tokens=20, do_sample=False,
                                                eos_token_id=None)[0, 8:].tolist()
    assert ours == theirs


@pytest.mark.parametrize("target", ["executorch", "onnx"])
def test_speculative_decoding_on_a_recurrent_state_is_exact(bundle, target):
    """Rejected drafts leave the state as if only the accepted tokens had been fed (Core ML: the same
    replay; its fp16 states would only add rounding to compare)."""
    from cpm_mobile.exporter.generate import decode_tokens, greedy
    from cpm_mobile.exporter.speculative import NgramDrafter, SpeculativeDecoder

    artifact = _artifacts(bundle)[target]
    plain = list(decode_tokens(open_session(bundle, artifact), PROMPT, 0, 24, greedy))
    decoder = SpeculativeDecoder(NgramDrafter(), draft_tokens=4)
    speculative = list(decoder(open_session(bundle, artifact), PROMPT, 0, 24, greedy))
    assert speculative == plain
    assert decoder.stats.drafted > decoder.stats.accepted  # some drafts were rejected: the state went back


def test_every_target_passes_its_check_on_the_hybrid_model(bundle):
    report = json.loads((bundle / "report.json").read_text())
    assert set(report["artifacts"]) == {"executorch", "onnx", "coreml"}
    assert all(entry["passed"] for entry in report["artifacts"].values())


def test_a_wrong_recurrence_fails_the_check(checkpoint, tmp_path, monkeypatch):
    """The gates see the recurrence: a graph whose LinearAttention drops the decay (update_rule "delta")
    is rejected against its twin."""
    from cpm_mobile.exporter.pipeline import export_bundle
    from cpm_mobile.exporter.targets.onnx import linear_attention

    def without_decay(q, k, v, g, beta, state, scale: float):
        packed = linear_attention.op.Constant(value_ints=[0, 0, -1])
        heads = q.shape[2]
        out, new_state = linear_attention._LINEAR_ATTENTION(
            linear_attention.op.Reshape(q, packed), linear_attention.op.Reshape(k, packed),
            linear_attention.op.Reshape(v, packed), state, None, linear_attention.op.CastLike(beta, v),
            q_num_heads=heads, kv_num_heads=heads, update_rule="delta", scale=scale)
        return linear_attention.op.Reshape(out, linear_attention.op.Shape(v)), new_state

    monkeypatch.setitem(linear_attention.TRANSLATIONS, torch.ops.cpm_mobile.gated_delta_rule.default, without_decay)
    result = export_bundle(checkpoint, short_recipe("fp32", targets=["onnx"], max_seq_len=64, **CHECK_PLAN), tmp_path)
    assert not result.passed
    faithfulness = result.report["artifacts"]["onnx"]["faithfulness"]
    assert faithfulness["passed"] is False and faithfulness["metrics"]["sqnr_db"] < 30
