"""Float checkpoints whose weights already lie on an int4 or ternary grid (QAT-unquantized, BitCPM):
found per group with the storage dtype's rounding allowed for, never found in trained or random
weights, reported by inspect, and exported with the grid's own codes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from safetensors.torch import load_file, save_file

from cpm_mobile.exporter.defaults import DEFAULT_MODEL
from cpm_mobile.exporter.models import load_checkpoint, load_model
from cpm_mobile.exporter.models.grid import ROUNDOFF
from bench.presets import preset_config
from bench.synthetic import random_state, write_grid_checkpoint, write_trained_like_checkpoint
from tests.conftest import TINY_GQA

CONFIG = preset_config("minicpm4-0.5b", **TINY_GQA, vocab_size=1024)
EMBEDDED = Path(__file__).resolve().parents[1] / "exporter" / "embedded"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE = "model.layers.1.mlp.down_proj.weight"  # 256 inputs: two groups of 128, four of 64


def _expected_codes(kind: str, group: int | None, weight: torch.Tensor, scale_dtype=torch.float32):
    """The integer levels the QAT rounding put each weight on (code - zero), from the fp32 source."""
    rows, columns = weight.shape
    blocks = weight.reshape(rows, columns // (group or columns), -1)
    if kind == "ternary":
        scale = blocks.abs().mean(-1, keepdim=True).to(scale_dtype).float()
        return torch.clamp(torch.round(blocks / scale), -1, 1).reshape(rows, columns)
    if kind == "int4":
        scale = (blocks.abs().amax(-1, keepdim=True) / 7).to(scale_dtype).float()
        return torch.clamp(torch.round(blocks / scale), -8, 7).reshape(rows, columns)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    scale = ((high - low) / 15).to(scale_dtype).float()
    zero = torch.round(-low / scale)
    return (torch.clamp(torch.round(blocks / scale) + zero, 0, 15) - zero).reshape(rows, columns)


@pytest.mark.parametrize("kind, group, dtype, bits, symmetric", [
    ("int4", 128, "bfloat16", 4, True),
    ("int4", None, "bfloat16", 4, True),
    ("int4", 32, "float16", 4, True),
    ("int4-affine", 64, "bfloat16", 4, False),
    ("ternary", None, "bfloat16", 2, True),
    ("ternary", 64, "float16", 2, True),
])
def test_grid_is_found_with_its_group_size_and_codes(tmp_path, kind, group, dtype, bits, symmetric):
    path = write_grid_checkpoint(tmp_path, CONFIG, kind, group_size=group, dtype=dtype)
    stored = load_file(str(path / "model.safetensors"))[PROBE]
    assert stored.dtype == DTYPES[dtype]
    model, _ = load_model(path, max_seq_len=32)
    grid = model.config.weight_grid
    assert grid is not None and grid.source == "float weights on a grid" and len(grid.linears) == 14
    entry = grid.linears[PROBE.removeprefix("model.")]
    assert entry.bits == bits and entry.symmetric == symmetric and entry.ternary == (kind == "ternary")
    assert entry.group_size == (group or stored.shape[1])
    levels = entry.codes.to(torch.int16) - entry.zeros.to(torch.int16).repeat_interleave(entry.group_size, dim=1)
    source = random_state(CONFIG, 0)[PROBE]
    assert torch.equal(levels.float(), _expected_codes(kind, group, source))
    # The model holds the grid's exact values; they differ from what is stored by its rounding only.
    weight = model.layers[1].mlp.down_proj.weight
    assert torch.equal(weight, entry.dequantize())
    assert bool(((weight - stored.float()).abs() <= 3 * ROUNDOFF[DTYPES[dtype]] * stored.float().abs()).all())
    assert grid.max_rel_deviation <= 3 * ROUNDOFF[DTYPES[dtype]]


def test_trained_and_random_weights_are_not_on_a_grid(tmp_path):
    assert load_checkpoint(EMBEDDED / "minicpm-tiny").config.weight_grid is None
    assert load_checkpoint(EMBEDDED / "blockffn-tiny").config.weight_grid is None
    trained_like = write_trained_like_checkpoint(tmp_path / "trained", "minicpm4-0.5b", **TINY_GQA, vocab_size=1024)
    assert load_checkpoint(trained_like).config.weight_grid is None
    from bench.synthetic import write_checkpoint

    for dtype in ("bfloat16", "float16"):
        random_path = write_checkpoint(tmp_path / dtype, CONFIG, random_state(CONFIG, 5), dtype=dtype)
        assert load_checkpoint(random_path).config.weight_grid is None


def test_one_weight_off_the_grid_means_no_grid(tmp_path):
    path = write_grid_checkpoint(tmp_path, CONFIG, "int4", group_size=128)
    tensors = load_file(str(path / "model.safetensors"))
    weight = tensors[PROBE].float()
    weight[3, 200] += 0.37 * weight[3, 128:].abs().max() / 7  # a third of a step: between two levels
    tensors[PROBE] = weight.to(torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"))
    assert load_checkpoint(path).config.weight_grid is None


@pytest.mark.parametrize("kind, text", [
    ("int4", "weights lie on a 4-bit grid, symmetric, groups of 128"),
    ("ternary", "weights lie on a ternary grid {-s, 0, +s}, one scale per output channel"),
])
def test_inspect_reports_the_grid(tmp_path, kind, text):
    from typer.testing import CliRunner

    from cpm_mobile.cli import app

    path = write_grid_checkpoint(tmp_path, CONFIG, kind, group_size=128 if kind == "int4" else None)
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert text in " ".join(result.output.split())
    assert "checkpoint-grid" in result.output  # its size row: the recipe applies to this checkpoint
    plain = CliRunner().invoke(app, ["inspect", str(DEFAULT_MODEL)])
    assert "none (float weights on no integer grid)" in " ".join(plain.output.split())
    assert "checkpoint-grid" not in plain.output


@pytest.mark.parametrize("recipe", ["checkpoint-grid", "ternary-grid"])
def test_grid_recipes_refuse_a_checkpoint_without_a_grid_before_work(tmp_path, recipe):
    from typer.testing import CliRunner

    from cpm_mobile.cli import app

    result = CliRunner().invoke(app, ["export", "--model", str(DEFAULT_MODEL), "--recipe", recipe,
                                      "--target", "onnx", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "lie on none" in lines[0] and "config.json" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_ternary_grid_exports_as_2_bit_matmulnbits_codes(tmp_path):
    import onnx_ir as ir

    from cpm_mobile.exporter.targets.onnx.quant import WEIGHT_KEY, quantize_onnx, unpack
    from cpm_mobile.exporter.targets.base import ExportContext
    from cpm_mobile.exporter.targets.onnx.target import OnnxTarget
    from cpm_mobile.exporter.targets.onnx.spec import OnnxQuantization

    path = write_grid_checkpoint(tmp_path / "ckpt", CONFIG, "ternary", group_size=64)
    model, _ = load_model(path, max_seq_len=32)
    grid = model.config.weight_grid
    info = OnnxTarget().export(model, tmp_path / "onnx", context=ExportContext(bos_id=1, eos_ids=(2,))).info
    scheme = TypeAdapter(OnnxQuantization).validate_python({"scheme": "ternary", "embedding_bits": None,
                                                            "lm_head_bits": None})
    quantized = quantize_onnx(ir.load(tmp_path / "onnx" / info.entry), scheme, grid)
    seen = 0
    for node in quantized.graph:
        param = node.metadata_props.get(WEIGHT_KEY)
        if node.op_type != "MatMulNBits" or param not in grid.linears:
            continue
        entry = grid.linears[param]
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        assert attrs["bits"] == 2 and attrs["block_size"] == 64 and len(node.inputs) == 3  # default zero point 2
        n, k = entry.codes.shape
        codes = unpack(node.inputs[1].const_value.numpy().reshape(n, -1), 2)[:, :k]
        assert np.array_equal(codes, entry.codes.numpy()) and set(np.unique(codes)) <= {1, 2, 3}
        assert np.array_equal(node.inputs[2].const_value.numpy().reshape(n, -1), entry.scales.numpy())
        seen += 1
    assert seen == len(grid.linears)


def test_bf16_scaled_grid_is_exact_in_executorch_and_affine_grid_in_coreml(tmp_path):
    from cpm_mobile.exporter.targets.executorch.quant import quantize_for_executorch, quantised_weights
    from cpm_mobile.exporter.targets.executorch.spec import Int4Scheme

    path = write_grid_checkpoint(tmp_path / "bf16", CONFIG, "int4", group_size=64, scale_dtype=torch.bfloat16)
    model, _ = load_model(path, max_seq_len=32)
    grid = model.config.weight_grid
    assert grid.first().scale_dtype == torch.bfloat16  # the training run's bf16 scales, recovered
    twin = quantize_for_executorch(model, Int4Scheme(scheme="int4", embedding="fp32", lm_head="fp32"))
    for name, weight in quantised_weights(twin).items():
        entry = grid.linears[f"{name}.weight"]
        assert torch.equal(weight.qdata.to(torch.int16) + 8, entry.codes.to(torch.int16))
        assert torch.equal(weight.scale, entry.scales)  # bf16 already: nothing lost to XNNPACK's bf16
        assert torch.equal(weight.dequantize(), entry.dequantize())

    from tests.test_gptq import _coreml, _stored_blockwise
    from cpm_mobile.exporter.targets.coreml.quant import flat_name

    affine = write_grid_checkpoint(tmp_path / "affine", CONFIG, "int4-affine", group_size=128)
    model, _ = load_model(affine, max_seq_len=32)
    grid = model.config.weight_grid
    exported = _coreml(model, tmp_path / "coreml", {"scheme": "int4", "embedding": "keep", "lm_head": "keep"})
    stored = _stored_blockwise(tmp_path / "coreml" / exported.info.entry)
    for name, entry in grid.linears.items():
        op = stored[flat_name(name)]
        assert np.array_equal(op["data"].astype(np.int16) + 8, entry.codes.numpy())
        assert np.array_equal(op["offset"].astype(np.int16) + 8, entry.zeros.numpy())
        assert np.array_equal(op["scale"], entry.scales.numpy())
