"""`cpm-mobile check` gives the verdict `export` gave, with the same numbers, on the same bytes.

Every shipped recipe x target on both embedded models: the bundle export wrote is checked again,
untouched, and both gates' metrics must equal export's report.json. (The quantised Core ML bundles
failed this before the twin was read back from the saved package: check compared an int4 program
with the fp32 model.) A changed byte fails the re-check. The check plan is shortened (one prompt,
two held-out windows) so the whole matrix fits the suite: the tolerances stay the shipped ones.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import short_recipe
from cpm_mobile.exporter.bundle_check import check_bundle
from cpm_mobile.exporter.defaults import DEFAULT_MODEL, DEFAULT_SPARSE_MODEL
from cpm_mobile.exporter.pipeline import export_bundle
from cpm_mobile.recipes import load_recipe, recipe_names

MODELS = {"minicpm-tiny": DEFAULT_MODEL, "blockffn-tiny": DEFAULT_SPARSE_MODEL}
# Grid recipes need a checkpoint on an integer grid (tests/test_weight_grid.py re-checks those); the sparse
# recipes need BlockFFN layers.
RECIPES = [name for name in recipe_names() if load_recipe(name).weights != "checkpoint_grid"]
CASES = [(model, recipe) for model in MODELS for recipe in RECIPES
         if model == "blockffn-tiny" or not any(p.name == "blockffn_sparse" for spec in load_recipe(recipe).targets.values()
                                                for p in [*load_recipe(recipe).passes, *spec.passes])]
SHORT = dict(max_new_tokens=8, heldout_windows=2, heldout_tokens=128)


def _short(name: str):
    recipe = short_recipe(name, **SHORT)
    return recipe.model_copy(update={"check": recipe.check.model_copy(update={"prompts": recipe.check.prompts[:1]})})


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.mark.slow
@pytest.mark.parametrize(("model", "recipe"), CASES, ids=[f"{m}-{r}" for m, r in CASES])
def test_check_repeats_exports_verdict_and_numbers(model: str, recipe: str, tmp_path: Path):
    exported = export_bundle(MODELS[model], _short(recipe), tmp_path)
    assert exported.passed, {t: a["breaches"] for t, a in exported.report["artifacts"].items()}
    on_disk = json.loads((exported.bundle / "report.json").read_text())
    checked = check_bundle(exported.bundle).report
    assert checked["passed"] is True
    assert set(checked["artifacts"]) == set(on_disk["artifacts"])
    for target, entry in on_disk["artifacts"].items():
        for gate in ("faithfulness", "fidelity"):
            before, after = _numbers(entry[gate]["metrics"]), _numbers(checked["artifacts"][target][gate]["metrics"])
            assert before.keys() == after.keys(), (target, gate)
            for metric, value in before.items():
                assert math.isclose(after[metric], value, rel_tol=1e-6, abs_tol=1e-12), (target, gate, metric,
                                                                                        value, after[metric])
            assert checked["artifacts"][target][gate]["against"] == entry[gate]["against"]


def test_a_changed_byte_fails_the_recheck(tmp_path: Path):
    exported = export_bundle(DEFAULT_MODEL, _short("int4").select(["onnx"]), tmp_path)
    assert exported.passed
    model = exported.bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    report = check_bundle(exported.bundle).report
    assert report["passed"] is False
    assert any("sha256 differs" in b for b in report["artifacts"]["onnx"]["breaches"])


def test_an_artifact_that_does_not_store_its_weights_quantised_is_a_breach_not_a_traceback(tmp_path, monkeypatch):
    """A quantiser that silently left the graph fp32: the twin cannot be read back from it, which the
    report states as a structural breach of that artifact; the bundle is published .rejected, and
    `check` on it says the same."""
    from cpm_mobile.exporter.targets.onnx import target as onnx_target

    monkeypatch.setattr(onnx_target, "quantize_onnx", lambda graph, scheme, grid=None: graph)
    exported = export_bundle(DEFAULT_MODEL, _short("int8").select(["onnx"]), tmp_path)
    assert not exported.passed and exported.bundle.name.endswith(".rejected")
    [breach] = [b for b in exported.report["artifacts"]["onnx"]["breaches"] if b.startswith("structure:")]
    assert "does not store these weights quantised" in breach
    assert exported.report["artifacts"]["onnx"]["failed_gates"] == ["artifact"]
    checked = check_bundle(exported.bundle).report
    assert not checked["passed"] and breach in checked["artifacts"]["onnx"]["breaches"]
