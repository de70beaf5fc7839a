"""Every real layout loads to the same module; every bad checkpoint is one clear line and exit 2."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cpm_mobile.cli import app
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models import load_checkpoint, load_model, prompt_logits
from bench.synthetic import write_synthetic_checkpoint
from bench.presets import preset_config
from cpm_mobile.exporter.models.loader import build_model
from bench.synthetic import random_state, write_checkpoint
from cpm_mobile.recipes import load_recipe
from tests.conftest import TINY_BLOCKFFN, TINY_GQA

TOKENS = [1, 5, 900, 17, 3]
runner = CliRunner()


@pytest.fixture(scope="module")
def gqa_config():
    return preset_config("minicpm4-0.5b", vocab_size=1000, **TINY_GQA)


@pytest.fixture(scope="module")
def gqa_reference(gqa_config, tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("ref"), gqa_config, random_state(gqa_config), dtype="float32")
    return prompt_logits(load_model(folder, 32)[0], TOKENS)


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin", "hub-cache"])
def test_layouts_load_to_the_same_logits(tmp_path, gqa_config, gqa_reference, layout):
    folder = write_checkpoint(tmp_path / "m", gqa_config, random_state(gqa_config), dtype="float32", layout=layout)
    model, checkpoint = load_model(folder, 32)
    assert torch.equal(prompt_logits(model, TOKENS), gqa_reference)
    assert len(checkpoint.files.weights) == (2 if layout.startswith("sharded") else 1)


def test_hub_snapshot_folder_used_as_it_is(tmp_path, gqa_config, gqa_reference):
    root = write_checkpoint(tmp_path / "models--openbmb--MiniCPM4-0.5B", gqa_config, random_state(gqa_config),
                            dtype="float32", layout="hub-cache")
    snapshot = next((root / "snapshots").iterdir())
    assert (snapshot / "config.json").is_symlink()
    assert torch.equal(prompt_logits(load_model(snapshot, 32)[0], TOKENS), gqa_reference)


def test_fused_qkv_and_gate_up_names(tmp_path, gqa_config, gqa_reference):
    state = random_state(gqa_config, fused=True)
    assert any(n.endswith("qkv_proj.weight") for n in state) and any(n.endswith("gate_up_proj.weight") for n in state)
    folder = write_checkpoint(tmp_path / "m", gqa_config, state, dtype="float32")
    assert torch.equal(prompt_logits(load_model(folder, 32)[0], TOKENS), gqa_reference)


@pytest.mark.parametrize("dtype, bound", [("bfloat16", 0.5), ("float16", 0.05)])
def test_half_precision_on_disk(tmp_path, gqa_config, gqa_reference, dtype, bound):
    folder = write_checkpoint(tmp_path / "m", gqa_config, random_state(gqa_config), dtype=dtype)
    model, checkpoint = load_model(folder, 32)
    assert checkpoint.dtypes_on_disk == [dtype]
    assert next(model.parameters()).dtype == torch.float32
    error = (prompt_logits(model, TOKENS) - gqa_reference).abs().max().item()
    assert 0 < error <= bound  # rounded weights: close, not equal


def test_blockffn_names_without_weight_suffix(tmp_path):
    folder = write_synthetic_checkpoint(tmp_path / "b", "blockffn-small", layout="bin", vocab_size=500, **TINY_BLOCKFFN)
    raw = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert "model.layers.0.mlp.up_proj" in raw and "model.layers.0.mlp.down_proj" in raw
    assert "model.layers.0.mlp.router_proj.weight" in raw and "model.layers.0.mlp.router_norm.weight" in raw
    checkpoint = load_checkpoint(folder)
    assert checkpoint.config.ffn == "blockffn" and checkpoint.config.attention == "mla"
    assert not checkpoint.tied


def test_checkpoint_hash_changes_with_weights(tmp_path, gqa_config):
    a = write_checkpoint(tmp_path / "a", gqa_config, random_state(gqa_config, seed=0), dtype="float32")
    b = write_checkpoint(tmp_path / "b", gqa_config, random_state(gqa_config, seed=1), dtype="float32")
    assert load_checkpoint(a).sha256() == load_checkpoint(a).sha256() != load_checkpoint(b).sha256()


def test_infllm_v2_config_runs_dense_below_dense_len(tmp_path):
    folder = write_synthetic_checkpoint(tmp_path / "m", "minicpm4-8b", vocab_size=500, **TINY_GQA)
    checkpoint = load_checkpoint(folder)
    assert checkpoint.config.sparse_attention.dense_len == 8192
    model, _ = load_model(folder, max_seq_len=64)
    assert prompt_logits(model, [1, 5, 17]).shape == (3, 500)
    with pytest.raises(InputError, match="InfLLM v2 sparse attention above dense_len=8192"):
        load_model(folder, max_seq_len=8193)


# -- bad checkpoints: one line naming the file and the problem, exit 2, no traceback ---------


def _inspect(path):
    result = runner.invoke(app, ["inspect", str(path)])
    return result.exit_code, result.stderr.strip(), result


def _assert_one_line_error(path, expected_file, expected_problem):
    code, message, result = _inspect(path)
    assert code == 2, result.output
    assert "\n" not in message and "Traceback" not in result.output
    assert str(expected_file) in message and expected_problem in message, message


@pytest.fixture
def good(tmp_path, gqa_config):
    return write_checkpoint(tmp_path / "good", gqa_config, random_state(gqa_config), dtype="float32")


def test_missing_config(good):
    (good / "config.json").unlink()
    _assert_one_line_error(good, good / "config.json", "config.json not found")


def test_invalid_config_json(good):
    (good / "config.json").write_text("{ not json")
    _assert_one_line_error(good, good / "config.json", "not valid JSON")


def test_unsupported_model_type(good):
    config = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    _assert_one_line_error(good, good / "config.json", "model_type 'gpt2' is not supported")


def test_truncated_safetensors(good):
    weights = good / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(good, weights, "unreadable safetensors file")


def test_garbage_header_safetensors(good):
    weights = good / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    _assert_one_line_error(good, weights, "unreadable safetensors file")


def test_wrong_shape(good):
    weights = good / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 128)
    save_file(state, weights)
    _assert_one_line_error(good, weights, "tensor 'model.layers.1.self_attn.k_proj.weight' has shape (3, 128)")


def test_missing_keys_are_named(good):
    weights = good / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.0.mlp.up_proj.weight"], state["model.norm.weight"]
    save_file(state, weights)
    _assert_one_line_error(good, weights, "missing 2 tensor(s): model.layers.0.mlp.up_proj.weight, model.norm.weight")


def test_extra_keys_are_named(good):
    weights = good / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(state, weights)
    _assert_one_line_error(good, weights, "1 unexpected tensor(s): model.layers.0.mystery.weight")


def test_nan_weights(good):
    weights = good / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")
    save_file(state, weights)
    _assert_one_line_error(good, weights, "tensor 'model.layers.1.mlp.down_proj.weight' holds NaN or Inf")


def test_untied_config_without_lm_head(good):
    config = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    _assert_one_line_error(good, good / "model.safetensors", "missing tensor 'lm_head.weight'")


def test_missing_shard(tmp_path, gqa_config):
    folder = write_checkpoint(tmp_path / "m", gqa_config, random_state(gqa_config), layout="sharded-safetensors")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    _assert_one_line_error(folder, shard, "shard listed in model.safetensors.index.json is missing")


def test_no_weights(good):
    (good / "model.safetensors").unlink()
    _assert_one_line_error(good, good, "no weights found")


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_holding_code_is_refused_and_never_run(tmp_path, gqa_config):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(write_checkpoint(tmp_path / "src", gqa_config, random_state(gqa_config)) / "config.json", folder)
    marker = tmp_path / "code-ran"
    state = random_state(gqa_config)
    state["payload"] = _Payload(marker)
    torch.save(state, folder / "pytorch_model.bin")
    _assert_one_line_error(folder, folder / "pytorch_model.bin", "refused")
    assert not marker.exists()


def test_bin_that_is_not_a_checkpoint(good):
    (good / "model.safetensors").unlink()
    (good / "pytorch_model.bin").write_bytes(pickle.dumps([1, 2, 3]))
    _assert_one_line_error(good, good / "pytorch_model.bin", "pytorch_model.bin")


def test_refused_bin_prints_one_line_and_no_torch_warning(good, tmp_path):
    """torch warns about the pickle protocol of a file it refuses; the CLI shows only the refusal."""
    from tests.test_tokenizers import _cli, assert_one_line_error

    (good / "model.safetensors").unlink()
    (good / "pytorch_model.bin").write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    out = tmp_path / "out"
    result = _cli("export", "--model", str(good), "--target", "onnx", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result)
    assert "pytorch_model.bin" in result.stderr.strip().splitlines()[-1]
    assert not out.exists() or not any(out.iterdir())


def test_path_is_a_file(good):
    _assert_one_line_error(good / "config.json", good / "config.json", "expected a checkpoint folder")


def test_inspect_reports_the_facts(tmp_path):
    folder = write_synthetic_checkpoint(tmp_path / "b", "blockffn-small", vocab_size=500, **TINY_BLOCKFFN)
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["family"] == "blockffn" and facts["attention"] == "mla"
    assert (facts["experts"], facts["expert_size"], facts["layers"], facts["vocab"]) == (8, 16, 2, 500)
    assert facts["tied_embeddings"] is False and facts["dtype_on_disk"] == "bfloat16"
    expected_params = sum(t.numel() for t in load_checkpoint(folder).state.values())
    assert facts["parameters"] == expected_params
    sizes = {(row["recipe"], row["target"]): row["bytes"] for row in facts["artifact_sizes"]}
    assert ("fp32-sparse", "onnx") in sizes  # a BlockFFN model: the sparse recipe applies
    # untied: each table once in a .pte too; 4 bytes per parameter and per RoPE table entry
    model = build_model(load_checkpoint(folder), max_seq_len=load_recipe("fp32").max_seq_len)
    rope = model.rope_cos.numel() + model.rope_sin.numel()
    assert sizes[("fp32", "executorch")] == 4 * (expected_params + rope)
    assert sizes[("coreml-fp16", "coreml")] < sizes[("fp32", "coreml")]
