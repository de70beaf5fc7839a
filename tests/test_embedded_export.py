"""The shipped models through every target with the built-in recipes, and through the apps' own runners."""
from __future__ import annotations

import numpy as np
import pytest

from exporter.defaults import DEFAULT_MODEL, DEFAULT_SPARSE_MODEL
from exporter.pipeline import export_bundle
from exporter.tokenizer import TextTokenizer
from recipes import load_recipe

FIXTURES = {"minicpm-tiny": DEFAULT_MODEL, "blockffn-tiny": DEFAULT_SPARSE_MODEL}


@pytest.fixture(scope="module", params=list(FIXTURES))
def fp32_bundle(request, tmp_path_factory):
    result = export_bundle(FIXTURES[request.param], load_recipe("fp32"), tmp_path_factory.mktemp("out"))
    return request.param, result


def test_fp32_bundle_passes_on_every_target(fp32_bundle):
    name, result = fp32_bundle
    assert result.passed, result.report
    artifacts = result.report["artifacts"]
    assert set(artifacts) == {"executorch", "onnx", "coreml"}
    for target in ("executorch", "onnx"):
        metrics = artifacts[target]["fidelity"]["metrics"]
        assert metrics["max_abs_logits"] <= 1e-4, (target, metrics)
        assert metrics["greedy_tokens"] == [64, 64, 64]
        assert metrics["greedy_prefix_tokens"] == [64, 64, 64]  # identical 64-token continuations
    coreml = artifacts["coreml"]["fidelity"]["metrics"]
    assert coreml["greedy_prefix_tokens"] == coreml["greedy_tokens"] and coreml["kl"] <= 1e-4
    # Against its fp16-cache twin the program is held to <= 5e-4 (absolute, at these logit scales).
    assert artifacts["coreml"]["faithfulness"]["metrics"]["max_abs_logits"] <= 5e-4


def test_reference_continuations_read_as_language(fp32_bundle):
    _, result = fp32_bundle
    for sample in result.report["reference"]["greedy_samples"]:
        words = sample["continuation"].split()
        assert len(words) >= 10
        assert sum(w.strip(".,;:()'\"").isalpha() for w in words) / len(words) >= 0.6, sample


def _reference_greedy(bundle, prompt_ids, new_tokens):
    from exporter.models import greedy_generate, load_model

    import json

    manifest = json.loads((bundle / "manifest.json").read_text())
    model, _ = load_model(manifest["source"]["path"], max_seq_len=256)
    return greedy_generate(model, prompt_ids, new_tokens, stop_ids=model.config.eos_token_ids).generated


def test_text_llm_runner_generates_the_reference_text(fp32_bundle):
    from runtimes.executorch import load_kernel_libraries

    load_kernel_libraries()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    _, result = fp32_bundle
    bundle = result.bundle
    tokenizer = TextTokenizer.from_folder(bundle)
    text = "The interpreter reads"
    prompt_ids = tokenizer.encode(text)
    generated = _reference_greedy(bundle, prompt_ids, 32)
    eos = set(tokenizer.tokenizer.encode("</s>", add_special_tokens=False).ids)
    expected = tokenizer.tokenizer.decode([t for t in generated if t not in eos], skip_special_tokens=False)
    pieces: list[str] = []
    runner = TextLLMRunner(str(bundle / "model.pte"), str(bundle))
    runner.generate("<s>" + text, GenerationConfig(echo=False, max_new_tokens=32, temperature=0.0), pieces.append)
    assert "".join(pieces) == expected and len(expected.split()) >= 5


def test_onnxruntime_genai_generates_the_reference_tokens(fp32_bundle):
    import onnxruntime_genai as og
    _, result = fp32_bundle
    bundle = result.bundle
    tokenizer = TextTokenizer.from_folder(bundle)
    prompt_ids = tokenizer.encode("A list comprehension")
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + 32, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    generated = [int(t) for t in generator.get_sequence(0)][len(prompt_ids):]
    reference = _reference_greedy(bundle, prompt_ids, 32)
    assert generated[: len(reference)] == reference


@pytest.mark.parametrize("name", list(FIXTURES))
def test_coreml_fp16_meets_its_distribution_gate(name, tmp_path):
    result = export_bundle(FIXTURES[name], load_recipe("coreml-fp16"), tmp_path)
    metrics = result.report["artifacts"]["coreml"]["fidelity"]["metrics"]
    assert result.passed, result.report["artifacts"]["coreml"]["breaches"]
    assert metrics["kl"] <= 1e-3 and metrics["top1"] >= 0.99
