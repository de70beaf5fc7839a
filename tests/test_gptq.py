"""GPTQ-format checkpoints: read into the dequantised model and its grid, exported with the
checkpoint's own codes and scales (read back out of each artifact), refused where a format cannot
carry them losslessly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from pydantic import TypeAdapter
from safetensors.torch import load_file

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models import load_model
from bench.synthetic import random_state, write_gptq_checkpoint
from bench.presets import preset_config
from cpm_mobile.exporter.targets.onnx.quant import WEIGHT_KEY, check_grid, quantize_onnx, unpack
from cpm_mobile.exporter.targets.base import ExportContext
from cpm_mobile.exporter.targets.onnx.target import OnnxTarget
from cpm_mobile.exporter.targets.onnx.spec import OnnxQuantization
from tests.conftest import TINY_GQA

MAX_SEQ_LEN = 64
# MiniCPM4 (the QAT-Int4-GPTQ release's family) shrunk: hidden 128 and intermediate 256, so GPTQ's
# groups of 128 give one group on the attention inputs and two on down_proj.
CONFIG = preset_config("minicpm4-0.5b", **TINY_GQA, vocab_size=1024)
PROMPT = np.array([1, 17, 42, 300, 5, 99, 123, 2, 60, 311, 42, 7, 500, 8, 9, 10], np.int64)
parse_onnx = TypeAdapter(OnnxQuantization).validate_python


@pytest.fixture(scope="module")
def gptq_sym(tmp_path_factory) -> Path:
    return write_gptq_checkpoint(tmp_path_factory.mktemp("gptq-sym"), CONFIG, sym=True, group_size=128)


@pytest.fixture(scope="module")
def gptq_asym(tmp_path_factory) -> Path:
    return write_gptq_checkpoint(tmp_path_factory.mktemp("gptq-asym"), CONFIG, sym=False, group_size=64)


def _naive_dequant(tensors: dict[str, torch.Tensor], prefix: str, bits: int, v1: bool) -> torch.Tensor:
    """weight[o, i] from the packed tensors element by element (the GPTQ formula written out)."""
    qweight, qzeros = tensors[f"{prefix}.qweight"].tolist(), tensors[f"{prefix}.qzeros"].tolist()
    scales, g_idx = tensors[f"{prefix}.scales"].float(), tensors[f"{prefix}.g_idx"].tolist()
    per_word, mask = 32 // bits, (1 << bits) - 1
    in_features, out_features = len(qweight) * per_word, len(qweight[0])
    weight = torch.empty(out_features, in_features)
    for i in range(in_features):
        g = g_idx[i]
        for o in range(out_features):
            code = (qweight[i // per_word][o] >> (bits * (i % per_word))) & mask
            zero = ((qzeros[g][o // per_word] >> (bits * (o % per_word))) & mask) + (1 if v1 else 0)
            weight[o, i] = float(scales[g, o]) * (code - zero)
    return weight


@pytest.mark.parametrize("sym,checkpoint_format", [(True, "gptq"), (False, "gptq"), (False, "gptq_v2")])
def test_loader_dequantises_exactly_and_keeps_the_grid(tmp_path, sym, checkpoint_format):
    path = write_gptq_checkpoint(tmp_path, CONFIG, sym=sym, group_size=64, checkpoint_format=checkpoint_format)
    tensors = load_file(str(path / "model.safetensors"))
    assert tensors["model.layers.1.mlp.down_proj.qweight"].dtype == torch.int32
    assert "model.layers.1.mlp.down_proj.weight" not in tensors
    model, checkpoint = load_model(path, max_seq_len=MAX_SEQ_LEN)
    grid = model.config.weight_grid
    assert grid.source == "gptq" and len(grid.linears) == 2 * 7
    prefix = "model.layers.1.self_attn.k_proj"
    expected = _naive_dequant(tensors, prefix, 4, v1=checkpoint_format == "gptq")
    assert torch.equal(model.layers[1].self_attn.k_proj.weight, expected)
    entry = grid.linears["layers.1.self_attn.k_proj.weight"]
    assert torch.equal(entry.dequantize(), expected)
    assert entry.symmetric == sym and entry.group_size == 64 and entry.scale_dtype == torch.float16
    # Within half a step of the weights it was rounded from (+1 % for the fp16 scale at a clipped
    # extreme; a wrong unpack is off by whole steps).
    source = random_state(CONFIG, 0)[f"{prefix}.weight"]
    step = entry.scales.repeat_interleave(64, dim=1)
    assert bool(((expected - source).abs() <= 0.51 * step).all())
    # What is not quantised stays the checkpoint's float16 values.
    assert torch.equal(model.embed_tokens.weight, tensors["model.embed_tokens.weight"].float())


def test_bad_gptq_tensors_are_one_line_errors(tmp_path):
    path = write_gptq_checkpoint(tmp_path, CONFIG)
    tensors = load_file(str(path / "model.safetensors"))
    from safetensors.torch import save_file

    tensors.pop("model.layers.0.mlp.up_proj.scales")
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(InputError, match="GPTQ linear 'model.layers.0.mlp.up_proj' has qweight but no scales"):
        load_model(path)


def _onnx(checkpoint: Path, folder: Path):
    model, _ = load_model(checkpoint, max_seq_len=MAX_SEQ_LEN)
    context = ExportContext(bos_id=1, eos_ids=(2,))
    info = OnnxTarget().export(model, folder, context=context).info
    return model, ir.load(folder / info.entry)


def _node_arrays(graph: ir.Model) -> dict[str, dict]:
    out = {}
    for node in graph.graph:
        if node.op_type == "MatMulNBits" and node.metadata_props.get(WEIGHT_KEY) != "lm_head.weight":
            attrs = {name: attr.value for name, attr in node.attributes.items()}
            values = [v.const_value.numpy() if v is not None else None for v in node.inputs[1:]]
            out[node.metadata_props[WEIGHT_KEY]] = dict(attrs=attrs, b=values[0], scales=values[1],
                                                         zeros=values[2] if len(values) > 2 else None)
    return out


def _run(graph: ir.Model, folder: Path) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    ir.save(graph, folder / "model.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feed = {"input_ids": PROMPT[None], "attention_mask": np.ones((1, len(PROMPT)), np.int64),
            "position_ids": np.arange(len(PROMPT))[None]}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            feed[value.name] = np.zeros((1, value.shape[1], 0, value.shape[3]), np.float32)
    return session.run(["logits"], feed)[0][0]


def _torch(model) -> np.ndarray:
    model.reset_cache()
    with torch.no_grad():
        return model(torch.from_numpy(PROMPT)[None], torch.tensor([0]))[0].numpy()


@pytest.mark.parametrize("which", ["gptq_sym", "gptq_asym"])
def test_onnx_matmulnbits_hold_the_checkpoints_codes_and_compute_the_dequantised_model(which, request, tmp_path):
    model, graph = _onnx(request.getfixturevalue(which), tmp_path / "fp32")
    grid = model.config.weight_grid
    scheme = parse_onnx({"scheme": "int4", "accuracy_level": 0, "embedding_bits": None, "lm_head_bits": None})
    quantized = quantize_onnx(graph, scheme, grid)
    stored = _node_arrays(quantized)
    assert set(stored) == set(grid.linears)
    for name, entry in grid.linears.items():
        node = stored[name]
        n, k = entry.codes.shape
        assert node["attrs"]["bits"] == 4 and node["attrs"]["block_size"] == entry.group_size
        codes = unpack(node["b"].reshape(n, -1), 4)[:, :k]
        assert np.array_equal(codes, entry.codes.numpy())
        assert node["scales"].dtype == np.float32
        assert np.array_equal(node["scales"].reshape(n, -1), entry.scales.numpy())
        assert np.array_equal(node["scales"].reshape(n, -1).astype(np.float16).astype(np.float32), node["scales"].reshape(n, -1))
        if entry.symmetric:
            assert node["zeros"] is None and bool((entry.zeros == 8).all())  # MatMulNBits' default zero point
        else:
            zeros = unpack(node["zeros"].reshape(n, -1), 4)[:, :k // entry.group_size]
            assert np.array_equal(zeros, entry.zeros.numpy())
    # Fidelity against the dequantised checkpoint: fp32 rounding only (accuracy_level 0 keeps the
    # activations fp32; one flipped code moves the logits by ~1e-2).
    expected = _torch(model)
    error = np.abs(_run(quantized, tmp_path / "int4") - expected).max() / np.abs(expected).max()
    assert error < 2e-6, error


def test_onnx_refuses_what_it_cannot_carry(gptq_asym, tmp_path):
    model, _ = load_model(gptq_asym, max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(InputError, match=r"block_size.*32 contradicts the checkpoint's grid \(groups of 64\)"):
        check_grid(model, parse_onnx({"scheme": "int4", "block_size": 32}))
    with pytest.raises(InputError, match="symmetric.*true contradicts the checkpoint's grid"):
        check_grid(model, parse_onnx({"scheme": "int4", "symmetric": True}))
    with pytest.raises(InputError, match="2-bit codes cannot hold it"):
        check_grid(model, parse_onnx({"scheme": "ternary"}))
    with pytest.raises(InputError, match="'hqq' would round the weights again"):
        check_grid(model, parse_onnx({"scheme": "int4", "algorithm": "hqq"}))
    check_grid(model, parse_onnx({"scheme": "int8"}))  # 4-bit codes fit in 8 bits: carried, not refused
    act_order = write_gptq_checkpoint(tmp_path / "act-order", CONFIG, desc_act=True)
    model, _ = load_model(act_order, max_seq_len=MAX_SEQ_LEN)
    assert all(g.act_order for g in model.config.weight_grid.linears.values())
    with pytest.raises(InputError, match="act-order GPTQ .*cannot carry it losslessly"):
        check_grid(model, parse_onnx({"scheme": "int4"}))


def _coreml(model, folder: Path, quantization: dict):
    from cpm_mobile.exporter.targets.coreml.target import CoreMLTarget
    from cpm_mobile.exporter.targets.coreml.spec import CoreMLSpec

    spec = CoreMLSpec(quantization=quantization, faithfulness={}, fidelity={})
    return CoreMLTarget().export(model, folder, spec, ExportContext(bos_id=1, eos_ids=(2,)))


def _stored_blockwise(package: Path) -> dict[str, dict[str, np.ndarray]]:
    """data / scale / offset of every constexpr_blockwise_shift_scale of the saved program, by the
    flattened parameter name it replaces."""
    from cpm_mobile.exporter.targets.coreml.quant import base_name
    from cpm_mobile.runtimes.coreml.mil_interpreter import load_mil_program

    found = {}
    for op in load_mil_program(package).functions["main"].operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            offset = op.offset.val if op.offset is not None else None
            found[base_name(op.name)] = dict(data=np.asarray(op.data.val), scale=np.asarray(op.scale.val),
                                             offset=None if offset is None else np.asarray(offset))
    return found


@pytest.mark.parametrize("which", ["gptq_sym"])  # offsets (affine grids): tests/test_weight_grid.py
def test_coreml_blockwise_ops_hold_the_checkpoints_codes(which, request, tmp_path):
    from dataclasses import asdict

    from cpm_mobile.exporter.targets.coreml.quant import flat_name
    from cpm_mobile.exporter.targets.coreml.target import CoreMLTarget
    from cpm_mobile.runtimes.coreml.session import CoreMLSession
    from cpm_mobile.runtimes.metrics import sqnr_db

    model, _ = load_model(request.getfixturevalue(which), max_seq_len=MAX_SEQ_LEN)
    grid = model.config.weight_grid
    exported = _coreml(model, tmp_path, {"scheme": "int4", "embedding": "keep", "lm_head": "keep"})
    stored = _stored_blockwise(tmp_path / exported.info.entry)
    assert set(stored) == {flat_name(name) for name in grid.linears}
    for name, entry in grid.linears.items():
        op = stored[flat_name(name)]
        assert op["data"].dtype == np.int8 and op["data"].min() >= -8 and op["data"].max() <= 7  # int4 storage
        assert np.array_equal(op["data"].astype(np.int16) + 8, entry.codes.numpy())
        assert np.array_equal(op["scale"], entry.scales.numpy())  # fp16 values, held exactly
        if entry.symmetric:
            assert op["offset"] is None
        else:
            assert np.array_equal(op["offset"].astype(np.int16) + 8, entry.zeros.numpy())
    # The twin is the dequantised checkpoint itself (with Core ML's fp16 KV cache), weight for weight.
    twin_weights = dict(exported.twin.named_parameters())
    for name in grid.linears:
        assert torch.equal(twin_weights[name], dict(model.named_parameters())[name])
    session = CoreMLSession(tmp_path / exported.info.entry, exported.info.io)
    assert CoreMLTarget().structure(tmp_path, asdict(exported.info), exported.twin) == []
    logits = session.forward(PROMPT, 0)
    exported.twin.reset_cache()
    with torch.no_grad():
        expected = exported.twin(torch.from_numpy(PROMPT)[None], torch.tensor([0]))[0].numpy()
    assert sqnr_db(logits, expected) > 70, sqnr_db(logits, expected)


@pytest.mark.slow
def test_executorch_carries_the_codes_with_bf16_scales_and_refuses_zero_points(gptq_sym, gptq_asym, tmp_path):
    from cpm_mobile.exporter.targets.executorch.quant import quantised_weights
    from cpm_mobile.exporter.targets.executorch.target import ExecuTorchTarget
    from cpm_mobile.exporter.targets.executorch.spec import ExecuTorchSpec
    from cpm_mobile.runtimes.executorch import ExecuTorchSession
    from cpm_mobile.runtimes.metrics import sqnr_db

    def spec(**fields):
        return ExecuTorchSpec.model_validate({"faithfulness": {}, "fidelity": {}, "quantization": {
            "scheme": "int4", "embedding": "fp32", "lm_head": "fp32", **fields}})

    model, _ = load_model(gptq_sym, max_seq_len=MAX_SEQ_LEN)
    grid = model.config.weight_grid
    exported = ExecuTorchTarget().export(model, tmp_path / "sym", spec())
    stored = quantised_weights(exported.twin)
    assert set(f"{name}.weight" for name in stored) == set(grid.linears)
    for name, weight in stored.items():
        entry = grid.linears[f"{name}.weight"]
        assert weight.block_size == (1, entry.group_size) and weight.target_dtype == torch.int4
        assert torch.equal(weight.qdata.to(torch.int16) + 8, entry.codes.to(torch.int16))  # the codes, exactly
        assert torch.equal(weight.scale, entry.scales.to(torch.bfloat16).float())  # what XNNPACK stores
        assert float(((weight.scale - entry.scales).abs() / entry.scales).max()) <= 2.0**-8  # bf16 rounding only
    session = ExecuTorchSession(tmp_path / "sym" / "model.pte")
    logits = session.forward(PROMPT, 0)
    exported.twin.reset_cache()
    with torch.no_grad():
        twin = exported.twin(torch.from_numpy(PROMPT)[None], torch.tensor([0]))[0].numpy()
    assert sqnr_db(twin, logits) > 40.0
    # Zero points (XNNPACK ignores them) and contradicting block sizes are refused before any work.
    asym, _ = load_model(gptq_asym, max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(InputError, match="zero points, which XNNPACK ignores"):
        ExecuTorchTarget().export(asym, tmp_path / "asym", spec())
    with pytest.raises(InputError, match="group_size.*64 contradicts the checkpoint's grid \\(groups of 128\\)"):
        ExecuTorchTarget().export(model, tmp_path / "g64", spec(group_size=64))
    assert not (tmp_path / "asym").exists() or not any((tmp_path / "asym").iterdir())


# -- through the CLI -------------------------------------------------------------------------------


def _cli(*args: str):
    from typer.testing import CliRunner

    from cpm_mobile.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def gptq_folder(gptq_sym, tokenizer_dir) -> Path:
    from tests.conftest import with_tokenizer

    return with_tokenizer(gptq_sym, tokenizer_dir)


def test_inspect_reports_the_gptq_grid(gptq_folder):
    result = _cli("inspect", str(gptq_folder))
    assert result.exit_code == 0, result.output
    assert "GPTQ checkpoint: 4-bit grid, symmetric, groups of 128, float16 scales" in " ".join(result.output.split())


@pytest.mark.parametrize("recipe", ["checkpoint-grid", "fp32"])
def test_onnx_export_passes_its_check_against_the_dequantised_checkpoint(gptq_folder, tmp_path, recipe):
    import json

    result = _cli("export", "--model", str(gptq_folder), "--target", "onnx", "--recipe", recipe,
                  "--out", str(tmp_path), "--name", "bundle")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["source"]["weight_grid"].startswith("GPTQ checkpoint: 4-bit grid")
    report = json.loads((tmp_path / "bundle" / "report.json").read_text())
    assert report["passed"] is True


def test_refusals_are_one_line_exit_2_and_write_nothing(gptq_folder, tmp_path, tokenizer_dir):
    from tests.conftest import with_tokenizer

    act_order = with_tokenizer(write_gptq_checkpoint(tmp_path / "act-order", CONFIG, desc_act=True), tokenizer_dir)
    cases = [
        (act_order, "onnx", "checkpoint-grid", "act-order GPTQ"),
        (act_order, "coreml", "checkpoint-grid", "act-order GPTQ"),
        (act_order, "executorch", "checkpoint-grid", "act-order GPTQ"),
        (gptq_folder, "onnx", "int4", "use --recipe checkpoint-grid to export it as it is"),
        (gptq_folder, "coreml", "coreml-palette4", "a palette would cluster them again"),
    ]
    for folder, target, recipe, message in cases:
        out = tmp_path / f"out-{target}-{recipe}"
        result = _cli("export", "--model", str(folder), "--target", target, "--recipe", recipe, "--out", str(out))
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
        # a calibrated recipe is refused for the checkpoint, whatever the target; the others name their target
        assert message in lines[0] and (recipe == "int4" or target in lines[0]), lines[0]
        assert not out.exists() or not any(out.iterdir())
