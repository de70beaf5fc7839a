"""`cpm-mobile check` gives the verdict `export` gave, with the same numbers, on the same bytes.

Every shipped recipe x target (on minicpm-tiny; the sparse ones and the shared bundles on blockffn-tiny): the
bundle export wrote is checked again, untouched, and both gates' metrics must equal export's report.json. (The quantised Core ML bundles
failed this before the twin was read back from the saved package: check compared an int4 program
with the fp32 model.) A changed byte fails the re-check. The check plan is shortened (one prompt,
two held-out windows) so the whole matrix fits the suite: the tolerances stay the shipped ones.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import EMBEDDED_MODELS, bundle_recipe
from cpm_mobile.exporter.bundle_check import check_bundle
from cpm_mobile.exporter.defaults import DEFAULT_MODEL
from cpm_mobile.exporter.pipeline import export_bundle
from cpm_mobile.recipes import load_recipe, recipe_names

# Grid recipes need a checkpoint on an integer grid (tests/test_weight_grid.py re-checks those); the sparse
# recipes need BlockFFN layers.
# vision-language recipes need a vision half (tests/test_minicpmv.py).
RECIPES = [name for name in recipe_names()
           if load_recipe(name).weights != "checkpoint_grid" and not load_recipe(name).vision_language]


def _sparse(recipe: str) -> bool:
    loaded = load_recipe(recipe)
    return any(p.name == "blockffn_sparse" for spec in loaded.targets.values() for p in [*loaded.passes, *spec.passes])


# Every recipe on minicpm-tiny; on blockffn-tiny the recipes whose path differs for BlockFFN layers (the sparse
# ones, quantised in every format) and the bundles other modules share. Its dense quantised recipes take the
# same quantisers and twins as minicpm-tiny's (and cost 6 of the suite's CPU-minutes to export).
BLOCKFFN_SHARED = ("fp32", "coreml-fp16")
CASES = [(model, recipe) for model in EMBEDDED_MODELS for recipe in RECIPES
         if (model == "blockffn-tiny") == _sparse(recipe) or (model == "blockffn-tiny" and recipe in BLOCKFFN_SHARED)]
pytestmark = pytest.mark.xdist_group("embedded_bundles")  # shares conftest.embedded_bundle


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _same(metric: str, before: float, after: float, scale: float) -> bool:
    """Equal, or both at fp32's own rounding level: an fp32 .pte agrees with its reference to rounding, and that
    rounding-level number moved between export's check and the re-check (measured: max abs logits 1.7e-5 vs
    2.1e-5 at logit scale ~15, SQNR 127.66 vs 127.63 dB; the .pte itself is deterministic, run twice in one
    process; not located). Every metric above that level must be equal."""
    if math.isclose(after, before, rel_tol=1e-6, abs_tol=1e-12):
        return True
    fp32_noise = {"max_abs_logits": 1e-5 * scale, "max_rel_logits": 1e-5, "kl": 1e-10, "ppl_rel_delta": 1e-6}
    if metric == "sqnr_db":
        return min(before, after) >= 100.0
    return metric in fp32_noise and abs(after - before) <= fp32_noise[metric]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "recipe"), CASES, ids=[f"{m}-{r}" for m, r in CASES])
def test_check_repeats_exports_verdict_and_numbers(model: str, recipe: str, embedded_bundle):
    _assert_check_repeats_export(embedded_bundle(model, recipe))  # shared with the modules that test them further


@pytest.mark.slow
@pytest.mark.xdist_group("recheck_own_exports")  # no shared bundle: free to run beside the shared ones
@pytest.mark.parametrize(("kind", "recipe"), [("int4", "checkpoint-grid"), ("ternary", "ternary-grid")])
def test_grid_recipes_recheck_alike(kind: str, recipe: str, tmp_path: Path, tokenizer_dir: Path):
    """The grid recipes on a checkpoint whose weights lie on a grid (random weights: the verdict may be either)."""
    from bench.presets import preset_config
    from bench.synthetic import write_grid_checkpoint
    from conftest import TINY_GQA, with_tokenizer

    config = preset_config("minicpm4-0.5b", **TINY_GQA, vocab_size=1024)
    checkpoint = with_tokenizer(write_grid_checkpoint(tmp_path / "ckpt", config, kind, group_size=64), tokenizer_dir)
    _assert_check_repeats_export(export_bundle(checkpoint, bundle_recipe(recipe), tmp_path / "out"))


def _assert_check_repeats_export(exported) -> None:
    on_disk = json.loads((exported.bundle / "report.json").read_text())
    checked = check_bundle(exported.bundle).report
    # The same verdict whatever it is (with the shorter plan, blockffn-tiny's coreml-palette4 lands its fidelity
    # KL just past the shipped bound: 3.1e-2 against 2.5e-2 on 2 x 128 held-out tokens, 1.2e-2 on the full plan).
    assert checked["passed"] == on_disk["passed"] == exported.passed
    for target, entry in on_disk["artifacts"].items():
        assert checked["artifacts"][target]["breaches"] == entry["breaches"], target
    assert set(checked["artifacts"]) == set(on_disk["artifacts"])
    for target, entry in on_disk["artifacts"].items():
        for gate in ("faithfulness", "fidelity"):
            before, after = _numbers(entry[gate]["metrics"]), _numbers(checked["artifacts"][target][gate]["metrics"])
            assert before.keys() == after.keys(), (target, gate)
            for metric, value in before.items():
                assert _same(metric, value, after[metric], before["logit_scale"]), (target, gate, metric, value,
                                                                                   after[metric])
            assert checked["artifacts"][target][gate]["against"] == entry[gate]["against"]


@pytest.mark.xdist_group("recheck_own_exports")
def test_a_changed_byte_fails_the_recheck(tmp_path: Path):
    exported = export_bundle(DEFAULT_MODEL, bundle_recipe("int4").select(["onnx"]), tmp_path)
    assert exported.passed
    model = exported.bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    report = check_bundle(exported.bundle).report
    assert report["passed"] is False
    assert any("sha256 differs" in b for b in report["artifacts"]["onnx"]["breaches"])


@pytest.mark.xdist_group("recheck_own_exports")
def test_an_artifact_that_does_not_store_its_weights_quantised_is_a_breach_not_a_traceback(tmp_path, monkeypatch):
    """A quantiser that silently left the graph fp32: the twin cannot be read back from it, which the
    report states as a structural breach of that artifact; the bundle is published .rejected, and
    `check` on it says the same."""
    from cpm_mobile.exporter.targets.onnx import target as onnx_target

    monkeypatch.setattr(onnx_target, "quantize_onnx", lambda graph, scheme, grid=None: graph)
    exported = export_bundle(DEFAULT_MODEL, bundle_recipe("int8").select(["onnx"]), tmp_path)
    assert not exported.passed and exported.bundle.name.endswith(".rejected")
    [breach] = [b for b in exported.report["artifacts"]["onnx"]["breaches"] if b.startswith("structure:")]
    assert "does not store these weights quantised" in breach
    assert exported.report["artifacts"]["onnx"]["failed_gates"] == ["artifact"]
    checked = check_bundle(exported.bundle).report
    assert not checked["passed"] and breach in checked["artifacts"]["onnx"]["breaches"]
