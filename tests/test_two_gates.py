"""Both gates of the check at real depth: the default fp32 recipe passes faithful exports of a
24-layer model with trained-like logits in every format, and a flipped weight fails faithfulness.

The bounds are relative to the logit scale (recipes/fp32.yaml says why); this is the test that an
absolute bound tuned on 4-layer models would fail, and that the relative one still catches a fault.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from cpm_mobile.exporter.defaults import DEFAULT_MODEL, HELDOUT_TEXT
from cpm_mobile.exporter.models.loader import build_model, load_checkpoint
from bench.synthetic import write_trained_like_checkpoint
from cpm_mobile.exporter.models.variant import with_weights
from cpm_mobile.exporter.pipeline import export_bundle
from cpm_mobile.exporter.targets.registry import get_target
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.exporter.verify import Twin, build_plan, check_artifacts
from cpm_mobile.recipes import load_recipe
from tests.conftest import short_recipe

pytestmark = pytest.mark.slow

# MiniCPM4-0.5B's depth (24 layers) and GQA grouping, narrowed: depth and logit scale drive fp32 noise.
DEEP = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
LOGIT_MAX = 30.0  # trained 0.1-1B models reach 20-40; the embedded models ~14; random weights ~2


@pytest.fixture(scope="module")
def deep_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    vocab = json.loads((DEFAULT_MODEL / "config.json").read_text())["vocab_size"]
    checkpoint = write_trained_like_checkpoint(root / "minicpm4-deep", "minicpm4-0.5b", logit_max=LOGIT_MAX,
                                               vocab_size=vocab, **DEEP)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, checkpoint / name)
    # The fp32 recipe's bounds as shipped; a shorter plan (the Core ML interpreter walks 24 layers per step).
    recipe = short_recipe("fp32", prompts=load_recipe("fp32").check.prompts[:1], max_new_tokens=8, heldout_windows=1,
                          heldout_tokens=96, max_seq_len=160)
    result = export_bundle(checkpoint, recipe, root / "out")
    return checkpoint, recipe, result


def test_fp32_recipe_passes_faithful_exports_at_real_depth(deep_bundle):
    checkpoint, recipe, result = deep_bundle
    assert load_checkpoint(checkpoint).config.num_layers == 24
    artifacts = result.report["artifacts"]
    assert set(artifacts) == {"executorch", "onnx", "coreml"}
    for target, entry in artifacts.items():
        assert entry["passed"], (target, entry["breaches"])
        for gate in ("faithfulness", "fidelity"):
            metrics = entry[gate]["metrics"]
            # Trained-like logits: an absolute 1e-4 bound would be the wrong yardstick here.
            assert metrics["logit_scale"] > 20
            assert metrics["greedy"] == 1.0
    coreml = artifacts["coreml"]
    # Against its fp16-cache twin the Core ML program is held tight; against fp32 it pays the cache rounding.
    assert coreml["faithfulness"]["metrics"]["max_rel_logits"] < coreml["fidelity"]["metrics"]["max_rel_logits"]
    assert coreml["faithfulness"]["against"] == "eager model with fp16 KV cache"


def _flipped(model, name: str):
    """The model with the sign of its largest-magnitude weight in `name` flipped (a one-bit fault)."""
    weight = dict(model.named_parameters())[name].detach().clone()
    index = weight.abs().argmax()
    weight.view(-1)[index] = -weight.view(-1)[index]
    return with_weights(model, {name: weight})


@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml"])
def test_one_flipped_weight_fails_faithfulness_at_real_depth(deep_bundle, target):
    """The twin carries a flipped weight the artifact does not: the same |artifact - twin| as an
    artifact with the flip against a clean twin, without a second export of the model."""
    checkpoint, recipe, result = deep_bundle
    reference = build_model(load_checkpoint(checkpoint), max_seq_len=recipe.max_seq_len)
    artifact = next(a for a in result.manifest["artifacts"] if a["target"] == target)
    twin_module, description = get_target(target).twin(reference, recipe.targets[target], result.bundle, artifact)
    faulty = _flipped(twin_module, "layers.12.mlp.down_proj.weight")
    tokenizer = TextTokenizer.from_folder(result.bundle)
    short = recipe.model_copy(update={"check": recipe.check.model_copy(update={"max_new_tokens": 16,
                                                                              "heldout_windows": 1})})
    plan = build_plan(short, tokenizer, HELDOUT_TEXT.read_text(), recipe.max_seq_len)
    artifacts = [a for a in result.manifest["artifacts"] if a["target"] == target]
    with torch.no_grad():
        report = check_artifacts(reference, {target: Twin(faulty, description)}, tokenizer, recipe,
                                 result.bundle, artifacts, plan).report
    entry = report["artifacts"][target]
    assert entry["failed_gates"] == ["faithfulness"], entry["breaches"]
    assert any(b.startswith("max_rel_logits") for b in entry["faithfulness"]["breaches"])
