"""Predicted artifact sizes (exporter/sizes.py) against the artifacts themselves, and what inspect prints.

The rule judged: each artifact within 10 % of (quantised params x bits / 8 + scales + unquantised
tensors). Here the embedded minicpm-tiny goes through ONNX once (one export, then the int8 and int4
recipes' quantisation of that graph, saved as the target saves it). The other artifacts are held to
the same bound where their tests already build them (an export costs 10-170 s on this machine):
tests/test_quant_coreml.py (every compression scheme, embedded minicpm-tiny), test_embedded_export.py
(fp32 and coreml-fp16 bundles of both embedded models, every target), test_quant_executorch.py
(int8, int4, ternary and fp32 .pte) and test_blockffn_sparse_pass.py (fp32-sparse .pte and .onnx).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpm_mobile.cli import app
from cpm_mobile.exporter.models.config import ModelConfig
from cpm_mobile.exporter.models.loader import build_model, load_checkpoint
from bench.presets import preset_config
from cpm_mobile.exporter.sizes import predict_bytes, recipe_sizes, shape_model
from cpm_mobile.recipes import load_recipe, recipe_names

EMBEDDED = Path(__file__).resolve().parents[1] / "exporter" / "embedded"
TOLERANCE = 0.10
ISSUE_INT4_PTE_BOUND = 400e6  # issue 9: the int4 .pte of the MiniCPM4-0.5B shape under 400 MB


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def minicpm():
    return build_model(load_checkpoint(EMBEDDED / "minicpm-tiny"), max_seq_len=load_recipe("fp32").max_seq_len)


def _assert_close(real: int, predicted: int, what: str) -> None:
    assert abs(real / predicted - 1) <= TOLERANCE, f"{what}: artifact {real} B, predicted {predicted} B"


def test_onnx_artifacts_of_every_recipe_match_the_prediction(minicpm, tmp_path):
    import onnx_ir as ir

    from cpm_mobile.exporter.targets.onnx.quant import quantize_onnx
    from cpm_mobile.exporter.targets.onnx.target import OnnxTarget, save_onnx

    model = minicpm
    specs = {recipe.name: recipe.targets["onnx"] for recipe in map(load_recipe, recipe_names())
             if "onnx" in recipe.targets and not recipe.targets["onnx"].passes}
    assert {"fp32", "int8", "int4", "ternary"} <= set(specs)
    exported = OnnxTarget().export(model, tmp_path / "fp32", specs["fp32"]).info
    _assert_close(exported.metadata["size_bytes"], predict_bytes(model, specs["fp32"]), "fp32 onnx")
    graph = ir.load(tmp_path / "fp32" / exported.entry)
    for name in ("int8", "int4", "ternary"):  # the target's own quantisation of that graph, saved as it saves it
        folder = tmp_path / name
        folder.mkdir()
        save_onnx(quantize_onnx(graph, specs[name].quantization), folder, external_data=False)
        _assert_close(folder_bytes(folder), predict_bytes(model, specs[name]), f"{name} onnx")


def test_minicpm4_05b_shape_int4_pte_fits_the_issue_bound():
    """From the preset's shapes alone (434M parameters, vocab 73448, tied): no weights are made."""
    config = ModelConfig.from_hf_dict(preset_config("minicpm4-0.5b"))
    rows = {(row.recipe, row.target): row for row in recipe_sizes(config, tied=config.tie_word_embeddings)}
    model = shape_model(config, config.tie_word_embeddings, 256)
    parameters = sum(p.numel() for p in model.parameters())
    assert 430e6 < parameters < 440e6
    assert rows[("int4", "executorch")].bytes < ISSUE_INT4_PTE_BOUND
    # the fp32 .pte holds the tied table twice: 4 bytes x (parameters + embedding) + RoPE tables
    embedding = config.vocab_size * config.hidden_size
    assert rows[("fp32", "executorch")].bytes >= 4 * (parameters + embedding)
    assert rows[("fp32", "onnx")].bytes < 4 * (parameters + embedding)  # one table in an .onnx
    # 4-bit codes and a scale per 32 weights (bf16 in a .pte) with an 8-bit embedding and lm_head:
    # between a sixth and a quarter of fp32
    assert 1 / 6 < rows[("int4", "executorch")].fp32_ratio < 1 / 4
    assert rows[("coreml-palette2", "coreml")].bytes < rows[("int4", "coreml")].bytes < rows[("int8", "coreml")].bytes
    assert ("fp32-sparse", "executorch") not in rows  # a dense FFN: the sparse pass does not apply


def test_inspect_prints_one_size_row_per_recipe_and_target():
    table = CliRunner().invoke(app, ["inspect", str(EMBEDDED / "blockffn-tiny")])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    facts = json.loads(CliRunner().invoke(app, ["inspect", str(EMBEDDED / "blockffn-tiny"), "--json"]).stdout)
    rows = facts["artifact_sizes"]
    pairs = {(row["recipe"], row["target"]) for row in rows}
    shipped = {(recipe.name, target) for recipe in map(load_recipe, recipe_names()) for target in recipe.targets
               if recipe.weights == "any" and not recipe.vision_language}  # no weight grid, no vision half
    assert pairs == shipped and len(rows) == len(shipped)  # BlockFFN: fp32-sparse applies too
    for row in rows:
        printed = [line.split() for line in lines if line.split()[:2] == [row["recipe"], row["target"]]]
        assert len(printed) == 1, row
        assert printed[0][-1] == f"{row['fp32_ratio']:.2f}x"
    fp32 = {row["target"]: row["bytes"] for row in rows if row["recipe"] == "fp32"}
    assert all(row["fp32_ratio"] == pytest.approx(row["bytes"] / fp32[row["target"]]) for row in rows)
