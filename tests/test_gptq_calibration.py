"""The int4-gptq recipe: GPTQ calibrated on held-out text the check does not score, carried exactly by the targets.

- GPTQ lowers each linear's output error against round-to-nearest with the same group rounding, on inputs it
  was not calibrated on;
- the calibration windows never reach into the check's held-out windows;
- the exported ONNX graph stores the calibrated grid itself (the twin read back from the file holds exactly
  the calibrated model's weights), the export passes both gates with a lower fidelity KL than plain int4 on
  the same model, and `cpm-mobile check` repeats export's verdict and numbers from the grid in the bundle.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import short_recipe
from cpm_mobile.exporter.calibration import (
    GRID_FILE, GroupRounding, calibrate, calibrated_model, calibration_windows, gptq_linear, load_grid, save_grid,
)
from cpm_mobile.exporter.defaults import DEFAULT_MODEL, HELDOUT_TEXT
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.loader import load_model
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.recipes import load_recipe
from cpm_mobile.recipes.schema import CalibrationSpec, recipe_from_dict

# Fast plan: 4 held-out windows of 256 (the check's first 1024 tokens), one prompt, 8 decode steps.
PLAN = dict(heldout_windows=4, heldout_tokens=256, max_new_tokens=8)
ROUND_TO_NEAREST = Path(__file__).resolve().parents[1] / "bench" / "int4-rtn.yaml"  # int4 before calibration


@pytest.fixture(scope="module")
def tiny():
    model, checkpoint = load_model(DEFAULT_MODEL, max_seq_len=256)
    tokenizer = TextTokenizer.from_folder(DEFAULT_MODEL)
    return model, tokenizer, tokenizer.encode(HELDOUT_TEXT.read_text(encoding="utf-8"))


def _linear_inputs(model, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, inputs, output, n=n: seen[n].append(inputs[0].reshape(-1, inputs[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for window in windows:
            model(torch.tensor([window]), torch.tensor([0]))
            model.reset_cache()
    for hook in hooks:
        hook.remove()
    return {n: torch.cat(v).to(torch.float64) for n, v in seen.items()}


def test_gptq_lowers_every_linears_output_error_on_inputs_it_was_not_calibrated_on(tiny):
    """Each linear of minicpm-tiny, calibrated on 32 x 256 tokens from the end of the held-out text, scored on the
    check's first 4 x 256 tokens: relative output error ||X (W - Q)^T||^2 / ||X W^T||^2, GPTQ against round to
    nearest with the same scales search. Measured: GPTQ/RTN 0.27..0.99 per linear (o_proj ~0.3, the last
    down_proj 0.99), 0.75 summed over all 28 linears."""
    model, tokenizer, ids = tiny
    calibration = _linear_inputs(model, calibration_windows(ids, 32, 256, tokenizer.bos_id, reserved=1024))
    heldout = _linear_inputs(model, [ids[i * 256:(i + 1) * 256] for i in range(4)])
    rounding = GroupRounding(bits=4, group_size=32, symmetric=True)
    totals = {"gptq": 0.0, "rtn": 0.0}
    for name, x in heldout.items():
        weight = model.get_submodule(name).weight.to(torch.float64)
        hessian = 2 * calibration[name].T @ calibration[name] / len(calibration[name])
        reference = x @ weight.T
        errors = {}
        for kind, h in (("gptq", hessian), ("rtn", None)):
            grid = gptq_linear(weight, h, rounding)
            assert grid.codes.max() <= 15 and bool((grid.zeros == 8).all())  # symmetric 4-bit
            assert torch.equal(grid.scales.to(torch.bfloat16).to(torch.float32), grid.scales)  # exact in bf16
            errors[kind] = float(((x @ grid.dequantize().to(torch.float64).T - reference) ** 2).sum()
                                 / (reference ** 2).sum())
            totals[kind] += errors[kind]
        assert errors["gptq"] < errors["rtn"], (name, errors)
    assert totals["gptq"] / totals["rtn"] < 0.8, totals


def test_calibration_windows_come_from_the_end_and_never_reach_the_checks_windows():
    tokens = list(range(100))
    windows = calibration_windows(tokens, 3, 11, bos_id=-1, reserved=40)
    assert windows == [[-1, *range(70, 80)], [-1, *range(80, 90)], [-1, *range(90, 100)]]
    with pytest.raises(InputError, match="after the check's first 80 held-out tokens"):
        calibration_windows(tokens, 3, 11, bos_id=-1, reserved=80)


def test_the_recipe_validates_its_calibration_block():
    data = load_recipe("int4-gptq").model_dump(mode="json", exclude_unset=True)
    for bad, field in (({"method": "awq"}, "calibration.method"), ({"bits": 3}, "calibration.bits"),
                       ({"windows": 0}, "calibration.windows"), ({"damp": 0}, "calibration.damp"),
                       ({"group_size": 64, "block_size": 96}, "calibration"), ({"symmetric": False}, "symmetric")):
        with pytest.raises(InputError, match=field):
            recipe_from_dict({**data, "calibration": {**data["calibration"], **bad}})
    with pytest.raises(InputError, match="checkpoint_grid"):
        recipe_from_dict({**data, "weights": "checkpoint_grid"})


def test_the_grid_file_round_trips(tiny, tmp_path: Path):
    model, tokenizer, ids = tiny
    spec = CalibrationSpec(windows=2, tokens=64)
    grid = calibrate(model, calibration_windows(ids, 2, 64, tokenizer.bos_id), spec)
    assert len(grid.linears) == 28 and grid.source == "gptq calibrated on 128 tokens"
    save_grid(grid, tmp_path / GRID_FILE)
    loaded = load_grid(tmp_path / GRID_FILE)
    assert loaded.source == grid.source and list(loaded.linears) == list(grid.linears)
    for name, linear in grid.linears.items():
        other = loaded.linears[name]
        assert torch.equal(other.codes, linear.codes) and torch.equal(other.scales, linear.scales)
        assert torch.equal(other.zeros, linear.zeros) and other.group_size == 32 and other.scale_dtype == torch.bfloat16
    calibrated = calibrated_model(model, grid)
    assert calibrated.config.weight_grid is grid and model.config.weight_grid is None  # the reference stays float
    assert torch.equal(calibrated.layers[0].mlp.down_proj.weight,
                       grid.linears["layers.0.mlp.down_proj.weight"].dequantize())
    assert not torch.equal(model.layers[0].mlp.down_proj.weight, calibrated.layers[0].mlp.down_proj.weight)


@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory):
    from cpm_mobile.exporter.pipeline import export_bundle

    out = tmp_path_factory.mktemp("gptq")
    return {name: export_bundle(DEFAULT_MODEL, short_recipe(recipe, targets=["onnx"], **PLAN), out / name)
            for name, recipe in (("int4-gptq", "int4-gptq"), ("int4-rtn", ROUND_TO_NEAREST))}


@pytest.mark.slow
def test_int4_gptq_onnx_passes_both_gates_below_round_to_nearest_and_stores_the_grid_exactly(onnx_exports):
    """Measured on these 4 x 256 tokens: fidelity KL 3.5e-3 (int4-gptq) against 5.6e-3 (round to nearest; the one-pass int4: 3.7e-3)."""
    import onnx_ir as ir

    from cpm_mobile.exporter.targets.onnx.quant import onnx_twin

    gptq, plain = onnx_exports["int4-gptq"], onnx_exports["int4-rtn"]
    assert gptq.passed and plain.passed, gptq.report
    entry = gptq.report["artifacts"]["onnx"]
    assert entry["faithfulness"]["passed"] and entry["fidelity"]["passed"]
    kl = entry["fidelity"]["metrics"]["kl"]
    assert kl < 0.8 * plain.report["artifacts"]["onnx"]["fidelity"]["metrics"]["kl"], (
        kl, plain.report["artifacts"]["onnx"]["fidelity"]["metrics"]["kl"])
    # The graph's own weights, read back without the kernel's activation rounding, are the calibrated model's.
    grid = load_grid(gptq.bundle / GRID_FILE)
    reference, _ = load_model(DEFAULT_MODEL, max_seq_len=256)
    calibrated = calibrated_model(reference, grid)
    spec = load_recipe("int4-gptq").targets["onnx"]
    twin = onnx_twin(calibrated, ir.load(gptq.bundle / "model.onnx"), spec.quantization, activations=False)
    stored = dict(twin.named_parameters())
    for name in grid.linears:
        assert torch.equal(stored[name], dict(calibrated.named_parameters())[name]), name
    assert "calibration.safetensors" in gptq.manifest["files"]
    assert json.loads((gptq.bundle / "manifest.json").read_text())["recipe"]["calibration"]["method"] == "gptq"


@pytest.mark.slow
def test_check_repeats_the_int4_gptq_export(onnx_exports):
    from cpm_mobile.exporter.bundle_check import check_bundle

    exported = onnx_exports["int4-gptq"]
    checked = check_bundle(exported.bundle).report
    assert checked["passed"] == exported.passed
    for gate in ("faithfulness", "fidelity"):
        before = exported.report["artifacts"]["onnx"][gate]["metrics"]
        after = checked["artifacts"]["onnx"][gate]["metrics"]
        assert after["kl"] == pytest.approx(before["kl"], rel=1e-6), gate


def test_a_bad_calibration_file_is_one_line_exit_2(tmp_path: Path):
    from typer.testing import CliRunner

    from cpm_mobile.cli import app

    missing = tmp_path / "nope.txt"
    result = CliRunner().invoke(app, ["export", "--recipe", "int4-gptq", "-t", "onnx", "--out", str(tmp_path / "o"),
                                      "--calibration", str(missing)])
    assert result.exit_code == 2 and str(missing) in result.stderr and result.stderr.count("\n") == 1, result.output
    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    result = CliRunner().invoke(app, ["export", "--recipe", "int4-gptq", "-t", "onnx", "--out", str(tmp_path / "o"),
                                      "--calibration", str(binary)])
    assert result.exit_code == 2 and "not UTF-8" in result.stderr and result.stderr.count("\n") == 1, result.output
    short = tmp_path / "short.txt"
    short.write_text("too short to calibrate on", encoding="utf-8")
    result = CliRunner().invoke(app, ["export", "--recipe", "int4-gptq", "-t", "onnx", "--out", str(tmp_path / "o"),
                                      "--calibration", str(short)])
    assert result.exit_code == 2 and "calibration needs" in result.stderr, result.output
    result = CliRunner().invoke(app, ["export", "--recipe", "int8", "-t", "onnx", "--out", str(tmp_path / "o"),
                                      "--calibration", str(short)])
    assert result.exit_code == 2 and "has no calibration step" in result.stderr, result.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_checkpoint_already_on_a_grid_is_refused_before_work(tmp_path: Path):
    from bench.presets import preset_config
    from bench.synthetic import write_grid_checkpoint
    from conftest import TINY_GQA
    from cpm_mobile.exporter.models.loader import load_checkpoint
    from cpm_mobile.exporter.preflight import recipe_refusals

    config = preset_config("minicpm4-0.5b", **TINY_GQA, vocab_size=1024)
    checkpoint = load_checkpoint(write_grid_checkpoint(tmp_path / "ckpt", config, "int4", group_size=64))
    assert checkpoint.config.weight_grid is not None
    [refusal] = recipe_refusals(load_recipe("int4-gptq"), checkpoint.config, checkpoint.tied)
    assert "already carry a grid" in refusal and "checkpoint-grid" in refusal
