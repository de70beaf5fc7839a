"""Quality estimates from eager twins (exporter/estimate.py): `export --dry-run` and the recipe a failed export names.

The estimate is the recipe's ExecuTorch twin scored by the fidelity gate's own measure; it must be what the .pte's
fidelity gate then measures, rank the recipes as their artifacts rank, and build nothing.
"""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from cpm_mobile.cli import app
from cpm_mobile.exporter.calibration import calibration_text
from cpm_mobile.exporter.defaults import EMBEDDED, HELDOUT_TEXT
from cpm_mobile.exporter.estimate import estimate, reference_runs
from cpm_mobile.exporter.models.loader import build_model, load_checkpoint
from cpm_mobile.exporter.pipeline import _fidelity_failed
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.exporter.verify import build_plan
from cpm_mobile.recipes import load_recipe
from cpm_mobile.runtimes.check import judge
from tests.conftest import EMBEDDED_BUNDLES, bundle_recipe

runner = CliRunner()


@pytest.mark.xdist_group(EMBEDDED_BUNDLES)
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_the_estimate_is_what_the_pte_fidelity_gate_measures(embedded_bundle, name):
    """On the shared bundle's own plan: the eager twin's KL, perplexity and top-1 against fp32 are the .pte's."""
    exported = embedded_bundle("minicpm-tiny", name)
    measured = exported.report["artifacts"]["executorch"]["fidelity"]["metrics"]
    recipe = bundle_recipe(name).select(["executorch"])
    checkpoint = load_checkpoint(EMBEDDED / "minicpm-tiny")
    tokenizer = TextTokenizer.from_folder(checkpoint.folder)
    plan = build_plan(recipe, tokenizer, HELDOUT_TEXT.read_text(encoding="utf-8"), recipe.max_seq_len,
                      checkpoint.config.eos_token_ids)
    reference = build_model(checkpoint, max_seq_len=recipe.max_seq_len)
    # int4 calibrates (one-pass GPTQ) on the embedded held-out text outside the plan's windows, as the export did
    calibration = calibration_text(None, HELDOUT_TEXT.read_text(encoding="utf-8"), plan.heldout_windows)
    result = estimate(reference, recipe, plan, reference_runs(reference, plan), tokenizer, calibration, 1, 1)
    assert result.metrics["kl"] == pytest.approx(measured["kl"], rel=0.2), (result.metrics, measured)
    assert result.metrics["ppl"] == pytest.approx(measured["ppl"], rel=2e-3)
    assert abs(result.metrics["top1"] - measured["top1"]) <= 0.02
    assert result.passes == exported.report["artifacts"]["executorch"]["fidelity"]["passed"]


def test_dry_run_ranks_the_recipes_that_run_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--dry-run", "--recipe", "int4", "--out", str(out), "--verbose"])
    assert result.exit_code == 0, result.output
    assert not out.exists()
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in ("int4", "int4-gptq", "int8", "ternary", "fp32")}
    assert set(rows) == {"int4", "int4-gptq", "int8", "ternary", "fp32"}
    assert rows["int4"][1] == "*"  # the recipe asked for is marked
    kl = {name: float(next(cell for cell in row if "e-" in cell or "e+" in cell)) for name, row in rows.items()}
    # int4 (GPTQ in one pass) and int4-gptq (layer by layer) are both calibrated: either may lead on a tiny model
    assert kl["fp32"] == 0.0 and kl["int8"] < min(kl["int4"], kl["int4-gptq"]) <= max(kl["int4"], kl["int4-gptq"]) \
        < kl["ternary"]
    assert rows["ternary"][-3:] == ["no", "bound", "stated"]
    # Recipes that cannot run on a dense model are said (with --verbose), not estimated.
    assert "int8-sparse: not estimated: executorch target: pass 'blockffn_sparse' needs a model with BlockFFN" \
           in " ".join(result.stdout.split())


def test_a_fidelity_failure_names_the_recipe_that_would_pass(tmp_path):
    """int4 with a fidelity bound it cannot meet: the export fails with one line naming the smallest shipped recipe
    whose eager twin passes its own bounds, and report.json says what was measured."""
    data = load_recipe("int4").model_dump(mode="json", exclude_unset=True)
    data["name"] = "int4-strict"
    # below the one-pass int4 on this short plan (254 tokens; measured: int4 3.32e-3, int4-gptq 4.06e-3, int4-mixed
    # 1.80e-3: on so few tokens the two 4-bit calibrations are within their spread), so the suggestion goes on
    data["targets"] = {"executorch": {**data["targets"]["executorch"], "fidelity": {"max_kl": 3.1e-3}}}
    data["check"] = {**data["check"], "prompts": data["check"]["prompts"][:1], "max_new_tokens": 8,
                     "heldout_windows": 2, "heldout_tokens": 128}
    path = tmp_path / "int4-strict.yaml"
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["export", "--recipe", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: check failed")]
    report = json.loads((tmp_path / "out" / "minicpm-tiny-int4-strict.rejected" / "report.json").read_text())
    suggestion = report["suggestion"]
    named = suggestion["recipe"]
    assert len(lines) == 1 and f"; recipe {named} would pass (eager twin: KL " in lines[0], result.output
    # Smallest first: the shipped int4 (the same twin) meets its own bounds but not the one asked for; the named
    # recipe is the last tried, and the first that meets both.
    assert named != "int4" and suggestion["tried"][-1].startswith(f"{named}: KL ")
    assert suggestion["tried"][0].startswith("int4: KL ") and "(asked by int4-strict)" in suggestion["tried"][0]
    assert judge(suggestion["metrics"], suggestion["bounds"]) == [] and suggestion["bounds"]["max_kl"] is not None
    # The bound asked for is met too, and every recipe tried before the named one (in size order) missed it.
    assert named in ("int4-gptq", "int4-mixed") and suggestion["metrics"]["kl"] <= 3.1e-3
    assert all("required <=" in tried for tried in suggestion["tried"][:-1]), suggestion["tried"]
    assert "required" not in suggestion["tried"][-1]
    assert suggestion["metrics"]["kl"] < report["artifacts"]["executorch"]["fidelity"]["metrics"]["kl"]


def test_only_a_fidelity_failure_asks_for_a_suggestion():
    def report(*failed):
        return {"artifacts": {t: {"failed_gates": list(f)} for t, f in zip(("executorch", "onnx"), failed)}}

    assert _fidelity_failed(report(["fidelity"], []))
    assert _fidelity_failed(report(["fidelity", "tokenizer"], ["fidelity"]))
    assert not _fidelity_failed(report(["fidelity"], ["faithfulness"]))  # an implementation fault first
    assert not _fidelity_failed(report(["fidelity", "artifact"], []))
    assert not _fidelity_failed(report([], []))
