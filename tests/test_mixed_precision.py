"""The int4-mixed recipe: the body linears that cost the most quality per weight keep 8-bit codes, chosen by
measured sensitivity under a size budget, and the mixed grid is carried exactly by every format.

- the choice follows the measurement and never exceeds the budget;
- the measurement is worth making: keeping the linears it ranks first at 8 bits costs less KL on text it was
  not measured on than keeping as many weights ranked last;
- the grid file keeps each linear's width and scale dtype;
- the export (all three formats) passes both gates below int4-gptq's fidelity KL, and each artifact stores the
  chosen linears with 8-bit codes (the .pte through our weight-only kernel, the .onnx as 8-bit MatMulNBits,
  the .mlpackage as int8 blocks).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cpm_mobile.exporter import sensitivity
from cpm_mobile.exporter.calibration import (
    GRID_FILE, calibrate, calibration_windows, gptq_linear, load_grid, mixed_choice, rounding_for, save_grid,
)
from cpm_mobile.exporter.defaults import DEFAULT_MODEL, HELDOUT_TEXT
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.loader import load_model
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.recipes import load_recipe
from cpm_mobile.recipes.schema import CalibrationSpec, recipe_from_dict

pytestmark = pytest.mark.xdist_group("embedded_bundles")  # shares conftest.embedded_bundle with test_recheck


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model(DEFAULT_MODEL, max_seq_len=256)
    tokenizer = TextTokenizer.from_folder(DEFAULT_MODEL)
    return model, tokenizer, tokenizer.encode(HELDOUT_TEXT.read_text(encoding="utf-8"))


def test_the_choice_takes_the_most_kl_per_weight_within_the_budget():
    sizes = {"a": 100, "b": 100, "c": 400, "d": 400}
    kl = {"a": 1.0, "b": 3.0, "c": 8.0, "d": 0.5}  # per weight: b 0.03, c 0.02, a 0.01, d 0.00125
    choice = sensitivity.choose(kl, sizes, low=4, high=8, bits_per_weight=5.0)  # 250 of 1000 weights at 8 bits
    assert choice.high == {"b", "a"}  # c does not fit after b; a does
    assert choice.bits_per_weight == pytest.approx(4.8)
    assert sensitivity.choose(kl, sizes, 4, 8, 8.0).high == set(sizes)
    assert sensitivity.choose(kl, sizes, 4, 8, 4.05).high == set()


def _heldout_kl(reference, model, windows) -> float:
    total = tokens = 0.0
    with torch.no_grad():
        for window in windows:
            for m in (reference, model):
                m.reset_cache()
            p = F.log_softmax(reference(torch.tensor([window]), torch.tensor([0]))[0].double(), -1)
            q = F.log_softmax(model(torch.tensor([window]), torch.tensor([0]))[0].double(), -1)
            total += float((p.exp() * (p - q)).sum())
            tokens += len(window)
    return total / tokens


def _rounded(model, widths: dict[str, int], spec):
    from cpm_mobile.exporter.models.variant import with_weights

    weights = {name: gptq_linear(module.weight, None, rounding_for(widths.get(name, 4), spec)).dequantize()
               for name, module in sensitivity.body_linears(model).items()}
    return with_weights(model, weights)


def test_measured_choice_beats_the_reverse_ranking_on_text_it_never_saw(tiny):
    """minicpm-tiny, sensitivities on 4 x 128 tokens from the end of the held-out text, scored on the check's first
    4 x 128: round to nearest with the chosen linears at 8 bits against the same weight count ranked last.
    Measured: KL 2.4e-3 chosen, 4.3e-3 ranked last, 5.3e-3 all at 4 bits (9 of 28 linears at 8 bits)."""
    model, tokenizer, ids = tiny
    spec = CalibrationSpec(windows=4, tokens=128, mixed={"bits_per_weight": 5.0, "windows": 4})
    before = {n: p.clone() for n, p in model.named_parameters()}
    choice = mixed_choice(model, calibration_windows(ids, 4, 128, tokenizer.bos_id, reserved=512), spec)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # measured, then restored
    assert all(value > 0 for value in choice.sensitivity.values()) and 4.5 < choice.bits_per_weight <= 5.0
    sizes = {n: m.weight.numel() for n, m in sensitivity.body_linears(model).items()}
    reverse = sensitivity.choose({n: 1.0 / (v + 1e-30) for n, v in choice.sensitivity.items()}, sizes, 4, 8, 5.0)
    heldout = [ids[i * 128:(i + 1) * 128] for i in range(4)]
    chosen_kl = _heldout_kl(model, _rounded(model, {n: 8 for n in choice.high}, spec), heldout)
    reverse_kl = _heldout_kl(model, _rounded(model, {n: 8 for n in reverse.high}, spec), heldout)
    all_4_kl = _heldout_kl(model, _rounded(model, {}, spec), heldout)
    assert chosen_kl < 0.75 * reverse_kl and chosen_kl < 0.75 * all_4_kl, (chosen_kl, reverse_kl, all_4_kl)


def test_a_mixed_grid_file_keeps_each_linears_width_and_scale_dtype(tiny, tmp_path: Path):
    model, tokenizer, ids = tiny
    spec = CalibrationSpec(windows=2, tokens=64)
    wide = {"layers.0.self_attn.v_proj.weight": 8, "layers.3.mlp.down_proj.weight": 8}
    grid = calibrate(model, calibration_windows(ids, 2, 64, tokenizer.bos_id), spec, bits=wide)
    for name, linear in grid.linears.items():
        assert linear.bits == wide.get(name, 4)
        dtype = torch.float16 if name in wide else torch.bfloat16
        assert linear.scale_dtype == dtype and torch.equal(linear.scales.to(dtype).float(), linear.scales)
    assert int(grid.linears["layers.0.self_attn.v_proj.weight"].codes.max()) > 15  # 8-bit codes in use
    assert "(2 linears at 8 bits)" in grid.describe()
    save_grid(grid, tmp_path / GRID_FILE)
    loaded = load_grid(tmp_path / GRID_FILE)
    for name, linear in grid.linears.items():
        other = loaded.linears[name]
        assert (other.bits, other.scale_dtype) == (linear.bits, linear.scale_dtype)
        assert torch.equal(other.codes, linear.codes) and torch.equal(other.scales, linear.scales)


def test_the_recipe_validates_its_mixed_block():
    data = load_recipe("int4-mixed").model_dump(mode="json", exclude_unset=True)
    calibration = data["calibration"]
    for bad, field in (({"bits_per_weight": 4.0}, "bits_per_weight"), ({"high_bits": 6}, "high_bits"),
                       ({"windows": 1000}, "mixed.windows")):
        with pytest.raises(InputError, match=field):
            recipe_from_dict({**data, "calibration": {**calibration, "mixed": {**calibration["mixed"], **bad}}})


def test_executorch_refuses_an_8_bit_linear_its_kernel_cannot_carry(tiny):
    import dataclasses

    from cpm_mobile.exporter.calibration import calibrated_model
    from cpm_mobile.exporter.models.grid import WeightGrid
    from cpm_mobile.exporter.targets.executorch.quant import check_fits

    model, tokenizer, ids = tiny
    spec = CalibrationSpec(windows=1, tokens=32)
    grid = calibrate(model, calibration_windows(ids, 1, 32, tokenizer.bos_id), spec,
                     bits={"layers.1.self_attn.o_proj.weight": 8})
    name = "layers.1.self_attn.o_proj.weight"
    entry = grid.linears[name]
    off = dataclasses.replace(entry, scales=entry.scales * (1 + 2**-12))  # not exact in fp16
    bad = calibrated_model(model, WeightGrid(grid.source, {**grid.linears, name: off}))
    scheme = load_recipe("int4-mixed").targets["executorch"].quantization
    check_fits(calibrated_model(model, grid), scheme)
    with pytest.raises(InputError, match="linear_q8x4 carries symmetric blocks of 32 with fp16 scales only"):
        check_fits(bad, scheme)


@pytest.mark.slow
def test_int4_mixed_passes_both_gates_below_gptq_and_stores_the_chosen_linears_at_8_bits(embedded_bundle):
    import onnx

    mixed, gptq = embedded_bundle("minicpm-tiny", "int4-mixed"), embedded_bundle("minicpm-tiny", "int4-gptq")
    assert mixed.passed, mixed.report
    grid = load_grid(mixed.bundle / GRID_FILE)
    wide = {name for name, linear in grid.linears.items() if linear.bits == 8}
    assert wide and len(wide) < len(grid.linears)
    for target, entry in mixed.report["artifacts"].items():
        kl, gptq_kl = entry["fidelity"]["metrics"]["kl"], gptq.report["artifacts"][target]["fidelity"]["metrics"]["kl"]
        assert kl < 0.8 * gptq_kl, (target, kl, gptq_kl)
    # .onnx: one 8-bit MatMulNBits per chosen linear, plus the 8-bit lm_head
    graph = onnx.load(str(mixed.bundle / "model.onnx"), load_external_data=False).graph
    bits = [next(a.i for a in node.attribute if a.name == "bits") for node in graph.node if node.op_type == "MatMulNBits"]
    assert bits.count(8) == len(wide) + 1 and bits.count(4) == len(grid.linears) - len(wide)
    # .pte: the tiles of every chosen linear are among the program's constants (the exact check), and our
    # weight-only kernel is in the program
    pte = (mixed.bundle / "model.pte").read_bytes()
    assert b"linear_q8x4" in pte
    # .mlpackage: its weight file is the size of int8 codes for the chosen linears, not of int4 ones
    import dataclasses

    from cpm_mobile.exporter.calibration import calibrated_model
    from cpm_mobile.exporter.models.grid import WeightGrid
    from cpm_mobile.exporter.targets.coreml.quant import expected_weight_bytes, weight_file_bytes

    reference, _ = load_model(DEFAULT_MODEL, max_seq_len=256)
    scheme = load_recipe("int4-mixed").targets["coreml"].quantization
    narrow = WeightGrid(grid.source, {n: dataclasses.replace(e, bits=4) for n, e in grid.linears.items()})
    size = weight_file_bytes(mixed.bundle / "model.mlpackage")
    as_mixed = expected_weight_bytes(calibrated_model(reference, grid), scheme, "fp32")
    as_int4 = expected_weight_bytes(calibrated_model(reference, narrow), scheme, "fp32")
    assert abs(size / as_mixed - 1) < 0.05 < abs(size / as_int4 - 1), (size, as_mixed, as_int4)
    # and every file is the size inspect predicted from the budget alone, within 5 %
    from cpm_mobile.exporter.models.loader import load_checkpoint
    from cpm_mobile.exporter.sizes import recipe_sizes

    checkpoint = load_checkpoint(DEFAULT_MODEL)
    predicted = {r.target: r.bytes for r in recipe_sizes(checkpoint.config, checkpoint.tied, ["int4-mixed"])}
    for artifact in mixed.manifest["artifacts"]:
        actual = artifact["metadata"]["size_bytes"]
        assert abs(actual / predicted[artifact["target"]] - 1) < 0.05, (artifact["target"], actual, predicted)


def test_sizes_are_predicted_from_the_budget_before_calibration():
    """`inspect` / `--dry-run` size int4-mixed before any measurement: as many weights at 8 bits as the budget allows
    (which ones is measured at export; the sizes depend only on how many)."""
    from cpm_mobile.exporter.calibration import planned_grid
    from cpm_mobile.exporter.models.loader import load_checkpoint
    from cpm_mobile.exporter.sizes import recipe_sizes, shape_model

    checkpoint = load_checkpoint(DEFAULT_MODEL)
    recipe = load_recipe("int4-mixed")
    planned = planned_grid(shape_model(checkpoint.config, checkpoint.tied, 256), recipe.calibration)
    weights = {name: 0 for name in planned.linears}
    model = shape_model(checkpoint.config, checkpoint.tied, 256)
    for name in weights:
        weights[name] = model.get_parameter(name).numel()
    wide = sum(weights[n] for n, g in planned.linears.items() if g.bits == 8) / sum(weights.values())
    assert 0.2 < wide <= 0.25  # budget 5.0 bits: at most a quarter at 8
    sizes = {(r.recipe, r.target): r.bytes for r in recipe_sizes(checkpoint.config, checkpoint.tied,
                                                                 ["int4-gptq", "int4-mixed", "int8"])}
    for target in ("executorch", "onnx", "coreml"):
        assert sizes["int4-gptq", target] < sizes["int4-mixed", target] < sizes["int8", target], target
